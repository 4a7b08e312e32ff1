"""Reward models: export as a Hugging Face sequence-classification folder, load, and score JSONL.

A reward model trained by ``lmforge align --method rm`` is the policy's Transformer plus a ``score`` head. Its run
folder's ``reward_model/`` is a Hugging Face folder (the family's ``...ForSequenceClassification`` architecture,
``num_labels`` 1, ``pad_token_id`` set) that ``transformers.AutoModelForSequenceClassification`` loads to the
same scores: Hugging Face scores the last token that is not the pad token, and lmforge scores each sequence's
last token, which is never the pad (EOS) token because reward-model completions get no EOS.

``lmforge reward MODEL --data FILE`` scores a JSONL file with it: pair records (``prompt``/``chosen``/
``rejected``) get both scores and the file's accuracy (chosen scored above rejected); other records are scored
as ``prompt`` + ``completion`` (or ``text`` alone).

A SteerLM attribute model (``lmforge align --method regression_rm``) is the same with one output per attribute:
its folder's config names them (``id2label``), says ``problem_type: regression`` and keeps the labels' range
(``attribute_range``); ``lmforge reward`` with it labels records (:func:`label_file`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from lmforge.errors import CheckpointError, DataError

FOLDER = "reward_model"


def _lineage(base: Optional[str]) -> dict:
    """``family`` / ``hf_config`` of the base model (so the export writes the base's family)."""
    if not base:
        return {}
    from lmforge.finetune.cli import _stored_dtype

    try:
        return _stored_dtype(base)[1]
    except Exception:  # noqa: BLE001 - a base that moved: the family is guessed from the config
        return {}


def export_reward_model(checkpoint: Path, out: Path, base: Optional[str] = None, attributes=None) -> Path:
    """Write the reward model of an lmforge ``checkpoint`` (weights with ``score.weight``) to ``out`` as a
    Hugging Face sequence-classification folder; ``out`` appears whole or not at all. ``attributes`` (a
    :class:`~lmforge.data.steer.AttributeFormat`): a SteerLM attribute model, whose config names each output
    (``id2label``), says ``problem_type: regression`` and keeps the labels' range (``attribute_range``)."""
    from safetensors.torch import load_file, save_file

    from lmforge.convert.hf import convert
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.io import write_json_atomic
    from lmforge.train.checkpoint import load_model, save_model, write_model_config

    weights, config = load_model(checkpoint, device="cpu")
    if "score.weight" not in weights:
        raise CheckpointError(f"{checkpoint} holds no score head (score.weight): it is not a reward model")
    score = weights.pop("score.weight")
    tokenizer = load_tokenizer(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        plain = Path(tmp) / "lm"
        save_model(plain, weights, config["model"], tokenizer=tokenizer)
        lineage = _lineage(base)
        if lineage:
            doc = json.loads(write_model_config(plain, config["model"]).read_text(encoding="utf-8"))
            write_json_atomic(plain / "config.json", {**doc, **lineage})
        hf = Path(tmp) / "hf"
        convert(plain, hf, to="hf", progress=False)
        index = hf / "model.safetensors.index.json"
        if index.is_file():  # sharded: the head in a file of its own
            save_file({"score.weight": score.contiguous()}, str(hf / "score.safetensors"), metadata={"format": "pt"})
            doc = json.loads(index.read_text(encoding="utf-8"))
            doc["weight_map"]["score.weight"] = "score.safetensors"
            write_json_atomic(index, doc)
        else:
            tensors = load_file(str(hf / "model.safetensors"))
            tensors["score.weight"] = score.to(next(iter(tensors.values())).dtype).contiguous()
            save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
        hf_config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
        arch = (hf_config.get("architectures") or ["LlamaForCausalLM"])[0]
        pad = tokenizer.eod_id if tokenizer.eod_id is not None else 0
        names = list(attributes.names) if attributes is not None else ["LABEL_0"]
        if score.shape[0] != len(names):
            raise CheckpointError(f"{checkpoint}: the score head has {score.shape[0]} outputs, not {len(names)}")
        hf_config.update(architectures=[arch.replace("ForCausalLM", "ForSequenceClassification")],
                         id2label={str(i): n for i, n in enumerate(names)},
                         label2id={n: i for i, n in enumerate(names)}, pad_token_id=pad)
        if attributes is not None:
            hf_config.update(problem_type="regression", attribute_range=[attributes.low, attributes.high])
        write_json_atomic(hf / "config.json", hf_config)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(hf, out)
    return out


def reward_folder(path) -> Path:
    """The Hugging Face reward-model folder of ``path``: itself, or a reward-model run's ``reward_model/``."""
    path = Path(path)
    if (path / FOLDER / "config.json").is_file():
        path = path / FOLDER
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path} is not a reward model: give the run folder of `lmforge align --method rm` "
                              f"or its {FOLDER}/ folder")
    archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise CheckpointError(f"{config}: architectures {archs} is not a sequence-classification (reward) model")
    return path


def attribute_format(path):
    """The :class:`~lmforge.data.steer.AttributeFormat` of a SteerLM attribute model's folder (its ``id2label``
    names in order and ``attribute_range``), or None for a scalar reward model."""
    from lmforge.data.steer import AttributeFormat

    config = reward_folder(path) / "config.json"
    doc = json.loads(config.read_text(encoding="utf-8"))
    if "attribute_range" not in doc:
        return None
    labels = doc.get("id2label") or {}
    try:
        names = [labels[str(i)] for i in range(len(labels))]
        return AttributeFormat.of(names, doc["attribute_range"])
    except (KeyError, TypeError, IndexError, ValueError):
        raise CheckpointError(f"{config}: id2label {labels} and attribute_range {doc['attribute_range']} do not "
                              f"describe the attribute model's outputs") from None


def load_reward_model(path, device="cpu", dtype=torch.float32):
    """``(model, tokenizer)``: the lmforge Transformer with its ``score`` head (one output, or one per
    attribute), in eval mode."""
    from lmforge.convert.hf import SafetensorsFolder, iter_hf_tensors, read_hf_config
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.models.meta import meta_device, to_empty
    from lmforge.models.transformer import Transformer

    folder = reward_folder(path)

    class WithoutHead(SafetensorsFolder):  # the language model's tensors; the head is read apart
        def keys(self):
            return [k for k in super().keys() if k != "score.weight"]

    fam, cfg, _ = read_hf_config(folder)
    reader = WithoutHead(folder)
    with meta_device():
        model = Transformer(cfg)
    model = to_empty(model.to(dtype), device)
    model.init_weights()
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in iter_hf_tensors(reader, cfg, fam):
            state[name].copy_(tensor)
    weight = SafetensorsFolder(folder).get("score.weight")
    head = torch.nn.Linear(cfg.hidden_size, weight.shape[0], bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    model.score = head
    return model.eval(), load_tokenizer(folder)


def _texts(rec: dict, where: str, tokenizer, keys) -> list:
    """The sequences a record asks to score: [chosen, rejected] of a pair, else [prompt + completion] / [text]."""
    from lmforge.align.data import Encoder

    enc = Encoder(tokenizer, keys.chat_template, add_eos=False, max_length=10**9)
    if keys.chosen_key in rec or keys.rejected_key in rec:
        names = [keys.chosen_key, keys.rejected_key]
    elif keys.completion_key in rec:
        names = [keys.completion_key]
    elif "text" in rec and isinstance(rec["text"], str):
        return [enc.prompt_ids(rec["text"], where)[0]]
    else:
        raise DataError(f"{where}: the record has none of {keys.chosen_key!r}/{keys.rejected_key!r}, "
                        f"{keys.completion_key!r} or 'text' (fields: {sorted(rec)})")
    from lmforge.align.data import _get

    prompt = _get(rec, keys.prompt_key, where, "prompt_key")
    p_ids, rendered = enc.prompt_ids(prompt, where)
    out = []
    for name in names:
        value = _get(rec, name, where, f"{name}_key")
        out.append(p_ids + enc.completion_ids(prompt, value, rendered, where, name))
    return out


def _predict(model, tokenizer, rows: list, device, batch_size: int, squeeze: bool = True) -> list:
    """The score head's values (a float, or a list per output with ``squeeze=False``) of each row of ids, read at
    its last token, in micro batches of ``batch_size`` rows padded with the tokenizer's EOS."""
    from lmforge.align.objective import score_rows

    pad = tokenizer.eod_id if tokenizer.eod_id is not None else 0
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = torch.full((len(chunk), max(len(r) for r in chunk)), pad, dtype=torch.long)
        for k, r in enumerate(chunk):
            batch[k, :len(r)] = torch.tensor(r)
        last = torch.tensor([len(r) - 1 for r in chunk])
        out.extend(score_rows(model, batch.to(device), last.to(device), squeeze=squeeze).tolist())
    return out


@torch.no_grad()
def label_file(model_path, fmt, path: Path, out: Optional[str], device, batch_size: int, keys) -> dict:
    """Label every record of ``path`` with a SteerLM attribute model (its format ``fmt``): ``{"prompt",
    "response"}`` (``align.prompt_key`` / ``align.response_key``) or ``{"messages"}`` ending with the response.
    ``out`` (whole or not at all) gets each record with its ``attributes`` (``align.attributes_key``) set to the
    predictions clipped to the range and rounded (SteerLM's labels). Returns a summary: the mean prediction of
    each attribute and, over records that hold labels already, each attribute's mean squared error."""
    from lmforge.align.data import Encoder, attribute_input, attribute_labels
    from lmforge.data.jsonl import iter_jsonl
    from lmforge.io import write_text_atomic

    model, tokenizer = load_reward_model(model_path, device=device)
    limit = model.cfg.max_position_embeddings
    enc = Encoder(tokenizer, keys.chat_template, add_eos=False, max_length=10**9)
    records = []
    for n, rec in iter_jsonl(path):
        where = f"{path}:{n}"
        ids = attribute_input(rec, where, enc, keys)
        if len(ids) > limit:
            raise DataError(f"{where}: {len(ids)} tokens exceed the model's {limit}; shorten the record")
        labels = attribute_labels(rec, where, fmt, keys.attributes_key) if keys.attributes_key in rec else None
        records.append((rec, ids, labels))
    if not records:
        raise DataError(f"data file {path} holds no records")
    predictions = _predict(model, tokenizer, [ids for _, ids, _ in records], device, batch_size, squeeze=False)
    mse = {}
    for k, name in enumerate(fmt.names):
        errors = [(p[k] - lab[k]) ** 2 for (_, _, lab), p in zip(records, predictions)
                  if lab is not None and lab[k] == lab[k]]
        if errors:
            mse[name] = sum(errors) / len(errors)
    summary = {"records": len(records), "attributes": list(fmt.names), "range": [fmt.low, fmt.high],
               "mean": {n: sum(p[k] for p in predictions) / len(predictions) for k, n in enumerate(fmt.names)},
               "mse": mse or None, "out": out}
    if out:
        lines = [json.dumps({**rec, keys.attributes_key: fmt.label(p)}, ensure_ascii=False)
                 for (rec, _, _), p in zip(records, predictions)]
        write_text_atomic(Path(out), "\n".join(lines) + "\n")
    return summary


@torch.no_grad()
def score_file(model_path, data, out: Optional[str] = None, device="cpu", batch_size: int = 8, keys=None) -> dict:
    """Score every record of ``data`` (see the module doc); write ``{"line", "scores"}`` JSONL to ``out`` (whole
    or not at all). Returns a summary with ``accuracy`` over pair records."""
    from lmforge.align.config import AlignSection
    from lmforge.data.jsonl import iter_jsonl
    from lmforge.io import write_text_atomic

    keys = keys or AlignSection()
    path = Path(data)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; give a JSONL file with one record per line")
    fmt = attribute_format(model_path)
    if fmt is not None:
        return label_file(model_path, fmt, path, out, device, batch_size, keys)
    model, tokenizer = load_reward_model(model_path, device=device)
    limit = model.cfg.max_position_embeddings
    records = []
    for n, rec in iter_jsonl(path):
        where = f"{path}:{n}"
        rows = _texts(rec, where, tokenizer, keys)
        for r in rows:
            if len(r) > limit:
                raise DataError(f"{where}: {len(r)} tokens exceed the model's {limit}; shorten the record")
        records.append((n, rows))
    if not records:
        raise DataError(f"data file {path} holds no records")
    flat = [(i, r) for i, (_, rows) in enumerate(records) for r in rows]
    scores = [[] for _ in records]
    for (i, _), v in zip(flat, _predict(model, tokenizer, [r for _, r in flat], device, batch_size)):
        scores[i].append(v)
    pairs = [s for s in scores if len(s) == 2]
    correct = sum(1 for c, r in pairs if c > r)
    summary = {"records": len(records), "pairs": len(pairs),
               "accuracy": correct / len(pairs) if pairs else None, "out": out}
    if out:
        lines = []
        for (n, _), s in zip(records, scores):
            entry = {"line": n, "scores": s}
            if len(s) == 2:
                entry.update(chosen=s[0], rejected=s[1], correct=s[0] > s[1])
            lines.append(json.dumps(entry))
        write_text_atomic(Path(out), "\n".join(lines) + "\n")
    return summary
