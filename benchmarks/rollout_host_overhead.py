"""Host time of a GRPO rollout's engine steps, split into their parts (run by hand, on any CPU; the tests run it
only on a few tokens).

``lmforge align --method grpo|ppo|reinforce`` samples its completions through
:meth:`lmforge.align.rl.RolloutLoss.sample`: the serving engine built on the policy (``RolloutLoss.engine``). On
a GPU the decode forward is a CUDA graph replay and the draw a few kernels, queued in microseconds each, so a
step costs the larger of the device's time and the host's (Python, and a few microseconds per kernel launched). This script measures the host's part on the CPU:
the rollout of ``benchmarks/grpo_rollout.py`` (8 prompts x 8 completions, 128-token prompts, 256 new tokens,
temperature 1, end of text never ends them) on a tiny model, through ``RolloutLoss.sample`` itself, with a
timer around each part of :meth:`lmforge.serve.engine.Engine.step`. The model's forwards and the draws (device
work on a GPU, eager CPU arithmetic here) are timed apart and left out of the host time.

    PYTHONPATH=src python benchmarks/rollout_host_overhead.py
    PYTHONPATH=src python benchmarks/rollout_host_overhead.py --tokenizer ids     # grpo_rollout.py's stand-in

``--tokenizer bpe`` (the default) gives the engine a byte-level BPE tokenizer of 2,000 tokens trained here on
standard-library source (``lmforge align`` passes the policy's real tokenizer); ``ids`` the id-only stand-in of
``grpo_rollout.py`` (no text). Prints one line per part: milliseconds per engine step, microseconds per row per
step, calls; then the host time per step (``Engine.step`` less the device work), the time
``RolloutLoss.sample`` spends outside the steps, and the tensor operations run per step outside the forwards (each
a kernel launch or a copy on a GPU; views counted too). Parts nest (a line's time includes the lines indented under
it). The machine may be shared: ``--repeats N`` (default 3) rollouts are timed and the one of least host time is
shown (the timers add ~0.3 us per call). Writes the numbers to ``--json PATH`` when given.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import platform
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.align.rl import RolloutLoss
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.serve import engine as engine_mod, output as output_mod, runner as runner_mod, sampler as sampler_mod
from lmforge.serve import scheduler as scheduler_mod

#: (label, owner, attribute, indent, device work): the functions timed (inclusive). "device work" parts are a
#: GPU's (a graph replay, the draw's kernels) and are not host time.
PARTS = [
    ("Engine.step", engine_mod.Engine, "step", 0, False),
    ("Scheduler.schedule", scheduler_mod.Scheduler, "schedule", 1, False),
    ("Engine._can_chain (+ reserve_next)", engine_mod.Engine, "_can_chain", 1, False),
    ("ModelRunner.launch_decode", runner_mod.ModelRunner, "launch_decode", 1, False),
    ("ModelRunner.launch_chained", runner_mod.ModelRunner, "launch_chained", 1, False),
    ("RowSampling.build", sampler_mod.RowSampling, "build", 2, False),
    ("ModelRunner._set_tables", runner_mod.ModelRunner, "_set_tables", 2, False),
    ("decode forward [device work]", runner_mod.ModelRunner, "decode_step", 2, True),
    ("draw: next_tokens [device work]", runner_mod, "next_tokens", 2, True),
    ("Engine._prefill", engine_mod.Engine, "_prefill", 1, False),
    ("prefill forward [device work]", runner_mod.ModelRunner, "prefill", 2, True),
    ("Engine._finish_decode", engine_mod.Engine, "_finish_decode", 1, False),
    ("Decode.read_tokens", runner_mod.Decode, "read_tokens", 2, False),
    ("OutputProcessor.append", output_mod.OutputProcessor, "append", 2, False),
    ("OutputProcessor.detokenize", output_mod.OutputProcessor, "detokenize", 3, False),
    ("Scheduler.register_full_blocks", scheduler_mod.Scheduler, "register_full_blocks", 2, False),
    ("Engine._output", engine_mod.Engine, "_output", 1, False),
    ("Engine._release", engine_mod.Engine, "_release", 1, False),
]


class _Ids:
    """``grpo_rollout.py``'s stand-in tokenizer: no end-of-sequence token, no text."""

    eod_id = None

    def decode(self, ids, *args, **kwargs) -> str:
        return ""


class _NoEnd:
    """A tokenizer whose end-of-text never ends a completion (each runs its full length, as in grpo_rollout.py)."""

    eod_id = None

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, *args, **kwargs) -> str:
        return self.tok.decode(ids, *args, **kwargs)


#: inside a forward (decode or prefill): a GPU runs it as a graph replay or its own kernels
_IN_FORWARD = [0]


class _CountOps(TorchDispatchMode):
    """Counts the tensor operations run outside the forwards: on a GPU each is a kernel launch or a copy, some
    microseconds of host time a step (the draw's, the step's own)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _IN_FORWARD[0]:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def instrument(totals: dict, calls: dict):
    """Wrap every function of :data:`PARTS` with a timer adding its inclusive seconds to ``totals[label]``;
    returns a function that puts the originals back."""
    originals = [(owner, name, inspect.getattr_static(owner, name)) for _, owner, name, _, _ in PARTS]
    forwards = {"decode forward [device work]", "prefill forward [device work]"}
    for label, owner, name, _, _ in PARTS:
        raw = inspect.getattr_static(owner, name)
        static = isinstance(raw, (staticmethod, classmethod))
        fn = raw.__func__ if static else raw

        def wrap(fn, label):
            @functools.wraps(fn)
            def timed(*args, **kwargs):
                forward = label in forwards
                _IN_FORWARD[0] += forward
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    totals[label] += time.perf_counter() - t
                    calls[label] += 1
                    _IN_FORWARD[0] -= forward
            return timed

        w = wrap(fn, label)
        setattr(owner, name, type(raw)(w) if static else w)

    def restore():
        for owner, name, raw in originals:
            setattr(owner, name, raw)
    return restore


def bpe_tokenizer():
    from lmforge.data.tokenizers import train_bpe

    root = Path(tempfile.mkdtemp())
    (root / "c.txt").write_text(inspect.getsource(textwrap) + inspect.getsource(argparse))
    return _NoEnd(train_bpe([root / "c.txt"], 2000, root / "tok"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", choices=["bpe", "ids"], default="bpe")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed rollouts; the one of least host time is shown")
    ap.add_argument("--json", default=None, metavar="PATH")
    a = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host's work is one thread's; the tiny forwards gain nothing from more
    try:
        return _run(a)
    finally:
        torch.set_num_threads(threads)


def _run(a) -> dict:
    tok = bpe_tokenizer() if a.tokenizer == "bpe" else _Ids()
    vocab = 2000 if a.tokenizer == "bpe" else 512
    seq = a.prompt_len + a.new_tokens
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=seq, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", layernorm_epsilon=1e-5)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    prompts = torch.randint(1, vocab, (a.prompts, a.prompt_len)).tolist()
    settings = SimpleNamespace(num_generations=a.generations, max_completion_length=a.new_tokens, temperature=1.0,
                               reward_fn="json:loads", prompt_key="prompt", beta=0.0)
    rollout = RolloutLoss(model, "grpo", settings, None, tok, None, seq, 0, a.prompts * a.generations,
                          compile_decode=False, log=lambda m: None)
    rollout.sample(prompts, rollout=0)  # warm-up
    engine = rollout.engine()
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    restore = instrument(totals, calls)
    try:
        best = None
        for r in range(max(1, a.repeats)):  # the machine may be shared: the rollout of least host time is kept
            totals.clear()
            calls.clear()
            steps0, dsteps0 = engine.metrics.decode_steps, engine.metrics.chained_steps
            t = time.perf_counter()
            completions = rollout.sample(prompts, rollout=1 + r)
            wall = time.perf_counter() - t
            device = sum(totals[label] for label, *_, dev in PARTS if dev)
            host = totals["Engine.step"] - device
            if best is None or host < best[0]:
                best = (host, device, wall, dict(totals), dict(calls), completions,
                        engine.metrics.decode_steps - steps0, engine.metrics.chained_steps - dsteps0)
        host, device, wall, totals, calls, completions, decode_steps, chained_steps = best
        totals, calls = defaultdict(float, totals), defaultdict(int, calls)
        counter = _CountOps()
        with counter:
            rollout.sample(prompts, rollout=0)
    finally:
        restore()
    steps = calls["Engine.step"]
    ops_per_step = counter.ops / steps
    rows = a.prompts * a.generations
    out_loop = wall - totals["Engine.step"]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"rollout: {rows} completions x {a.new_tokens} tokens ({sum(map(len, completions))} generated), "
          f"{steps} engine steps ({decode_steps} decode steps, {chained_steps} chained), tokenizer {a.tokenizer}, "
          f"torch {torch.__version__}, CPU {cpu}")
    print(f"{'part':<44}{'ms/step':>9}{'us/row/step':>13}{'calls':>8}")
    for label, _, _, indent, _ in PARTS:
        if calls[label]:
            ms = 1000 * totals[label] / steps
            print(f"{'  ' * indent + label:<44}{ms:>9.3f}{1000 * ms / rows:>13.2f}{calls[label]:>8}")
    result = {"tokenizer": a.tokenizer, "cpu": cpu, "torch": torch.__version__, "rows": rows, "steps": steps,
              "new_tokens": a.new_tokens, "wall_s": round(wall, 3),
              "host_ms_per_step": round(1000 * host / steps, 3),
              "tensor_ops_per_step_outside_forwards": round(ops_per_step, 1),
              "host_us_per_row_per_step": round(1e6 * host / steps / rows, 2),
              "device_work_ms_per_step": round(1000 * device / steps, 3),
              "sample_loop_outside_step_ms_per_step": round(1000 * out_loop / steps, 3),
              "parts_ms_per_step": {label: round(1000 * totals[label] / steps, 4) for label, *_ in PARTS
                                    if calls[label]}}
    print(f"host time (Engine.step minus device work): {result['host_ms_per_step']:.3f} ms per step, "
          f"{result['host_us_per_row_per_step']:.2f} us per row per step; RolloutLoss.sample outside the steps: "
          f"{result['sample_loop_outside_step_ms_per_step']:.3f} ms per step")
    print(f"tensor operations per step outside the forwards (the draw's, the step's own; on a GPU each is a kernel "
          f"launch or a copy, host time too): {ops_per_step:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
