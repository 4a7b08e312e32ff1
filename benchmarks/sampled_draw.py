"""Time of a sampled decode step's draw alone: :func:`lmforge.serve.sampler.next_tokens` on (rows, vocabulary) fp32
logits, every row sampling at temperature 1 with no top-k/top-p/min-p (a GRPO rollout's chained step), and the
tensor operations it runs (each a kernel launch on a GPU). Run by hand; the tests run it on a small size.

    PYTHONPATH=src python benchmarks/sampled_draw.py                      # CPU, 64 x 128,256 (the 1B rollout's)
    PYTHONPATH=src python benchmarks/sampled_draw.py --device cuda        # the GPU's time (synchronized)
    PYTHONPATH=src python benchmarks/sampled_draw.py --agreement 20       # + picks unlike other scans', 20 batches
    PYTHONPATH=src python benchmarks/sampled_draw.py --device cuda --no-kernel   # the tensor operations' draw

``--kernel`` / ``--no-kernel``: draw with the Triton kernels (:func:`lmforge.serve.kernels.sampled_draw`, what the
engine runs where its decode kernels do) or with the tensor operations of the two-level draw; default: the kernels
where they run (a CUDA device with Triton, or Triton's interpreter: ``TRITON_INTERPRET=1``, slow), else the tensor
operations. ``--kernel`` where they cannot run is refused. The JSON's ``kernel`` says which ran.

``--agreement N`` also draws ``N`` batches of random logits (standard normal x 2) with the two-level draw
(:func:`lmforge.serve.sampler.invert`), with one float32 scan over the whole vocabulary (the draw before it) and
with a float64 scan, at the same uniforms, and counts the picks that differ (a uniform within float32 rounding of
a boundary between two tokens); where the kernels run, their picks too (``kernel_vs_float64``,
``kernel_vs_two_level``).

Prints one JSON line: milliseconds per draw (median and least of ``--repeats`` timed draws after ``--warmup``: a
shared machine is noisy), the tensor operations per draw (views included), the device and torch version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.models.generate import MIN_TEMPERATURE
from lmforge.serve import kernels
from lmforge.serve.request import LOGIT_LIMIT, SamplingParams, Sequence
from lmforge.serve.sampler import RowSampling, invert, next_tokens, row_keys, uniforms


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def one_scan(processed: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The draw before the two levels: one scan over the whole vocabulary (in ``processed``'s dtype)."""
    cdf = processed.softmax(-1).cumsum(-1)
    return torch.searchsorted(cdf, u.to(cdf.dtype)[:, None] * cdf[:, -1:])[:, 0].clamp_(max=cdf.shape[-1] - 1)


def kernel_runs(dev: torch.device) -> bool:
    """Whether the Triton draw runs on ``dev``: a CUDA device with Triton, or any device under Triton's
    interpreter."""
    return kernels.triton is not None and (dev.type == "cuda" or kernels._INTERPRET)


def agreement(rows: int, vocab: int, batches: int, dev: torch.device, kernel: bool = False) -> dict:
    """Picks of the two-level draw unlike one float32 scan's and a float64 scan's, over ``batches`` batches;
    ``kernel``: the Triton draw's picks unlike the float64 scan's and the two-level draw's too."""
    g = torch.Generator().manual_seed(1)
    out = {"draws": 0, "two_level_vs_one_scan": 0, "two_level_vs_float64": 0, "one_scan_vs_float64": 0}
    if kernel:
        out.update(kernel_vs_float64=0, kernel_vs_two_level=0)
    for b in range(batches):
        x = (torch.randn(rows, vocab, generator=g) * 2).to(dev)
        u = uniforms(row_keys(torch.arange(rows, device=dev), torch.full((rows,), b, device=dev)))
        two, one, f64 = invert(x, u)[0], one_scan(x, u), one_scan(x.double(), u)
        out["draws"] += rows
        out["two_level_vs_one_scan"] += int((two != one).sum())
        out["two_level_vs_float64"] += int((two != f64).sum())
        out["one_scan_vs_float64"] += int((one != f64).sum())
        if kernel:  # as a rollout's step draws: temperature 1, the clamp applied as the logits are read
            picks = kernels.sampled_draw(x, u, None, True, LOGIT_LIMIT / MIN_TEMPERATURE)
            out["kernel_vs_float64"] += int((picks != f64).sum())
            out["kernel_vs_two_level"] += int((picks != two).sum())
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--agreement", type=int, default=0, metavar="N", help="batches compared with other scans")
    ap.add_argument("--kernel", action=argparse.BooleanOptionalAction, default=None,
                    help="draw with the Triton kernels (default: where they run) or not (--no-kernel)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if a.kernel and not kernel_runs(dev):
        ap.error(f"--kernel: the Triton draw runs on a CUDA device with Triton (or under TRITON_INTERPRET=1), not "
                 f"on {a.device}{' (no Triton here)' if kernels.triton is None else ''}; drop --kernel")
    kernel = kernel_runs(dev) if a.kernel is None else a.kernel
    logits = torch.randn(a.rows, a.vocab, generator=torch.Generator().manual_seed(0)).mul_(3).to(dev)
    params = SamplingParams(max_tokens=256, temperature=1.0, seed=0)
    seqs = [Sequence(f"r{i}", [1], params, dev, 512) for i in range(a.rows)]
    for i, s in enumerate(seqs):
        s.seed = i
    sampling = RowSampling.build(seqs, a.vocab, dev, kernel=kernel)
    greedy = logits.argmax(-1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        next_tokens(logits, greedy, sampling)
    sync()
    sampling.uniforms()  # the window of uniforms is computed once per 64 steps: not part of a step's draw
    counter = _CountOps()
    with counter:
        next_tokens(logits, greedy, sampling)
    times = []
    for _ in range(a.repeats):
        sync()
        t = time.perf_counter()
        next_tokens(logits, greedy, sampling)
        sync()
        times.append(time.perf_counter() - t)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "rows": a.rows, "vocab": a.vocab, "threads": torch.get_num_threads(), "kernel": kernel,
              "ms_per_draw_median": round(1000 * statistics.median(times), 3),
              "ms_per_draw_min": round(1000 * min(times), 3), "ops_per_draw": counter.ops}
    if a.agreement:
        result["agreement"] = agreement(a.rows, a.vocab, a.agreement, dev, kernel_runs(dev))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
