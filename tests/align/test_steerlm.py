"""SteerLM as NeMo-Aligner runs it, on a tiny model: an attribute model (`lmforge align --method regression_rm`,
a regression head with one output per attribute, MSE on the labelled ones) exported as a Hugging Face
sequence-classification folder; `lmforge reward` labelling records with it (clipped, rounded); attribute-conditioned
SFT (`sft.attributes`); and `lmforge generate --attributes` building the very prompt the SFT trained on. Bad labels
and bad steering values are one `error:` line."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import shlex
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from tests.align.conftest import save_tiny_base, write_jsonl

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789:, \n"
NAMES = ["quality", "verbosity"]
ALIGN_ATTRS = "align.attributes=[quality,verbosity]"
SFT_ATTRS = ["sft.input_key=prompt", "sft.output_key=response", "sft.attributes=[quality,verbosity]"]
DOC = Path(__file__).resolve().parents[2] / "docs" / "alignment.md"
TINY = ["trainer.max_steps=2", "micro_batch_size=4", "global_batch_size=8", "trainer.log_every_n_steps=1"]


def attribute_records(n: int, seed: int, names=tuple(NAMES), unlabelled_quality_every: int = 0) -> list[dict]:
    """Records whose verbosity follows the response's length (1..12 characters -> 0..4); quality is random."""
    rng, out = random.Random(seed), []
    for i in range(n):
        length = rng.randint(1, 12)
        labels = {"quality": rng.randint(0, 4), "verbosity": round((length - 1) * 4 / 11)}
        if unlabelled_quality_every and i % unlabelled_quality_every == 0:
            del labels["quality"]
        out.append({"prompt": "".join(rng.choice("abcdefgh") for _ in range(3)) + ":",
                    "response": "".join(rng.choice("abcdefgh") for _ in range(length)),
                    "attributes": {k: v for k, v in labels.items() if k in names}})
    return out


@pytest.fixture(scope="module")
def steer_base(tmp_path_factory):
    """A tiny model whose character tokenizer writes attribute strings (digits, ',' and newlines), 64 positions."""
    return save_tiny_base(tmp_path_factory.mktemp("steer_base") / "base", CHARS, 64)


def doc_commands() -> list[str]:
    """The commands of docs/alignment.md's SteerLM section."""
    section = DOC.read_text(encoding="utf-8").split("\n## SteerLM\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The SteerLM steps as docs/alignment.md shows them, run verbatim in a folder with the files it names:
    attribute model, labelling, attribute-conditioned SFT, then steered generation (its printed text kept)."""
    root = tmp_path_factory.mktemp("steerlm")
    save_tiny_base(root / "base", CHARS, 64)
    write_jsonl(root / "attributes.jsonl", attribute_records(16, seed=1, unlabelled_quality_every=3))
    plain = [{k: r[k] for k in ("prompt", "response")} for r in attribute_records(8, seed=2)]
    plain[0]["id"] = "kept"  # other fields stay in the labelled file
    write_jsonl(root / "unlabelled.jsonl", plain)
    commands = doc_commands()
    assert len(commands) == 4 and all(c.startswith("lmforge ") for c in commands)
    printed, here = io.StringIO(), os.getcwd()
    os.chdir(root)
    try:
        for command in commands:
            with contextlib.redirect_stdout(printed):
                assert main(shlex.split(command)[1:]) == 0, command
    finally:
        os.chdir(here)
    return {"root": root, "rm": root / "apm", "plain": str(root / "unlabelled.jsonl"),
            "labelled": root / "labelled.jsonl", "sft": root / "steer", "printed": printed.getvalue()}


def test_the_documented_generate_prints_the_steered_prompt(pipeline):
    assert "abc:\nattributes: quality:4,verbosity:2\n" in pipeline["printed"]


# -- the loss ------------------------------------------------------------------------------------------------------

def test_the_loss_is_the_masked_mean_squared_error_on_fixed_numbers():
    from lmforge.align.objective import AttributeLoss

    hidden = torch.tensor([[[0.0, 0.0], [1.0, 2.0]], [[3.0, -1.0], [0.0, 0.0]]])  # (N=2, T=2, C=2)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # three attributes: x, y, (x + y) / 2

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.score = torch.nn.Linear(2, 3, bias=False)
            with torch.no_grad():
                self.score.weight.copy_(weight)

        def hidden_states(self, tokens):
            return hidden

    labels = torch.tensor([[2.0, 1000.0, 0.0], [3.0, 1.0, 4.0]])  # 1000: unlabelled, masked
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    loss = AttributeLoss(Stub(), ["x", "y", "m"])
    total, units = loss(tokens=torch.zeros(2, 2, dtype=torch.long), lengths=torch.tensor([2, 1]), labels=labels,
                        mask=mask)
    # row 0 reads position 1: (1, 2, 1.5); row 1 position 0: (3, -1, 1). By hand, the labelled errors only:
    reference = [(1 - 2) ** 2, (1.5 - 0) ** 2, (3 - 3) ** 2, (-1 - 1) ** 2, (1 - 4) ** 2]
    assert units == 5 and abs(float(total.detach()) - sum(reference)) < 1e-6
    assert abs(float(total.detach()) / units - 16.25 / 5) < 1e-6  # the step loss: NeMo-Aligner's masked mean
    metrics = loss.pop_metrics("train")
    assert metrics["mse_y"] == 4.0 and metrics["mse_y#n"] == 1.0 and metrics["mse_x#n"] == 2.0


def test_unlabelled_attributes_contribute_nothing():
    from lmforge.align.losses import attribute_squared_errors

    predictions = torch.tensor([[0.5, 2.0], [1.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    for filler in (0.0, 1e6, float("nan")):
        labels = torch.tensor([[1.0, filler], [1.0, 2.0]])
        errors = attribute_squared_errors(predictions, labels, mask)
        assert float(errors.detach().sum()) == 0.25 + 0.0 + 1.0
        (grad,) = torch.autograd.grad(errors.sum(), predictions)
        assert grad[0, 1] == 0.0 and torch.isfinite(grad).all()


def test_labels_are_clipped_and_rounded_as_steerlm_labels_them():
    from lmforge.data.steer import AttributeFormat

    fmt = AttributeFormat.of(["a", "b", "c", "d"], [0, 4])
    assert fmt.label([-0.7, 4.6, 2.5, 1.51]) == {"a": 0, "b": 4, "c": 2, "d": 2}  # 2.5: half to even


# -- the pipeline ----------------------------------------------------------------------------------------------------

def test_the_attribute_model_is_a_hugging_face_regression_model(pipeline):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lmforge.align.config import AlignSection
    from lmforge.align.data import Encoder, attribute_input
    from lmforge.align.reward import load_reward_model
    from lmforge.align.objective import score_rows

    folder = pipeline["rm"] / "reward_model"
    config = AutoConfig.from_pretrained(folder)
    assert config.num_labels == 2 and config.problem_type == "regression"
    assert config.id2label == {0: "quality", 1: "verbosity"} and config.attribute_range == [0, 4]
    hf = AutoModelForSequenceClassification.from_pretrained(folder).float().eval()
    model, tokenizer = load_reward_model(pipeline["rm"])
    rec = json.loads(open(pipeline["plain"]).readline())
    ids = attribute_input(rec, "x", Encoder(tokenizer, None, False, 64), AlignSection())
    with torch.no_grad():
        ours = score_rows(model, torch.tensor([ids]), torch.tensor([len(ids) - 1]), squeeze=False)[0]
        theirs = hf(input_ids=torch.tensor([ids])).logits[0]
    assert theirs.shape == (2,) and torch.allclose(ours, theirs, atol=1e-4)
    summary = json.loads((pipeline["rm"] / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["train_loss_last"])
    logged = [json.loads(x) for x in (pipeline["rm"] / "metrics.jsonl").read_text().splitlines()]
    assert any("mse_verbosity" in m for m in logged)


def test_the_labelled_file_holds_each_record_with_its_rounded_predictions(pipeline):
    from lmforge.align.config import AlignSection
    from lmforge.align.data import Encoder, attribute_input
    from lmforge.align.objective import score_rows
    from lmforge.align.reward import load_reward_model

    plain = [json.loads(x) for x in open(pipeline["plain"])]
    lines = [json.loads(x) for x in pipeline["labelled"].read_text().splitlines()]
    model, tokenizer = load_reward_model(pipeline["rm"])
    enc = Encoder(tokenizer, None, False, 64)
    assert len(lines) == len(plain)
    for rec, line in zip(plain, lines):
        assert {k: v for k, v in line.items() if k != "attributes"} == rec  # every field kept, "id" included
        assert list(line["attributes"]) == NAMES
        ids = attribute_input(rec, "x", enc, AlignSection())
        with torch.no_grad():
            raw = score_rows(model, torch.tensor([ids]), torch.tensor([len(ids) - 1]), squeeze=False)[0].tolist()
        assert line["attributes"] == {n: int(round(min(4.0, max(0.0, v)))) for n, v in zip(NAMES, raw)}


def test_the_generate_prompt_is_the_prompt_sft_trained_on(pipeline, tmp_path, monkeypatch, capsys):
    from lmforge.data.sft import SFTDataConfig, encode_record
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.locate import resolve_checkpoint
    from lmforge.serve.engine import Engine

    checkpoint = resolve_checkpoint(pipeline["sft"])
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.config["lmforge_steerlm"]["attributes"] == NAMES  # the format travels with the checkpoint
    record = json.loads(pipeline["labelled"].read_text().splitlines()[1])
    cfg = SFTDataConfig(input_key="prompt", output_key="response", attributes=NAMES)
    sample = encode_record(record, "x", tokenizer, cfg)
    trained_prompt = sample.ids[:sample.prompt_len]
    values = record["attributes"]
    text = f"{record['prompt']}\nattributes: quality:{values['quality']},verbosity:{values['verbosity']}\n"
    chars = lambda ids: "".join(tokenizer.id_to_token(i) for i in ids)  # noqa: E731 (WordLevel decodes with spaces)
    assert sample.prompt_text == text and chars(trained_prompt) == text

    seen = []
    generate, add_request = Engine.generate, Engine.add_request
    monkeypatch.setattr(Engine, "generate", lambda self, prompts, *a, **k: seen.extend(prompts) or
                        generate(self, prompts, *a, **k))
    monkeypatch.setattr(Engine, "add_request", lambda self, rid, ids, *a, **k: seen.append(list(ids)) or
                        add_request(self, rid, ids, *a, **k))
    steer = f"quality={values['quality']},verbosity={values['verbosity']}"
    assert main(["generate", str(pipeline["sft"]), "--prompt", record["prompt"], "--attributes", steer,
                 "--max-new-tokens", "2", "--greedy"]) == 0
    assert list(seen[-1]) == trained_prompt
    assert capsys.readouterr().out.startswith(text)

    # a prompts file: a line's own "attributes" object, else the --attributes values
    lines = write_jsonl(tmp_path / "in.jsonl", [{"prompt": record["prompt"], "attributes": values},
                                                {"prompt": record["prompt"]}])
    seen.clear()
    assert main(["generate", str(pipeline["sft"]), "--input", lines, "--output", str(tmp_path / "out.jsonl"),
                 "--attributes", "quality=0,verbosity=4", "--max-new-tokens", "2", "--greedy"]) == 0
    assert seen[0] == trained_prompt
    assert chars(seen[1]) == f"{record['prompt']}\nattributes: quality:0,verbosity:4\n"
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["attributes"] for o in out] == [values, {"quality": 0, "verbosity": 4}]


@pytest.mark.parametrize("steer, says", [
    ("quality=4,humor=1,verbosity=2", "unknown attribute 'humor'; the attributes are quality, verbosity"),
    ("quality=5,verbosity=2", "attribute quality=5 is out of range; values lie in [0, 4]"),
    ("quality=4", "missing attribute value(s) for verbosity"),
])
def test_bad_steering_values_are_one_error_line(pipeline, capsys, steer, says):
    assert main(["generate", str(pipeline["sft"]), "--prompt", "abc:", "--attributes", steer]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --attributes: {says}"), err


def test_steering_a_model_without_attributes_is_refused(steer_base, tmp_path, capsys):
    assert main(["generate", steer_base, "--prompt", "abc:", "--attributes", "quality=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not fine-tuned with sft.attributes" in err[0]
    lines = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "abc:"}, {"prompt": "abc:", "attributes": {"quality": 4}}])
    assert main(["generate", steer_base, "--input", lines, "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {lines}:2 (id 2): the line has 'attributes'")
    assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_text()


BAD = [
    ({"quality": 2, "humor": 1}, ":2: unknown attribute 'humor'; the attributes are quality, verbosity"),
    ({"quality": 7, "verbosity": 1}, ":2: attribute quality=7 is out of range; values lie in [0, 4]"),
    (None, ":2: the record has no 'attributes' field"),
]


@pytest.mark.parametrize("labels, says", BAD)
def test_bad_labels_stop_the_attribute_model_with_one_line(steer_base, tmp_path, capsys, labels, says):
    recs = attribute_records(4, seed=3)
    if labels is None:
        del recs[1]["attributes"]
    else:
        recs[1]["attributes"] = labels
    data = write_jsonl(tmp_path / "attr.jsonl", recs)
    out = tmp_path / "rm"
    assert main(["align", "--method", "regression_rm", "--model", steer_base, "--data", data, "--out", str(out),
                 ALIGN_ATTRS, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}{says}"), err
    assert not out.exists()


@pytest.mark.parametrize("labels, says", BAD + [({"quality": 2}, ":2: missing attribute value(s) for verbosity")])
def test_bad_labels_stop_attribute_conditioned_sft_with_one_line(steer_base, tmp_path, capsys, labels, says):
    recs = attribute_records(4, seed=3)
    if labels is None:
        del recs[1]["attributes"]
    else:
        recs[1]["attributes"] = labels
    data = write_jsonl(tmp_path / "sft.jsonl", recs)
    out = tmp_path / "sft"
    assert main(["finetune", "--method", "full", "--model", steer_base, "--data", data, "--out", str(out),
                 *SFT_ATTRS, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}{says}"), err
    assert not out.exists()


def test_settings_that_would_not_act_are_refused(steer_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", attribute_records(4, seed=3))
    assert main(["finetune", "--model", steer_base, "--data", data, "sft.attribute_range=[0,9]"]) == 2
    assert "sft.attribute_range applies to attribute-conditioned SFT: set sft.attributes too" in capsys.readouterr().err
    assert main(["align", "--method", "rm", "--model", steer_base, "--data", data, ALIGN_ATTRS]) == 2
    assert "align.attributes applies to method=regression_rm, not rm" in capsys.readouterr().err
    assert main(["finetune", "--model", steer_base, "--data", data, "sft.attributes=[quality]",
                 "sft.attribute_template={prompt} [x]"]) == 2
    assert "must hold {prompt} and {attributes}" in capsys.readouterr().err


# -- PEFT attribute models ------------------------------------------------------------------------------------------

def test_a_lora_attribute_model_trains_resumes_exports_merged_and_labels(steer_base, tmp_path):
    """`--peft lora`: LoRA and the new score head train (the head saved with the adapter weights in every
    checkpoint, and read back on resume); reward_model/ is the LoRA merged into the base weights with the head, which
    Hugging Face loads to the unmerged model's scores; `lmforge reward` labels with it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lmforge.align.config import AlignSection
    from lmforge.align.data import Encoder, attribute_input
    from lmforge.align.objective import score_rows
    from lmforge.open import load_for_inference
    from lmforge.peft import apply_adapter

    data = write_jsonl(tmp_path / "attr.jsonl", attribute_records(16, seed=1, unlabelled_quality_every=3))
    out = tmp_path / "apm"
    command = ["align", "--method", "regression_rm", "--peft", "lora", "--model", steer_base, "--data", data,
               "--out", str(out), ALIGN_ATTRS, "peft.lora.r=4", "optim.lr=0.01", *TINY]
    assert main(command) == 0
    first = load_file(str(out / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert "score.weight" in first and all("lora_" in k for k in first if k != "score.weight")
    assert main(command[:-4] + ["trainer.max_steps=3", *TINY[1:]]) == 0  # resumes at step 2: adapter and head
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["peft"], summary["steps"]) == ("lora", 3) and summary["adapter"] == str(out / "adapter")
    assert summary["resumed_from"] == str(out / "checkpoints" / "step_0000002")
    last = load_file(str(out / "checkpoints" / "step_0000003" / "model.safetensors"))
    head = last["score.weight"]
    assert not torch.equal(head, first["score.weight"])  # the head trains beside LoRA

    folder = out / "reward_model"
    config = AutoConfig.from_pretrained(folder)
    assert config.num_labels == 2 and config.problem_type == "regression"
    assert config.id2label == {0: "quality", 1: "verbosity"}
    hf = AutoModelForSequenceClassification.from_pretrained(folder).float().eval()
    # the reference: the base model with the adapter applied unmerged, and the checkpoint's head
    model, tokenizer = load_for_inference(steer_base, device="cpu", dtype="float32")
    model = apply_adapter(model, out / "adapter")
    model.score = torch.nn.Linear(head.shape[1], 2, bias=False)
    with torch.no_grad():
        model.score.weight.copy_(head)
    base_q = load_file(str(Path(steer_base) / "model.safetensors"))["layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(hf.model.layers[0].self_attn.q_proj.weight, base_q)  # LoRA merged in
    enc = Encoder(tokenizer, None, False, 64)
    records = [json.loads(x) for x in open(data)]
    rows = [attribute_input(r, "x", enc, AlignSection()) for r in records[:4]]
    with torch.no_grad():
        for ids in rows:
            ours = score_rows(model.eval(), torch.tensor([ids]), torch.tensor([len(ids) - 1]), squeeze=False)[0]
            theirs = hf(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)

    labelled = tmp_path / "labelled.jsonl"
    assert main(["reward", str(out), "--data", data, "--out", str(labelled)]) == 0
    lines = [json.loads(x) for x in labelled.read_text().splitlines()]
    with torch.no_grad():
        for ids, line in zip(rows, lines):
            raw = hf(input_ids=torch.tensor([ids])).logits[0].tolist()
            assert line["attributes"] == {n: int(round(min(4.0, max(0.0, v)))) for n, v in zip(NAMES, raw)}


def test_peft_methods_an_attribute_model_cannot_export_are_refused(steer_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", attribute_records(4, seed=3))
    assert main(["align", "--method", "regression_rm", "--peft", "adapter", "--model", steer_base, "--data", data,
                 "--out", str(tmp_path / "o"), ALIGN_ATTRS]) == 2
    assert "method=regression_rm with --peft adapter: an attribute model trains all weights or LoRA" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- learning --------------------------------------------------------------------------------------------------------

def test_the_attribute_model_learns_an_attribute_that_follows_length(steer_base, tmp_path):
    """Verbosity is the response's length in five steps; 40 steps bring the held-out squared error well under the
    labels' variance (what predicting their mean scores)."""
    from lmforge.align.reward import score_file

    train = write_jsonl(tmp_path / "train.jsonl", attribute_records(256, seed=1, names=("verbosity",)))
    held = attribute_records(64, seed=2, names=("verbosity",))
    held_file = write_jsonl(tmp_path / "held.jsonl", held)
    out = tmp_path / "rm"
    assert main(["align", "--method", "regression_rm", "--model", steer_base, "--data", train, "--out", str(out),
                 "align.attributes=[verbosity]", "trainer.max_steps=40", "micro_batch_size=16",
                 "global_batch_size=16", "optim.lr=0.003", "trainer.log_every_n_steps=10"]) == 0
    labels = [r["attributes"]["verbosity"] for r in held]
    mean = sum(labels) / len(labels)
    variance = sum((v - mean) ** 2 for v in labels) / len(labels)
    summary = score_file(out, held_file)
    assert summary["mse"]["verbosity"] < 0.5 * variance, (summary, variance)


def test_chat_records_and_chat_lines_are_conditioned_alike(steer_base):
    """A chat record trains with the attribute line after every assistant turn's generation prompt; a `generate`
    messages line holding the same history gets the same ids up to where the last answer starts."""
    from types import SimpleNamespace

    from lmforge.data.sft import SFTDataConfig, encode_record
    from lmforge.data.steer import AttributeFormat
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.serve.cli import PromptLine, Steering, _prompt_ids

    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = load_tokenizer(steer_base)
    tokenizer.config["chat_template"] = template
    values = {"quality": 3, "verbosity": 1}
    history = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"},
               {"role": "user", "content": "de"}]
    record = {"messages": history + [{"role": "assistant", "content": "ed"}], "attributes": values}
    sample = encode_record(record, "x", tokenizer, SFTDataConfig(chat_template=template, attributes=NAMES))
    chars = "".join(tokenizer.id_to_token(i) for i in sample.ids)
    line = "\nattributes: quality:3,verbosity:1\n"
    assert chars == f"user: abc\nassistant: {line}cba\nuser: de\nassistant: {line}ed\n"
    trained = "".join(tokenizer.id_to_token(i) for i, m in zip(sample.ids, sample.mask) if m)
    assert trained == "cba\ned\n"  # the answers (and the turn ends), never the attribute lines
    last = max(i for i in range(len(sample.mask)) if sample.mask[i] and not sample.mask[i - 1])

    engine = SimpleNamespace(tokenizer=tokenizer)
    fmt = AttributeFormat.of(NAMES)
    ids = _prompt_ids(engine, PromptLine(1, 0, 1, {"messages": history, "attributes": values}), "in:1", {},
                      Steering(fmt))
    assert ids == sample.ids[:last]
    ids = _prompt_ids(engine, PromptLine(1, 0, 1, {"messages": history}), "in:1", {}, Steering(fmt, values))
    assert ids == sample.ids[:last]  # --attributes for a line without its own


# -- steering through `lmforge serve` ---------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


@contextlib.contextmanager
def served(folder, chat_template=None):
    """An OpenAI-style app over ``folder`` (FastAPI's TestClient) and the prompt ids the engine was given."""
    from fastapi.testclient import TestClient

    from lmforge.serve.client import AsyncEngineClient
    from lmforge.serve.engine import Engine, engine_from_checkpoint
    from lmforge.serve.server import build_app

    engine = engine_from_checkpoint(folder, device="cpu", dtype="float32", max_batch_size=2)
    if chat_template:
        engine.tokenizer.config["chat_template"] = chat_template
    seen, add_request = [], Engine.add_request

    def record(self, rid, ids, *a, **k):
        seen.append(list(ids))
        return add_request(self, rid, ids, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "add_request", record)
        with TestClient(build_app(AsyncEngineClient(engine, "m"))) as client:
            yield client, seen


def test_served_completions_are_steered_as_generate_steers(pipeline, monkeypatch, capsys):
    """A request's attributes (an object, or NeMo-Aligner's attribute string) give the prompt ids `generate
    --attributes` gives; echo shows the conditioned prompt."""
    from lmforge.serve.engine import Engine

    generated, add_request = [], Engine.add_request
    monkeypatch.setattr(Engine, "add_request", lambda self, rid, ids, *a, **k: generated.append(list(ids)) or
                        add_request(self, rid, ids, *a, **k))
    monkeypatch.setattr(Engine, "generate", lambda self, prompts, *a, **k: generated.extend(map(list, prompts)) or
                        [[] for _ in prompts])
    assert main(["generate", str(pipeline["sft"]), "--prompt", "abc:", "--attributes", "quality=1,verbosity=3",
                 "--max-new-tokens", "1", "--greedy"]) == 0
    capsys.readouterr()
    monkeypatch.undo()
    want = generated[-1]
    with served(pipeline["sft"]) as (client, seen):
        for attributes in ({"quality": 1, "verbosity": 3}, {"verbosity": 3.0, "quality": 1}, "quality:1,verbosity:3"):
            r = client.post("/v1/completions", json={"model": "m", "prompt": "abc:", "attributes": attributes,
                                                     "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
            assert seen.pop() == want and r.json()["usage"]["prompt_tokens"] == len(want)
        r = client.post("/v1/completions", json={"model": "m", "prompt": ["abc:", "de:"], "echo": True,
                                                 "max_tokens": 0, "attributes": "quality:1,verbosity:3"})
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == ["abc:\nattributes: quality:1,verbosity:3\n",
                                                            "de:\nattributes: quality:1,verbosity:3\n"]
        r = client.post("/v1/completions", json={"model": "m", "prompt": "abc:", "max_tokens": 1})
        assert r.status_code == 200 and len(seen.pop()) == len("abc:")  # no attributes: the prompt as sent


def test_served_chat_is_steered_as_fine_tuning_conditioned_it(pipeline):
    """A chat request with attributes gets the attribute line after the generation prompt: the ids of the trained
    conversation up to where its answer starts (64 positions leave no room for history; the history's lines come
    from the same function, checked above)."""
    from lmforge.data.sft import SFTDataConfig, encode_record
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.locate import resolve_checkpoint

    tokenizer = load_tokenizer(resolve_checkpoint(pipeline["sft"]))
    tokenizer.config["chat_template"] = CHAT_TEMPLATE
    values = {"quality": 3, "verbosity": 1}
    history = [{"role": "user", "content": "abc"}]
    record = {"messages": history + [{"role": "assistant", "content": "cba"}], "attributes": values}
    sample = encode_record(record, "x", tokenizer, SFTDataConfig(chat_template=CHAT_TEMPLATE, attributes=NAMES))
    last = sample.mask.index(1)
    assert "".join(tokenizer.id_to_token(i) for i in sample.ids[:last]).endswith(
        "assistant: \nattributes: quality:3,verbosity:1\n")
    with served(pipeline["sft"], CHAT_TEMPLATE) as (client, seen):
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": history, "max_tokens": 1,
                                                      "attributes": "quality:3,verbosity:1"})
        assert r.status_code == 200, r.text
        assert seen == [sample.ids[:last]]


@pytest.mark.parametrize("route, extra, says", [
    ("completions", {"attributes": {"quality": 4, "humor": 1, "verbosity": 2}},
     "attributes: unknown attribute 'humor'; the attributes are quality, verbosity"),
    ("completions", {"attributes": "quality:5,verbosity:2"},
     "attributes: attribute quality=5 is out of range; values lie in [0, 4]"),
    ("chat/completions", {"attributes": {"quality": 4}}, "attributes: missing attribute value(s) for verbosity"),
    ("completions", {"attributes": {"quality": 4, "verbosity": 2}, "prompt": [1, 2, 3]},
     "attributes steer text prompts"),
])
def test_bad_served_attributes_are_400_with_one_message(pipeline, route, extra, says):
    with served(pipeline["sft"], CHAT_TEMPLATE) as (client, seen):
        body = {"model": "m", "max_tokens": 1, **({"prompt": "abc:"} if route == "completions" else
                                                  {"messages": [{"role": "user", "content": "abc"}]}), **extra}
        r = client.post(f"/v1/{route}", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"].startswith(says) and "\n" not in error["message"], error
        assert error["type"] == "invalid_request_error" and seen == []


def test_a_model_without_attributes_refuses_served_attributes(steer_base):
    with served(steer_base, CHAT_TEMPLATE) as (client, seen):
        for route, body in (("completions", {"prompt": "abc:"}),
                            ("chat/completions", {"messages": [{"role": "user", "content": "abc"}]})):
            r = client.post(f"/v1/{route}", json={"model": "m", "max_tokens": 1, "attributes": "quality:4", **body})
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert message.startswith("attributes: the served model 'm' was not fine-tuned with sft.attributes, so "
                                      "it has no SteerLM attribute format to fill"), message
        assert seen == []
        assert client.post("/v1/completions", json={"model": "m", "prompt": "abc:", "max_tokens": 1}).status_code == 200


# -- NeMo Launcher's steerlm_reg stage ------------------------------------------------------------------------------

#: NeMo Framework Launcher's conf/steerlm_reg/rw_sft/training_rm.yaml, its every key, shrunk to the tiny model (the
#: sizes, steps and files changed; trainer.precision 32 on a CPU; the optimizer the single-process AdamW; the model
#: the converted one in run.convert_dir, where NeMo's names a .nemo file).
NEMO_RW_SFT = """\
run:
  name: ${.task_name}_${.model_train_name}
  time_limit: "00:20:00"
  dependency: "singleton"
  convert_name: convert_nemo
  model_train_name: tiny_steerlm_reg
  convert_dir: ${base_results_dir}/${steerlm_reg.run.model_train_name}/${steerlm_reg.run.convert_name}
  task_name: "oasst"
  results_dir: ${base_results_dir}/${steerlm_reg.run.model_train_name}/${steerlm_reg.run.task_name}
trainer:
  num_nodes: 1
  devices: 1
  accelerator: cpu
  precision: 32
  rm:
    max_epochs: 1
    max_steps: 2
    val_check_interval: 2
    save_interval: 2
    limit_val_batches: 1.0
    gradient_clip_val: 1.0
  logger: False
  enable_checkpointing: False
  use_distributed_sampler: False
  max_time: null
  max_epochs: 1
  max_steps: 100
exp_manager:
  explicit_log_dir: ${base_results_dir}/results
  exp_dir: null
  name: megatron_gpt
  max_time_per_run: null
  create_wandb_logger: False
  wandb_logger_kwargs:
    project: nemo_aligner_rm
    name: steerlm_reg_gpt3_rm
  resume_from_checkpoint: null
  resume_if_exists: True
  resume_ignore_no_checkpoint: True
  create_checkpoint_callback: True
  checkpoint_callback_params:
    monitor: val_loss
    save_top_k: 1
    mode: min
    always_save_nemo: False
    save_nemo_on_train_end: True
    filename: 'megatron_gpt--{val_loss:.3f}-{step}-{consumed_samples}-{epoch}'
    model_parallel_size: ${multiply:${steerlm_reg.model.tensor_model_parallel_size}, ${steerlm_reg.model.pipeline_model_parallel_size}}
pretrained_checkpoint:
  restore_from_path: ${steerlm_reg.run.convert_dir}
model:
  mcore_gpt: True
  share_embeddings_and_output_weights: False
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: 1
  activations_checkpoint_granularity: "selective"
  activations_checkpoint_method: "uniform"
  reward_model_type: regression
  regression:
    num_attributes: 9
    merge_attributes: False
    attribute_weights: null
    loss_mask_val: -100
  output_sequence: False
  use_avg_pool: False
  force_head_dtype: float32
  micro_batch_size: 4
  global_batch_size: 8
  megatron_amp_O2: True
  encoder_seq_length: 64
  max_position_embeddings: 64
  seed: 1234
  optim:
    name: adamw
    bucket_cap_mb: 200
    overlap_grad_sync: False
    contiguous_grad_buffer: True
    lr: 3e-3
    weight_decay: 0.1
    betas:
    - 0.9
    - 0.98
    sched:
      name: CosineAnnealing
      warmup_steps: 1
      constant_steps: 0
      min_lr: 3e-4
  data:
    data_impl: jsonl
    splits_string: null
    seq_length: 64
    skip_warmup: True
    num_workers: 2
    dataloader_type: single
    reset_position_ids: False
    reset_attention_mask: False
    eod_mask_loss: False
    index_mapping_dir: null
    data_prefix: {train: ["${data_dir}/train_reg.jsonl"], validation: ["${data_dir}/val_reg.jsonl"], test: ["${data_dir}/val_reg.jsonl"]}
  precision: 32
"""


def nemo_steerlm_tree(root: Path, body: str = NEMO_RW_SFT) -> Path:
    """A launch config folder as NeMo Launcher users write it: config.yaml choosing rw_sft/training_rm."""
    conf = root / "conf"
    (conf / "steerlm_reg" / "rw_sft").mkdir(parents=True)
    (conf / "steerlm_reg" / "rw_sft" / "training_rm.yaml").write_text(body)
    (conf / "config.yaml").write_text(
        "defaults:\n  - _self_\n  - steerlm_reg: rw_sft/training_rm\nstages:\n  - steerlm_reg\n"
        f"cluster_type: local\nbase_results_dir: {root / 'results'}\ndata_dir: {root / 'data'}\n")
    return conf / "config.yaml"


def test_nemo_steerlm_reg_stage_trains_the_attribute_model_locally(tmp_path, capsys):
    """NeMo Launcher's steerlm_reg stage with its rw_sft body runs `lmforge align --method regression_rm` with the
    keys translated: nine outputs named as NeMo-Aligner's attributes, NeMo's batch, steps, optimizer and files."""
    import yaml
    from transformers import AutoConfig

    from lmforge.data.steer import DEFAULT_ATTRIBUTES

    save_tiny_base(tmp_path / "results" / "tiny_steerlm_reg" / "convert_nemo", CHARS, 64)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train_reg.jsonl", attribute_records(16, seed=1, unlabelled_quality_every=3))
    write_jsonl(tmp_path / "data" / "val_reg.jsonl", attribute_records(8, seed=2))
    config = nemo_steerlm_tree(tmp_path)
    assert main(["launch", str(config)]) == 0
    out = tmp_path / "results" / "results"
    stage_cfg = yaml.safe_load((tmp_path / "results" / "tiny_steerlm_reg" / "oasst" / "steerlm_reg_config.yaml")
                               .read_text())
    assert stage_cfg["method"] == "regression_rm" and stage_cfg["out"] == str(out)
    assert stage_cfg["align"]["attributes"] == list(DEFAULT_ATTRIBUTES)
    assert (stage_cfg["micro_batch_size"], stage_cfg["global_batch_size"], stage_cfg["seq_length"]) == (4, 8, 64)
    assert stage_cfg["trainer"]["limit_val_batches"] > 1
    # NeMo's selective (its method ignored, as Megatron-core does): the attention core recomputed, not whole blocks
    assert (stage_cfg["activations_checkpoint_granularity"], stage_cfg["activations_checkpoint_method"]) == (
        "selective", "uniform") and "gradient_checkpointing" not in stage_cfg
    assert (stage_cfg["optim"]["lr"], stage_cfg["optim"]["min_lr"], stage_cfg["optim"]["warmup_steps"]) == (
        3e-3, 3e-4, 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "regression_rm" and summary["steps"] == 2
    hf = AutoConfig.from_pretrained(out / "reward_model")
    assert hf.num_labels == 9 and list(hf.id2label.values()) == list(DEFAULT_ATTRIBUTES)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_mse_verbosity" in m for m in logged)  # the validation split was read
    assert "data_prefix.test: NeMo's reward-model script trains and validates" in capsys.readouterr().out


@pytest.mark.parametrize("edit, says", [
    (("trainer:\n  num_nodes", "trainer:\n  sft:\n    max_steps: 2\n  num_nodes"),
     "steerlm_reg.trainer.sft: this is NeMo's ac_sft body"),
    (("num_attributes: 9", "num_attributes: 5"), "steerlm_reg.model.regression.num_attributes=5: a NeMo attribute "
                                                 "model names no attributes"),
    (("reward_model_type: regression", "reward_model_type: binary_ranking"),
     "steerlm_reg.model.reward_model_type='binary_ranking': a steerlm_reg stage trains the regression"),
    (("save_interval: 2", "save_interval: 1"), "steerlm_reg.trainer.rm.save_interval=1: lmforge saves a checkpoint "
                                               "at each validation"),
    (("merge_attributes: False", "merge_attributes: True"),
     "steerlm_reg.model.regression.merge_attributes=True: lmforge supports False"),
    (("use_avg_pool: False", "use_avg_pool: False\n  sequence_parallel: True"),
     "steerlm_reg.model.sequence_parallel: NeMo's steerlm_reg key has no lmforge meaning"),
    (("  precision: 32\n  rm:", "  precision: fp16\n  rm:"),
     "steerlm_reg.trainer.precision='fp16': lmforge trains at mixed 16 or bf16"),
    (("  precision: 32\n  rm:", "  precision: bf16\n  rm:"),  # the model's precision (32) left as it was
     "steerlm_reg.model.precision=32: lmforge runs the model at one precision, trainer.precision='bf16'"),
])
def test_nemo_steerlm_reg_keys_lmforge_cannot_honour_are_named(tmp_path, capsys, edit, says):
    assert edit[0] in NEMO_RW_SFT
    config = nemo_steerlm_tree(tmp_path, NEMO_RW_SFT.replace(*edit, 1))
    assert main(["launch", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {says}"), err
    assert not (tmp_path / "results" / "results").exists()


# -- the example pipeline ------------------------------------------------------------------------------------------

STEER_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipeline" / "conf" / "steerlm.yaml"


def test_example_steerlm_pipeline_dry_run(tmp_path, monkeypatch, capsys):
    """examples/pipeline/conf/steerlm.yaml as its header shows it (--dry-run): every stage checked at launch."""
    monkeypatch.chdir(tmp_path)
    assert main(["launch", str(STEER_EXAMPLE), "cluster_type=local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    r = Path("results") / "steerlm"
    for line in ("lmforge pretrain", "lmforge align " + str(r / "attribute_model" / "steerlm_reg_config.yaml"),
                 "lmforge reward " + str(r / "attribute_model"), "--out " + str(r / "label" / "labelled.jsonl"),
                 "lmforge finetune " + str(r / "steer_sft" / "fine_tuning_config.yaml"),
                 "lmforge generate " + str(r / "steer_sft"), "--attributes quality=4,verbosity=0"):
        assert line in out, line
    assert not (r / "steer_sft" / "COMPLETED").exists()


def test_example_steerlm_stages_run_locally(tmp_path, monkeypatch, steer_base):
    """The example's attribute model -> labelling -> attribute-conditioned SFT -> steered generation, a few steps
    each on the tiny model (its character tokenizer covers the example's data and attribute strings)."""
    monkeypatch.chdir(tmp_path)
    r = tmp_path / "r"
    assert main(["launch", str(STEER_EXAMPLE), "cluster_type=local", f"base_results_dir={r}",
                 "stages=[steerlm_reg,evaluation,fine_tuning,generation]", f"steerlm_reg.model={steer_base}",
                 f"fine_tuning.model={steer_base}", "steerlm_reg.trainer.max_steps=2", "fine_tuning.trainer.max_steps=2",
                 "generation.options.max_new_tokens=2"]) == 0
    data = STEER_EXAMPLE.parent.parent / "data"
    unlabelled = [json.loads(x) for x in (data / "steer_unlabelled.jsonl").read_text().splitlines()]
    labelled = [json.loads(x) for x in (r / "label" / "labelled.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in x.items() if k != "attributes"} for x in labelled] == unlabelled
    assert all(set(x["attributes"]) == {"quality", "verbosity"} for x in labelled)
    sft = json.loads((r / "steer_sft" / "summary.json").read_text())
    assert sft["steps"] == 2
    from lmforge.locate import resolve_checkpoint

    stored = json.loads((Path(resolve_checkpoint(r / "steer_sft")) / "tokenizer_config.json").read_text())
    assert stored["lmforge_steerlm"]["attributes"] == ["quality", "verbosity"]  # conditioned SFT, format stored
    out = [json.loads(x) for x in (r / "steered" / "steered.jsonl").read_text().splitlines()]
    prompts = [json.loads(x) for x in (data / "steer_prompts.jsonl").read_text().splitlines()]
    assert [o["id"] for o in sorted(out, key=lambda o: o["id"])] == [p["id"] for p in prompts]
    by_id = {o["id"]: o["attributes"] for o in out}
    assert by_id[1] == {"quality": 4, "verbosity": 4}  # the line's own values
    assert all(by_id[i] == {"quality": 4, "verbosity": 0} for i in (0, 2, 3))  # the stage's --attributes
