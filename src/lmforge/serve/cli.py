"""The ``serve`` and ``generate`` commands.

``lmforge serve MODEL`` starts the OpenAI-compatible server; ``lmforge generate MODEL --prompt TEXT``
completes one prompt, and ``lmforge generate MODEL --input prompts.jsonl --output out.jsonl`` runs a
file of prompts through the continuous-batching engine (resumable: prompts already answered in the
output are skipped). ``--attributes quality=4,...`` (or a line's ``"attributes"`` object) steers a SteerLM model:
the prompt gets the attribute string its fine-tuning used (:mod:`lmforge.data.steer`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lmforge.data.jsonl import iter_jsonl
from lmforge.data.prompts import encode_prompt
from lmforge.errors import DataError, UserError

__all__ = ["add_commands", "generate_file", "read_prompts", "answered_ids", "PromptLine"]

DTYPES = ["auto", "float32", "bfloat16", "float16"]


def _add_cache_flags(p) -> None:
    """The paged KV cache's and the scheduler's flags (serve and generate)."""
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="most tokens one step feeds (decode tokens and prompt chunks together); longer prompts are "
                        "prefilled in chunks while running requests go on decoding")
    p.add_argument("--block-size", type=int, default=16, help="positions per KV-cache block")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the GPU's memory to use in all; the KV cache gets what the weights and a step's "
                        "activations leave (GPU only)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-kv-blocks", type=int, default=None,
                      help="KV-cache blocks (instead of sizing from memory; the CPU default is --max-batch-size "
                           "sequences of --max-seq-len)")
    size.add_argument("--kv-cache-memory", default=None, help="memory for the KV cache, e.g. 4GB or 512MB")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of earlier requests with the same prompt prefix")
    p.add_argument("--admission-batch", type=int, default=1,
                   help="while requests run, admit queued ones only once this many rows are free (or as many as "
                        "wait), so several prompts share one prefill; 1 admits into every row as it frees")


def _add_tp_flag(p) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N GPUs (its attention heads and MLP; one process each, started by this "
                        "command); N must divide the attention heads, key/value heads and ffn size")


def cache_kwargs(a) -> dict:
    """Engine keyword arguments of :func:`_add_cache_flags`' flags (checked: one ``error:`` line each)."""
    from lmforge.config.estimate import parse_memory_size

    for flag, value in (("--max-num-batched-tokens", a.max_num_batched_tokens), ("--block-size", a.block_size),
                        ("--num-kv-blocks", a.num_kv_blocks), ("--admission-batch", a.admission_batch)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not 0 < a.gpu_memory_utilization <= 1:
        raise UserError(f"--gpu-memory-utilization must be in (0, 1], got {a.gpu_memory_utilization}")
    memory = None
    if a.kv_cache_memory is not None:
        memory = parse_memory_size(a.kv_cache_memory, "--kv-cache-memory")
    return dict(max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
                gpu_memory_utilization=a.gpu_memory_utilization, num_kv_blocks=a.num_kv_blocks,
                kv_cache_memory=memory, enable_prefix_caching=not a.no_prefix_caching,
                admission_batch=a.admission_batch)


def add_commands(sub) -> None:
    """Register ``serve`` and ``generate`` on the ``lmforge`` subparsers."""
    _add_serve(sub)
    _add_generate(sub)


# ----------------------------------------------------------------------------------------------
# serve


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="an lmforge checkpoint (or a results/checkpoints folder: its latest) or a Hugging Face model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY; none when unset)")
    p.add_argument("--model-name", default=None, help="the name clients send as 'model' (default: the folder name)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="positions per sequence, prompt + output (default: the model's context, at most 8192)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (413 above)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens accepted (400 above)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body accepted, checked before parsing (413 above; default 64 bytes per "
                        "prompt token of --max-prompt-tokens, at least 1 MiB)")
    p.add_argument("--max-pending", type=int, default=256, help="requests queued or running before 503")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step and capture its CUDA graphs at start-up (GPU)")
    p.add_argument("--compile-prefill", action="store_true",
                   help="compile the prefill forward with torch.compile, every shape class at start-up (a progress "
                        "line each and the time it took; nothing compiles while requests wait)")
    _add_cache_flags(p)
    p.add_argument("--adapter", default=None, help="a fine-tuned adapter folder (LoRA/DoRA, IA3, bottleneck adapters), "
                   "merged into the served model")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter that requests select by sending NAME as 'model' (repeat for more); "
                        "requests mix adapters in one batch")
    _add_tp_flag(p)
    p.set_defaults(func=_cmd_serve)


def parse_loras(items: list[str]) -> dict[str, str]:
    """``["sql=adapters/sql", ...]`` -> ``{"sql": "adapters/sql"}``; a malformed or repeated name is a UserError."""
    loras: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise UserError(f"--lora {item!r}: write NAME=DIR, e.g. --lora sql=results/sql_lora/adapter")
        if name in loras:
            raise UserError(f"--lora {name!r} is given twice; each adapter needs its own name")
        loras[name] = folder
    return loras


def _cmd_serve(a) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from None
    from lmforge.serve.server import run_server

    if a.max_request_bytes is not None and a.max_request_bytes < 1:
        raise UserError(f"--max-request-bytes must be a positive number of bytes, got {a.max_request_bytes}")
    if _tensor_parallel(a, {"--compile": a.compile, "--compile-prefill": a.compile_prefill, "--lora": bool(a.lora)}):
        from lmforge.serve.tensor_parallel import launch

        launch(a.tensor_parallel_size, a.device, _serve_rank, a)
        return 0
    run_server(a.model, host=a.host, port=a.port, api_key=a.api_key, model_name=a.model_name,
               max_batch_size=a.max_batch_size, max_seq_len=a.max_seq_len, max_prompt_tokens=a.max_prompt_tokens,
               max_tokens_limit=a.max_tokens_limit, max_pending=a.max_pending, device=a.device, dtype=a.dtype,
               compile_decode=a.compile, compile_prefill=a.compile_prefill, adapter=a.adapter,
               loras=parse_loras(a.lora), max_request_bytes=a.max_request_bytes, **cache_kwargs(a))
    return 0


def _tensor_parallel(a, refused: dict[str, bool]) -> bool:
    """Whether ``a`` asks for tensor parallelism (``--tensor-parallel-size`` above 1), checked before any rank
    starts: the flags (``refused``: those not supported with it), the GPUs and the model's sizes."""
    from lmforge.serve.tensor_parallel import check_adapters, check_flags, check_model, model_config

    check_flags(a.tensor_parallel_size, a.device, refused)
    if a.tensor_parallel_size == 1:
        return False
    cache_kwargs(a)  # the cache flags' errors, once, here
    check_adapters(a.model, a.adapter)
    check_model(model_config(a.model), a.tensor_parallel_size)
    return True


def _serve_rank(ctx, a) -> None:
    """One rank of ``serve --tensor-parallel-size``: rank 0 serves HTTP, the others follow its engine steps."""
    from lmforge.serve.server import serve_engine
    from lmforge.serve.tensor_parallel import load_engine

    engine = load_engine(ctx, a.model, dtype=a.dtype, adapter=a.adapter, max_batch_size=a.max_batch_size,
                         max_seq_len=a.max_seq_len, **cache_kwargs(a))
    if ctx.rank > 0:
        engine.follow()
        return
    import signal

    # uvicorn stops on SIGINT/SIGTERM, then raises the signal again with the handlers it found: these, which let
    # rank 0 tell the other ranks to stop and return (the default ones would end it at once).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        serve_engine(engine, a.model, host=a.host, port=a.port, api_key=a.api_key, model_name=a.model_name,
                     max_prompt_tokens=a.max_prompt_tokens, max_tokens_limit=a.max_tokens_limit,
                     max_pending=a.max_pending, max_request_bytes=a.max_request_bytes)
    finally:
        engine.close()


# ----------------------------------------------------------------------------------------------
# generate


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt, or a JSONL file of prompts, with a trained model")
    p.add_argument("model", help="an lmforge checkpoint (or a results/checkpoints folder: its latest) or a Hugging Face model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; the completion is printed after it")
    src.add_argument("--input", help="JSONL file: one object per line with 'prompt' (or chat 'messages'), "
                                     "optionally 'id', 'adapter' (a --lora name) and per-line "
                                     "max_tokens/temperature/top_p/top_k/seed/stop")
    p.add_argument("--output", help="JSONL file of completions (with --input); prompts already answered are skipped")
    p.add_argument("--attributes", default=None, metavar="NAME=VALUE,...",
                   help="steer a SteerLM model (fine-tuned with sft.attributes): its attribute values, e.g. "
                        "quality=4,toxicity=0,...; every attribute it was trained with, in its range (with --input: "
                        "the values of lines without their own \"attributes\")")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed (with --input, line i uses seed + i)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--adapter", default=None, help="a fine-tuned adapter folder (LoRA/DoRA, IA3, bottleneck adapters)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter that --input lines select with \"adapter\": NAME (repeat for more)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step and capture its CUDA graphs at start-up (GPU)")
    _add_cache_flags(p)
    _add_tp_flag(p)
    p.set_defaults(func=_cmd_generate)


#: Per-line sampling keys of a prompts file: the JSON types each takes, and how to say so.
LINE_KEYS = {"max_tokens": ((int,), "an integer"), "temperature": ((int, float), "a number"),
             "top_p": ((int, float), "a number"), "top_k": ((int,), "an integer"), "seed": ((int,), "an integer"),
             "stop": ((str, list), "a string or a list of strings")}


def _params(a, seed: Optional[int], overrides: Optional[dict] = None):
    """The SamplingParams of the command line, with a prompts-file line's own values (``overrides``) on top.

    Raises:
        InvalidRequestError: a value of the wrong type or outside its range (naming the key).
    """
    from lmforge.serve.engine import InvalidRequestError, SamplingParams

    o = overrides or {}
    for key, (types, kind) in LINE_KEYS.items():
        value = o.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise InvalidRequestError(f"{key!r} must be {kind}, got {json.dumps(value)}", key)
    stop = o.get("stop") or []
    params = SamplingParams(max_tokens=o.get("max_tokens", a.max_new_tokens),
                            temperature=0.0 if a.greedy else float(o.get("temperature", a.temperature)),
                            top_k=o.get("top_k", a.top_k), top_p=float(o.get("top_p", a.top_p or 1.0)),
                            seed=o.get("seed", seed), stop=[stop] if isinstance(stop, str) else list(stop))
    params.validate()
    return params


def _cmd_generate(a) -> int:
    from lmforge.serve.engine import engine_from_checkpoint

    if a.input is not None and a.output is None:
        raise UserError("--input needs --output (a JSONL file for the completions)")
    if a.prompt is not None and a.output is not None:
        raise UserError("--output goes with --input; with --prompt the completion is printed")
    if a.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    loras = parse_loras(a.lora)
    if loras and a.prompt is not None:
        raise UserError("--lora goes with --input (each line names its adapter); for one prompt use --adapter DIR")
    _params(a, a.seed, {"max_tokens": max(1, a.max_new_tokens)})  # the flags' values, checked before loading
    if _tensor_parallel(a, {"--compile": a.compile, "--lora": bool(loras)}):
        from lmforge.serve.tensor_parallel import launch

        launch(a.tensor_parallel_size, a.device, _generate_rank, a)
        return 0
    engine = engine_from_checkpoint(a.model, device=a.device, dtype=a.dtype, adapter=a.adapter, loras=loras,
                                    compile_decode=a.compile,
                                    max_batch_size=1 if a.prompt is not None else a.max_batch_size, **cache_kwargs(a))
    return _generate_with(engine, a)


def _generate_rank(ctx, a) -> None:
    """One rank of ``generate --tensor-parallel-size``: rank 0 reads the prompts and writes the completions, the
    others follow its engine steps."""
    from lmforge.serve.tensor_parallel import load_engine

    engine = load_engine(ctx, a.model, dtype=a.dtype, adapter=a.adapter,
                         max_batch_size=1 if a.prompt is not None else a.max_batch_size, **cache_kwargs(a))
    if ctx.rank > 0:
        engine.follow()
        return
    try:
        _generate_with(engine, a)
    finally:
        engine.close()


def _generate_with(engine, a) -> int:
    """The prompt's or the prompts file's completions with ``engine`` (an Engine, or rank 0's LockstepEngine)."""
    steer = steering(engine.tokenizer, a.model, a.attributes)
    if a.prompt is not None:
        text = a.prompt if steer.values is None else steer.format.prompt(a.prompt, steer.values)
        ids = encode_prompt(engine.tokenizer, text)  # the rule fine-tuning used (lmforge.data.prompts)
        if a.max_new_tokens == 0:
            print(text)
            return 0
        new = engine.generate([ids], _params(a, a.seed))[0]
        print(text + engine.tokenizer.decode(new, skip_special_tokens=True))
        return 0
    summary = generate_file(engine, a.input, a.output, lambda i, o: _params(a, None if a.seed is None else a.seed + i, o),
                            steer=steer)
    print(json.dumps(summary))
    return 0


@dataclass
class Steering:
    """SteerLM steering of ``generate``: the model's attribute format (None for a model fine-tuned without
    ``sft.attributes``) and the ``--attributes`` values (None when not given)."""

    format: Optional[object] = None
    values: Optional[dict] = None

    def values_for(self, line_values, where: str) -> Optional[dict]:
        """The values a prompts-file line is steered with: its own ``attributes`` object, else --attributes."""
        if line_values is not None and self.format is None:
            raise DataError(f"{where}: the line has 'attributes' but the model was not fine-tuned with "
                            f"sft.attributes (it holds no SteerLM attribute format); remove them")
        return self.format.values(line_values, where) if line_values is not None else self.values


def steering(tokenizer, model_name, attributes: Optional[str]) -> Steering:
    """The :class:`Steering` of a model's tokenizer and the ``--attributes`` text (checked: one error line)."""
    from lmforge.data.steer import format_of, requested_values

    fmt = format_of(tokenizer, str(model_name))
    if attributes is None:
        return Steering(fmt)
    return Steering(fmt, requested_values(fmt, attributes, "--attributes", str(model_name)))


@dataclass
class PromptLine:
    """One line of a prompts file: its line number, position among the prompts, ``id`` (the JSON value as
    given, a string or an integer; default the line number) and the record itself."""

    line: int
    index: int
    id: object
    record: dict
    values: Optional[dict] = None  # the SteerLM attribute values its prompt was conditioned on

    @property
    def key(self) -> str:
        """The id as JSON: 3 and "3" are different ids, and keep their type in the output."""
        return id_key(self.id)


def id_key(value) -> str:
    return json.dumps(value)


def read_prompts(path: str | os.PathLike) -> list[PromptLine]:
    """The lines of a prompts JSONL file; DataError naming ``file:line`` for a bad line or a repeated id."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: give a JSONL file with one {{\"prompt\": ...}} object per line")
    lines: list[PromptLine] = []
    seen: set[str] = set()
    for n, rec in iter_jsonl(path):
        if not (isinstance(rec.get("prompt"), str) or isinstance(rec.get("messages"), list)):
            raise DataError(f"{path}:{n}: each line needs a 'prompt' string or a 'messages' list")
        ident = rec.get("id", n)
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise DataError(f"{path}:{n}: 'id' must be a string or an integer, got {json.dumps(ident)}")
        line = PromptLine(n, len(lines), ident, rec)
        if line.key in seen:
            raise DataError(f"{path}:{n}: id {json.dumps(ident)} appears twice; ids must be unique")
        seen.add(line.key)
        lines.append(line)
    return lines


def answered_ids(path: str | os.PathLike) -> set[str]:
    """Ids (as :func:`id_key` JSON) already answered in an output JSONL file; a line holding an ``error``
    is not an answer (a rerun tries it again). A last line cut short by a crash is removed from the file."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    ids = set()
    good_end = 0
    pos = 0
    for raw in data.splitlines(keepends=True):
        pos += len(raw)
        try:
            rec = json.loads(raw) if raw.endswith(b"\n") else None
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or "id" not in rec:
            if pos == len(data):
                break  # a torn last line: dropped below
            raise DataError(f"{path} has a malformed line at byte {pos - len(raw)}; fix or remove it to resume")
        if "error" not in rec:
            ids.add(id_key(rec["id"]))
        good_end = pos
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return ids


def _prompt_ids(engine, line: PromptLine, where: str, chat_cache: dict, steer: Optional[Steering] = None) -> list[int]:
    """A line's prompt ids by the one prompt rule (:mod:`lmforge.data.prompts`), SteerLM attributes in the prompt
    when the line or --attributes gives them (``line.values``); DataError naming ``where``."""
    from lmforge.serve.chat import load_chat_template

    rec = line.record
    line.values = (steer or Steering()).values_for(rec.get("attributes"), where)
    if isinstance(rec.get("prompt"), str):
        text = rec["prompt"] if line.values is None else steer.format.prompt(rec["prompt"], line.values)
        return encode_prompt(engine.tokenizer, text)
    if "chat" not in chat_cache:
        chat_cache["chat"] = load_chat_template(engine.tokenizer)
    chat = chat_cache["chat"]
    if chat is None:
        raise DataError(f"{where}: the line has 'messages' but the model's tokenizer has no chat template "
                        f"(no chat_template in tokenizer_config.json, no chat_template.jinja); give 'prompt' strings")
    if line.values is not None:  # SteerLM: the attribute string after every assistant turn's generation prompt
        return chat.encode_steered(rec["messages"], steer.format, line.values, where)
    try:
        return chat.encode(rec["messages"])
    except UserError as e:
        raise DataError(f"{where}: {e}") from None


def generate_file(engine, input_path, output_path, params_for, steer: Optional[Steering] = None) -> dict:
    """Complete every prompt of ``input_path`` not yet answered in ``output_path``, appending one line each.

    Every line to do is checked first (its sampling values, prompt, chat template, adapter, length): a bad
    line is refused with its ``file:line`` before anything is generated or written. A line that then fails
    inside the engine (non-finite logits, say) is written as ``{"id", "error", "finish_reason": "error"}``
    and the other lines go on; a rerun tries it again (its answer is appended after the error line).
    Ids keep their JSON type (an integer id stays an integer).

    Args:
        engine: an :class:`~lmforge.serve.engine.Engine` with a tokenizer.
        params_for: ``(line_index, record) -> SamplingParams``; raises InvalidRequestError for a bad value.
        steer: SteerLM steering (:class:`Steering`): lines with their own ``"attributes"`` object, or the
            ``--attributes`` values, get the attribute string in their prompt (written back as ``attributes``).

    Returns:
        ``{"total", "skipped", "written", "failed", "output"}`` (``failed``: error lines among ``written``).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    lines = read_prompts(input_path)
    done = answered_ids(output_path)
    todo = [line for line in lines if line.key not in done]
    chat_cache: dict = {}
    by_rid: dict[str, dict] = {}
    for line in todo:
        where = f"{input_path}:{line.line} (id {json.dumps(line.id)})"
        try:
            params = params_for(line.index, line.record)
            ids = _prompt_ids(engine, line, where, chat_cache, steer)
            rid = f"line-{line.line}"
            engine.add_request(rid, ids, params, adapter=line.record.get("adapter"))
        except DataError:
            raise
        except UserError as e:
            raise DataError(f"{where}: {e}") from None
        by_rid[rid] = {"ids": [], "text": "", "line": line}
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    written = failed = 0
    with open(output_path, "a", encoding="utf-8") as out, Progress(
            TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            disable=not todo) as progress:
        task = progress.add_task("generate", total=len(todo))
        while engine.has_work():
            try:
                outputs = engine.step()
            except Exception as e:  # the running lines fail; the queued ones go on
                outputs = engine.fail_running(e)
            for o in outputs:
                acc = by_rid[o.request_id]
                acc["ids"].extend(o.token_ids)
                acc["text"] += o.text
                if not o.finished:
                    continue
                rec = acc["line"].record
                head = {"id": acc["line"].id, **({"prompt": rec["prompt"]} if "prompt" in rec else {}),
                        **({"adapter": rec["adapter"]} if rec.get("adapter") is not None else {}),
                        **({"attributes": acc["line"].values} if acc["line"].values is not None else {})}
                if o.finish_reason == "error":
                    row = {**head, "error": o.error, "finish_reason": "error"}
                    failed += 1
                else:
                    row = {**head, "completion": acc["text"], "finish_reason": o.finish_reason,
                           "prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")  # one whole line per write
                out.flush()
                written += 1
                progress.advance(task)
                del by_rid[o.request_id]
    return {"total": len(lines), "skipped": len(lines) - len(todo), "written": written, "failed": failed,
            "output": str(output_path)}
