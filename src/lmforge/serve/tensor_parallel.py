"""Tensor-parallel serving: one model over N processes (one GPU each), the engines of every rank in lockstep.

``lmforge serve MODEL --tensor-parallel-size N`` (``-tp N``; ``lmforge generate`` too) starts N ranks itself
(:func:`launch`: ``torch.multiprocessing`` processes, NCCL between GPUs ``cuda:0 .. cuda:N-1``, gloo on a CPU).
``lmforge evaluate -tp N`` runs on the same launch and split (:func:`load_sharded`; :mod:`lmforge.eval.evaluate`).

The layout (Megatron's, on plain local tensors: :func:`shard_model`). Every rank holds

- its ``1 / N`` of the attention heads: the rows of q/k/v of its query and key/value heads, the columns of o that
  read them, and a KV cache of its own key/value heads only (so a rank's cache takes ``1 / N`` of the memory);
- its ``1 / N`` of the MLP: the rows of gate/up, the columns of down;
- the rest replicated: token embedding, norms, rotary tables and the output head.

o and down become :class:`RowParallelLinear`: the rank's partial product, one ``all_reduce`` (a sum over the
ranks), then the bias. That is the only communication of a forward: two all-reduces per layer. The engine's own
code (paged cache, attention hooks, sampler) runs unchanged on each rank's local heads. The head being
replicated, every rank computes the same logits (an all-reduce gives each rank the same sum).

Lockstep (:class:`LockstepEngine`). Every rank runs a whole :class:`~lmforge.serve.engine.Engine` (scheduler,
sampler, outputs) over its shard. Rank 0 alone takes requests (the HTTP server, the prompts file); once per
engine step it broadcasts what changed since the last one (requests added, with their sampling parameters, and
aborted), and then every rank runs the same step. The engines' decisions depend only on what they are given:
requests in the same order, the same KV block count (each rank sizes its cache, then all take the minimum:
``agree_blocks``) and the same tokens. Nothing reads a rank's own clock or memory after start-up.

Sampling: every rank draws its own tokens, and they are the same tokens, because the logits are the same on
every rank (the all-reduced sums, then replicated layers) and a draw depends only on the request's seed and the
token's index (:mod:`lmforge.serve.sampler`); rank 0 gives every request without a seed a random one before
broadcasting it. Drawing on every rank costs no communication per step and keeps the device-side decode chain
(the next step launched before the host reads the last one) as it is; rank 0 broadcasting its tokens would add
a device-to-host round trip to every step. As a guard, each broadcast carries a digest of rank 0's state after
the last step (every running request's id, length and last token); a rank whose own digest differs stops with an
error naming the step rather than go on with other requests or hang.

Not supported under tensor parallelism yet (refused with one ``error:`` line, :func:`check_flags`): compiled
decode (``--compile``: CUDA graphs around NCCL calls are untested), ``--compile-prefill``, multi-LoRA
(``--lora``), p-tuning adapters, bottleneck adapters, ALiBi models, mixture-of-experts models and parallel
attention + MLP blocks. LoRA/DoRA and IA3 adapters (``--adapter``) are folded into the weights before sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError, UserError
from lmforge.parallel.tensor import tensor_parallel_unsupported

__all__ = ["RowParallelLinear", "shard_model", "tp_problems", "check_model", "LockstepEngine", "digest", "launch",
           "RankContext", "load_engine", "load_sharded", "check_flags", "check_adapters", "model_config"]

#: How long a rank waits for rank 0's next message: a server may stay idle for days between requests.
IDLE_TIMEOUT = timedelta(days=365)


# ----------------------------------------------------------------------------------------------
# The sharded model


class RowParallelLinear(nn.Module):
    """A row-parallel linear layer (o_proj, down_proj): this rank's columns of the weight read its share of the
    input features; the partial products are summed over ``group`` (``all_reduce``), then the bias (held whole
    by every rank) is added once."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y + self.bias if self.bias is not None else y


def tp_problems(cfg, tp: int, flag: str = "--tensor-parallel-size", command: str = "serve") -> list[str]:
    """Why the model of ``cfg`` cannot be served over ``tp`` ranks (empty: it can); the advice names ``command``
    (``serve``, ``evaluate``)."""
    if tp == 1:
        return []
    nkv = cfg.num_query_groups or cfg.num_attention_heads
    sizes = {"attention heads": cfg.num_attention_heads, "key/value heads": nkv, "ffn_hidden_size": cfg.ffn_hidden_size}
    fits = [n for n in range(1, 65) if all(v % n == 0 for v in sizes.values())]
    problems = [f"{flag} {tp} does not divide the model's {v} {name}; use a size that divides its "
                f"{cfg.num_attention_heads} attention heads, {nkv} key/value heads and ffn_hidden_size "
                f"{cfg.ffn_hidden_size}: {', '.join(map(str, fits))}" for name, v in sizes.items() if v % tp][:1]
    problems += [f"{flag}: {what} are not supported under tensor parallelism yet; {command} on one GPU"
                 for what in tensor_parallel_unsupported(cfg)]
    return problems


def check_model(cfg, tp: int, command: str = "serve") -> None:
    """Raise one ConfigError for a model that cannot be served over ``tp`` ranks."""
    problems = tp_problems(cfg, tp, command=command)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "tensor parallelism:\n  - " + "\n  - ".join(problems))


def _rows(linear: nn.Linear, lo: int, hi: int) -> None:
    """Keep output features ``[lo, hi)`` of ``linear`` (column parallel), in place."""
    linear.weight = nn.Parameter(linear.weight.data[lo:hi].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[lo:hi].contiguous(), requires_grad=False)
    linear.out_features = hi - lo


def _columns(linear: nn.Linear, lo: int, hi: int, group) -> RowParallelLinear:
    """The row-parallel layer of ``linear`` reading input features ``[lo, hi)``."""
    bias = linear.bias.data if linear.bias is not None else None
    return RowParallelLinear(linear.weight.data[:, lo:hi].contiguous(), bias, group)


def shard_model(model: nn.Module, rank: int, tp: int, group) -> nn.Module:
    """Keep rank ``rank``'s share of ``model`` (a :class:`~lmforge.models.transformer.Transformer`, any device),
    in place: heads ``[rank * nh / tp, (rank + 1) * nh / tp)`` of q, o, and the matching key/value heads of k, v;
    the same share of the MLP's hidden units. Embedding, norms and head stay whole. Returns the model.

    Raises ConfigError for a model this layout does not cover (:func:`tp_problems`, wrapped projections)."""
    from lmforge.models.transformer import GatedMLP, MLP

    check_model(model.cfg, tp)
    for i, block in enumerate(model.layers):
        attn, mlp = block.self_attn, block.mlp
        parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        parts += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj") if hasattr(mlp, n)]
        if type(mlp) not in (MLP, GatedMLP) or any(type(p) is not nn.Linear for p in parts):
            raise ConfigError(f"--tensor-parallel-size: layer {i} holds modules this layout does not split "
                              f"({type(mlp).__name__}, {', '.join(sorted({type(p).__name__ for p in parts}))}); "
                              f"tensor-parallel serving takes plain models, LoRA/DoRA and IA3 adapters folded in "
                              f"(not bottleneck adapters): serve this one on one GPU")
        hd = attn.head_dim
        nh, nkv = attn.n_heads // tp, attn.n_kv_heads // tp
        _rows(attn.q_proj, rank * nh * hd, (rank + 1) * nh * hd)
        _rows(attn.k_proj, rank * nkv * hd, (rank + 1) * nkv * hd)
        _rows(attn.v_proj, rank * nkv * hd, (rank + 1) * nkv * hd)
        attn.o_proj = _columns(attn.o_proj, rank * nh * hd, (rank + 1) * nh * hd, group)
        attn.n_heads, attn.n_kv_heads = nh, nkv  # the heads this rank computes
        f = mlp.up_proj.out_features // tp
        for name in ("gate_proj", "up_proj"):
            if hasattr(mlp, name):
                _rows(getattr(mlp, name), rank * f, (rank + 1) * f)
        mlp.down_proj = _columns(mlp.down_proj, rank * f, (rank + 1) * f, group)
    model.tensor_parallel = (rank, tp)
    return model


# ----------------------------------------------------------------------------------------------
# Lockstep


def _send(obj: dict, group) -> None:
    """Broadcast ``obj`` (JSON) from rank 0 over the gloo ``group``: its length, then its bytes."""
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    dist.broadcast(torch.tensor([data.numel()], dtype=torch.long), src=0, group=group)
    dist.broadcast(data, src=0, group=group)


def _receive(group) -> dict:
    size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src=0, group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return json.loads(bytes(data.numpy()).decode())


def digest(engine) -> str:
    """What every rank's engine must agree on after a step: the waiting requests and each running request's id,
    length and last token."""
    state = [len(engine.waiting)] + [(s.request_id, s.length, s.output_ids[-1] if s.output_ids else None)
                                     for s in engine.running]
    return hashlib.sha1(repr(state).encode()).hexdigest()


class LockstepEngine:
    """An :class:`~lmforge.serve.engine.Engine` on each rank of a tensor-parallel group, stepped together.

    On rank 0 it stands in for the engine (the server's client and ``generate`` use it as one): requests and
    aborts act at once on rank 0's engine (a bad request is refused there) and are queued for the other ranks;
    :meth:`step` broadcasts them over ``control`` (a gloo group) and steps. The other ranks run :meth:`follow`:
    receive, apply, step, until :meth:`close`. Other attributes are rank 0's engine's."""

    def __init__(self, engine, control, rank: int):
        self.engine, self.control, self.rank = engine, control, rank
        self._ops: list[list] = []
        self._digest: Optional[str] = None
        self._steps = 0
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def add_request(self, request_id: str, prompt_ids, params, adapter: Optional[str] = None) -> None:
        if params.seed is None:  # the same draws on every rank: the seed is chosen here, once
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        self.engine.add_request(request_id, prompt_ids, params, adapter=adapter)
        fields = dataclasses.asdict(params)
        fields["stop"], fields["stop_token_ids"] = list(fields["stop"]), list(fields["stop_token_ids"])
        self._ops.append(["add", request_id, [int(t) for t in prompt_ids], fields, adapter])

    def abort(self, request_id: str):
        self._ops.append(["abort", request_id])
        return self.engine.abort(request_id)

    def step(self):
        _send({"ops": self._ops, "digest": self._digest, "step": self._steps}, self.control)
        self._ops = []
        outputs = self.engine.step()
        self._steps += 1
        self._digest = digest(self.engine)
        return outputs

    def fail_running(self, error: BaseException):
        """A step that raised leaves the ranks at different points (some in a collective, maybe): the group cannot
        go on. The other ranks are told to stop, and the error is raised again."""
        self.close(check=False)
        raise RuntimeError(f"a tensor-parallel engine step failed on rank 0 ({type(error).__name__}: {error}); the "
                           f"ranks cannot go on together, so the engine stopped") from error

    def generate(self, prompts, params) -> list[list[int]]:
        """As :meth:`lmforge.serve.engine.Engine.generate`, through the lockstep."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [f"gen-{i}-{secrets.token_hex(4)}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        result: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.engine.has_work():
            for out in self.step():
                result[out.request_id].extend(out.token_ids)
        return [result[rid] for rid in ids]

    def close(self, check: bool = True) -> None:
        """Tell the other ranks to stop (once); with ``check`` they compare their state after the last step too."""
        if not self._closed:
            self._closed = True
            _send({"stop": True, "step": self._steps, **({"digest": self._digest} if check else {})}, self.control)

    def share(self, obj: Optional[dict] = None) -> dict:
        """Rank 0's ``obj`` (JSON) on every rank: rank 0 broadcasts it, the others receive it. For what the ranks
        need alike after the engines stopped (``lmforge evaluate``: the tokens rank 0's requests got)."""
        if self.rank == 0:
            _send(obj, self.control)
            return obj
        return _receive(self.control)

    def follow(self) -> None:
        """The loop of a rank other than 0: apply rank 0's requests and aborts, step, until told to stop."""
        from lmforge.serve.request import SamplingParams

        while True:
            msg = _receive(self.control)
            if "digest" in msg and msg["digest"] != self._digest:
                raise RuntimeError(f"tensor-parallel rank {self.rank} disagrees with rank 0 after engine step "
                                   f"{msg['step']} (other requests or tokens): the ranks' results differ")
            if msg.get("stop"):
                return
            for op in msg["ops"]:
                if op[0] == "add":
                    _, rid, prompt, fields, adapter = op
                    self.engine.add_request(rid, prompt, SamplingParams(**fields), adapter=adapter)
                else:
                    self.engine.abort(op[1])
            self.engine.step()
            self._digest = digest(self.engine)


# ----------------------------------------------------------------------------------------------
# Launch


def check_flags(tp: int, device: str, refused: dict[str, bool], command: str = "serve") -> None:
    """Refuse, with one line, a tensor-parallel size this machine cannot run and flags not supported with it
    (``refused``: flag -> whether it was given); the advice names ``command`` (``serve``, ``evaluate``)."""
    if tp < 1:
        raise UserError(f"--tensor-parallel-size must be >= 1, got {tp}")
    if tp == 1:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--tensor-parallel-size {tp} starts its own {tp} processes; run the command once, not under "
                        f"torchrun")
    given = [flag for flag, on in refused.items() if on]
    if given:
        raise UserError(f"{given[0]} is not supported with --tensor-parallel-size yet; drop it, or {command} on one GPU")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device} with --tensor-parallel-size {tp}: rank r runs on cuda:r; give --device "
                        f"cuda (or auto) and pick the GPUs with CUDA_VISIBLE_DEVICES")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_gpu and tp > torch.cuda.device_count():
        raise UserError(f"--tensor-parallel-size {tp} needs {tp} GPUs (one a rank) but {torch.cuda.device_count()} "
                        f"are visible; lower it, or {command} on the CPU with --device cpu")


def check_adapters(model_path: str, adapter: Optional[str], command: str = "serve") -> None:
    """Refuse, before the ranks start, an adapter that is not merged into the weights (p-tuning's virtual tokens,
    bottleneck modules): ``--adapter`` or a model path that is an adapter folder. Reads their configs only."""
    from lmforge.locate import find_adapter
    from lmforge.peft import CONFIG_NAME, METHODS

    kinds = {t: m for m, (_, t) in METHODS.items()}
    for folder in (find_adapter(model_path), Path(adapter) if adapter is not None else None):
        if folder is None or not (folder / CONFIG_NAME).is_file():
            continue  # not an adapter: the ranks' loading says what is wrong with it
        try:
            method = kinds.get(str(json.loads((folder / CONFIG_NAME).read_text()).get("peft_type", "")).upper())
        except ValueError:
            continue
        if method in ("ptuning", "adapter"):
            what = "p-tuning adapters" if method == "ptuning" else "bottleneck adapters (peft_type LMFORGE_ADAPTER)"
            raise ConfigError(f"{folder}: {what} are not supported with --tensor-parallel-size yet (LoRA/DoRA and "
                              f"IA3 are: they are merged before the split); {command} it on one GPU")


def model_config(path: str):
    """The :class:`~lmforge.models.config.ModelConfig` of a model folder, from its config file alone (no
    weights: the checks before the ranks start)."""
    from lmforge.convert.hf import read_hf_config
    from lmforge.models.config import ModelConfig
    from lmforge.open import adapter_base, find_adapter, is_hf_folder, resolve_checkpoint

    adapter = find_adapter(path)
    if adapter is not None:
        return model_config(adapter_base(adapter))
    if is_hf_folder(path):
        return read_hf_config(path)[1]
    folder = resolve_checkpoint(path)
    config = json.loads((folder / "config.json").read_text())
    return ModelConfig.from_dict(config["model"], source=str(folder / "config.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tp: int, device: str, main: Callable[..., None], *args) -> None:
    """Run ``main(ctx, *args)`` on ``tp`` new processes, the ranks of one group (``ctx``: :class:`RankContext`),
    and wait for them. A rank that raises a UserError writes its line to a file; the first rank's line is raised
    here again (once, however many ranks failed alike). Another failure ends every rank and raises.

    Signals: SIGTERM is passed on to rank 0 (a server then finishes its running requests and tells the other
    ranks to stop); SIGINT is left to the processes themselves (Ctrl-C in a terminal reaches every one of them:
    rank 0 stops as for SIGTERM, the other ranks ignore it and wait for rank 0's word)."""
    import logging
    import signal

    import torch.multiprocessing as mp

    # when a rank fails, the others are ended: the error line says why, not a warning per process ended
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="lmforge-tp-") as errors:
        context = mp.start_processes(_rank_entry, args=(tp, port, on_gpu, errors, main, args), nprocs=tp,
                                     join=False, start_method="spawn")
        rank0 = context.processes[0].pid
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: os.kill(rank0, signal.SIGTERM))
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"a tensor-parallel rank failed:\n{e}") from None
        except mp.ProcessExitedException as e:
            lines = [p.read_text() for p in sorted(Path(errors).glob("rank*.error"))]
            if lines:
                raise UserError(lines[0]) from None
            raise RuntimeError(f"a tensor-parallel rank exited: {e}") from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class RankContext:
    """What a rank's ``main`` gets from :func:`launch`: its rank, the group size, its device, and ``control`` (a
    gloo group with a long timeout, for rank 0's messages)."""

    def __init__(self, rank: int, tp: int, device: torch.device, control):
        self.rank, self.tp, self.device, self.control = rank, tp, device, control
        self.group = dist.group.WORLD

    def agree_blocks(self, blocks: int) -> int:
        """The smallest KV block count of the ranks (each sized its own cache from its own memory)."""
        t = torch.tensor([blocks], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())


def _rank_entry(rank: int, tp: int, port: int, on_gpu: bool, errors: str, main, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    if on_gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        # the ranks share the machine's cores: more threads than that would have them wait for each other at
        # every all-reduce
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    if rank > 0:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 says when to stop (launch)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=tp)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    try:
        main(RankContext(rank, tp, device, control), *args)
    except UserError as e:
        Path(errors, f"rank{rank:03d}.error").write_text(str(e))
        sys.stderr.flush()
        os._exit(2)  # the other ranks may wait in a collective: the launcher ends them
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_sharded(ctx: RankContext, path: str, dtype: str = "auto", adapter: Optional[str] = None,
                 command: str = "serve"):
    """Rank ``ctx.rank``'s share of the model at ``path`` and its tokenizer: loaded whole on the CPU (``dtype`` as on
    the target device), LoRA/DoRA/IA3 ``adapter`` folded in, sharded (:func:`shard_model`), moved to the rank's
    device. What ``serve``/``generate`` (:func:`load_engine`) and ``evaluate`` load under tensor parallelism."""
    from lmforge.open import load_for_inference, pick_dtype

    torch_dtype = pick_dtype(dtype, ctx.device)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[torch_dtype]
    model, tokenizer = load_for_inference(path, device="cpu", dtype=name, allow_ptuning=True)
    if adapter is not None:
        from lmforge.open import adapter_tokenizer
        from lmforge.peft import adapter_for_inference

        model = adapter_for_inference(model, adapter, use="tensor-parallel " + ("evaluation" if command == "evaluate" else "serving"))
        tokenizer = adapter_tokenizer(adapter, tokenizer)
    if hasattr(model, "num_virtual_tokens"):
        raise ConfigError(f"p-tuning adapters are not supported with --tensor-parallel-size yet; {command} on one GPU")
    return shard_model(model, ctx.rank, ctx.tp, ctx.group).to(ctx.device), tokenizer


def load_engine(ctx: RankContext, path: str, dtype: str = "auto", adapter: Optional[str] = None, **kwargs):
    """Rank ``ctx.rank``'s engine of the model at ``path`` (:func:`load_sharded`): an
    :class:`~lmforge.serve.engine.Engine` whose KV block count is the ranks' minimum, wrapped in a
    :class:`LockstepEngine`. ``kwargs`` go to the engine."""
    from lmforge.serve.engine import Engine

    model, tokenizer = load_sharded(ctx, path, dtype, adapter)
    log = None if ctx.rank == 0 else (lambda msg: None)  # start-up lines once
    engine = Engine(model, tokenizer, agree_blocks=ctx.agree_blocks, log=log, **kwargs)
    return LockstepEngine(engine, ctx.control, ctx.rank)
