"""The matrix products of one block of a decode step, at the batch sizes of rollouts and serving: cuBLAS, inductor's
autotuned kernels and lmforge's single-row kernels (run by hand on a GPU; ``--device cpu`` is the tests' smoke run:
tiny sizes, no timing claims).

A decode step of ``M`` rows multiplies an (M, K) activation by every weight matrix of every block: at small ``M``
each product reads its weights once and is bound by the memory (a GRPO rollout's step at 64 rows on an H100 spent
1.31 ms of its 2.26 ms in these products: docs/benchmarks.md, "Alignment: rollout generation"). For the block
shapes of Llama-3.2-1B and Llama-3.1-8B (``--models``) at each ``M`` (``--m``), this times:

- layouts (``--layouts``): ``separate``, the seven products q, k, v, o, gate, up, down (what the rollout engine
  runs: :func:`lmforge.models.transformer.separate_projections`), and ``joint``, four: qkv (one weight), o,
  gate_up (one weight), down (what the serving engine runs after fusing);
- backends (``--backends``): ``linear``, ``F.linear`` (cuBLAS; what inductor's default mode calls too);
  ``compiled``, ``torch.compile(mode=--compile-mode)`` of the product (default ``max-autotune-no-cudagraphs``:
  inductor benchmarks its Triton templates against cuBLAS per shape and keeps the fastest; ``kernel`` says which
  it kept: ``extern`` for a library call, ``triton`` for a template); ``--gemm-backends TRITON`` sets inductor's
  ``max_autotune_gemm_backends`` (Triton templates alone); ``matvec``, :func:`lmforge.serve.kernels.matvec` once
  per row (the kernel multiplies one row; ``M`` rows are ``M`` launches, each reading the weights, from the L2
  cache after the first where they fit: up to ``--matvec-max-m`` rows, 32 by default; it stops paying where
  ``linear`` beats it).

Each product is captured in a CUDA graph of 48 calls cycling through copies of its weight larger together than
the L2 cache (a decode step never finds its weights there); the graph is replayed 20 times, each replay timed with
CUDA events, and ``us`` is the median replay's time per call. ``block`` rows time the layout's products one after
another (one call: every product of the block, each weight from its own copies). GB/s counts the weight bytes
alone; ``frac_of_copy`` divides it by the card's copy bandwidth (a 1 GiB device-to-device copy, bytes read +
written, as benchmarks/generate_throughput.py measures it). Every output is checked against ``F.linear`` in fp32
(``max_err`` relative to the largest reference value; ``ok`` below 2e-2).

    python benchmarks/decode_gemm.py [--models 1b,8b] [--m 1,8,32,64,128,256] [--layouts separate,joint]
                                     [--backends linear,compiled,matvec] [--compile-mode max-autotune-no-cudagraphs]
                                     [--gemm-backends ATEN,TRITON] [--matvec-max-m 32]
    python benchmarks/decode_gemm.py --models 1b --m 8,64        # the rollout's decode batches (about 2 minutes)
    python benchmarks/decode_gemm.py --device cpu                # the smoke run (tiny shape, no timing claims)

Prints one JSON line per measurement, then one ``summary`` line per model and ``M``: the block's time per layout
and backend, the fastest (``best``) and its speed-up over ``separate/linear`` (the rollout engine's products
today); appends every line to $OUT/decode_gemm.json (JSON lines) as it goes when OUT is set, so a run cut short
keeps what it measured. On the CPU, ``compiled`` uses the ``aot_eager`` backend (dynamo's capture without
inductor's code generation) and ``matvec`` is skipped (a CUDA device with Triton).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # generate_throughput beside this file

SHAPES = {  # name -> (hidden, query heads, key/value heads, head dim, ffn hidden)
    "1b": (2048, 32, 8, 64, 8192),  # Llama-3.2-1B
    "8b": (4096, 32, 8, 128, 14336),  # Llama-3.1-8B
    "tiny": (64, 4, 2, 16, 128),  # the CPU smoke run
}
LAYOUTS = ("separate", "joint")
BACKENDS = ("linear", "compiled", "matvec")
MODES = ("default", "max-autotune-no-cudagraphs")  # the compile modes without CUDA graphs of their own
COPY_BYTES = 256 << 20  # the copies of a weight together: beyond an H100's 50 MB of L2 (at most 16 copies)


def matrices(shape: str, layout: str) -> dict:
    """The (N, K) of each product of one block (``weight`` is (N, K); the input has K columns)."""
    h, nh, nkv, hd, f = SHAPES[shape]
    q, kv = nh * hd, nkv * hd
    if layout == "separate":
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (f, h), "up": (f, h), "down": (h, f)}
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * f, h), "down": (h, f)}


def time_us(fn, args_list: list, device: torch.device, reps: int = 48, replays: int = 20) -> float:
    """One call's time in microseconds: on a GPU the median over ``replays`` replays (each timed with CUDA events)
    of a CUDA graph of ``reps`` calls ``fn(*args_list[i % len(args_list)])``; on the CPU one call (the smoke
    run's: no claim)."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn(*args_list[0])
        return (time.perf_counter() - t) * 1e6
    from decode_kernels import capture  # the benchmarks folder is on the path when a benchmark runs

    graph = capture(fn, args_list, reps)
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1000 / reps


class Backends:
    """The product ``x @ w.T`` of each backend, and what a row reports about it."""

    def __init__(self, device: torch.device, compile_mode: str):
        self.device, self.compile_mode = device, compile_mode
        from lmforge.serve import kernels

        self.kernels = kernels

    def compile(self, fn):
        """``fn`` under ``torch.compile`` (static shapes: each ``M`` is tuned for itself). CPU: ``aot_eager``."""
        if self.device.type != "cuda":
            return torch.compile(fn, backend="aot_eager", dynamic=False)
        mode = None if self.compile_mode == "default" else self.compile_mode
        return torch.compile(fn, mode=mode, dynamic=False)

    def product(self, backend: str):
        """``fn(x, w)`` for ``backend``: None where it does not run here."""
        if backend == "linear":
            return F.linear
        if backend == "compiled":
            return self.compile(lambda x, w: F.linear(x, w))
        if not self.kernels.available(self.device):
            return None
        matvec = self.kernels.matvec
        return lambda x, w: [matvec(x[r], w) for r in range(x.shape[0])]


def kernel_kind(fn, *args) -> str:
    """Runs ``fn`` (a compiled product, not yet compiled for these shapes) once and says what inductor generated for
    it: ``extern`` (a library call: cuBLAS), ``triton`` (a Triton template) or ``n/a`` (no inductor code: the CPU
    smoke run's ``aot_eager``, or a graph inductor took from its cache without generating code)."""
    codes = []
    try:
        from torch._inductor.graph import GraphLowering

        # inductor hands each generated module's source to this hook (torch._inductor.utils.run_and_get_code
        # patches it too, but resets dynamo first, which would drop the other products' compiled graphs)
        with mock.patch.object(GraphLowering, "save_output_code", codes.append):
            fn(*args)
    except Exception as e:  # noqa: BLE001 - the kind is a note; the timing stands without it
        return f"unknown ({type(e).__name__}: {str(e)[:80]})"
    code = "\n".join(codes)
    if not code:
        return "n/a"
    if re.search(r"extern_kernels\.\w*mm\w*\(", code):  # e.g. extern_kernels.mm(x, w, out=buf0)
        return "extern"
    return "triton" if "async_compile.triton(" in code else "unknown"


def relative_error(out, ref: torch.Tensor) -> float:
    """The largest difference from ``ref`` (fp32) over its largest value (``out``: a tensor or a list of rows)."""
    out = torch.stack(out) if isinstance(out, list) else out
    return round(((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item(), 5)


def run(models: list, ms: list, layouts: list, backends: list, device: torch.device, compile_mode: str = MODES[1],
        matvec_max_m: int = 32, gemm_backends=None, dtype: torch.dtype = torch.bfloat16, emit=print) -> list:
    """Every measurement, in order (``emit`` gets each row as it is made); see the module doc. ``gemm_backends``:
    inductor's ``max_autotune_gemm_backends`` while it runs (None: inductor's own)."""
    import torch._inductor.config as inductor_config

    patch = {"max_autotune_gemm_backends": gemm_backends} if gemm_backends else {}
    with inductor_config.patch(patch):
        return _run(models, ms, layouts, backends, device, compile_mode, matvec_max_m, dtype, emit)


def _run(models, ms, layouts, backends, device, compile_mode, matvec_max_m, dtype, emit) -> list:
    if device.type == "cuda":
        from generate_throughput import copy_bandwidth

        copy_gbs = copy_bandwidth(device) / 1e9
        name = torch.cuda.get_device_name(device)
    else:
        copy_gbs, name = None, "cpu"
    # torch._dynamo is imported at the top: `import torch._dynamo` in here would bind torch as this function's
    # local name and break the torch.cuda line above on a GPU (session 12's call)
    import torch._inductor.config as inductor_config

    rows = []

    def out(row: dict) -> None:
        rows.append(row)
        emit(row)

    out({"device": name, "copy_gbs": round(copy_gbs) if copy_gbs else None, "dtype": str(dtype).removeprefix("torch."),
         "torch": torch.__version__, "compile_mode": compile_mode if device.type == "cuda" else "aot_eager (cpu)",
         "gemm_backends": inductor_config.max_autotune_gemm_backends,
         "timing": "CUDA graphs, median of 20 replays" if device.type == "cuda" else "cpu smoke: no claim"})
    impl = Backends(device, compile_mode)
    g, gd = torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(0)
    for shape in models:
        shapes = {nk for layout in layouts for nk in matrices(shape, layout).values()}
        weights = {}  # (N, K) -> copies, shared by the layouts (o and down are the same in both)
        for N, K in sorted(shapes):
            nbytes = N * K * torch.tensor([], dtype=dtype).element_size()
            n = max(2, min(16, -(-COPY_BYTES // nbytes))) if device.type == "cuda" else 2
            weights[(N, K)] = [(torch.randn(N, K, device=device, generator=gd) * 0.02).to(dtype)  # made on the device
                               for _ in range(n)]
        for M in ms:
            torch._dynamo.reset()  # each M compiles afresh (within dynamo's recompile limit: 6 shapes an M at most)
            xs = {K: (torch.randn(M, K, generator=g)).to(device, dtype) for K in {k for _, k in shapes}}
            products = {b: impl.product(b) for b in backends}  # one compiled function an M: a graph per shape
            kinds = {}  # (N, K) -> what inductor generated (o and down: compiled once for both layouts)
            blocks = {}
            for layout in layouts:
                mats = matrices(shape, layout)
                for backend in backends:
                    base = {"shape": shape, "M": M, "layout": layout, "backend": backend}
                    if backend == "matvec" and M > matvec_max_m:
                        continue
                    fns, done = {}, []
                    for mat, (N, K) in mats.items():
                        fn = products[backend]
                        if fn is None:
                            out({**base, "matrix": mat, "skipped": "needs a CUDA device with Triton"})
                            break
                        ws, x = weights[(N, K)], xs[K]
                        mbytes = round(N * K * ws[0].element_size() / 1e6, 2)
                        row = {**base, "matrix": mat, "N": N, "K": K, "mbytes": mbytes, "copies": len(ws)}
                        try:
                            if backend == "compiled":
                                if (N, K) not in kinds:
                                    kinds[(N, K)] = kernel_kind(fn, x, ws[0])
                                row["kernel"] = kinds[(N, K)]
                            ref = F.linear(x.float(), ws[0].float())
                            row["max_err"] = relative_error(fn(x, ws[0]), ref)
                            row["ok"] = row["max_err"] < 2e-2
                            row.update(_speed(time_us(fn, [(x, w) for w in ws], device), mbytes, copy_gbs))
                            fns[mat] = fn
                            done.append(row)
                        except Exception as e:  # noqa: BLE001 - reported in the row; the other products still run
                            traceback.print_exc()
                            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        out(row)
                    if len(fns) < len(mats):
                        continue  # no block without every product of it
                    order = list(mats.items())
                    calls = [tuple(weights[nk][i % len(weights[nk])] for _, nk in order) for i in range(16)]

                    def block(*ws, order=order, fns=fns):
                        for (mat, (N, K)), w in zip(order, ws):
                            fns[mat](xs[K], w)
                    mbytes = round(sum(r["mbytes"] for r in done), 2)
                    row = {**base, "matrix": "block", "mbytes": mbytes, "sum_us": round(sum(r["us"] for r in done), 2)}
                    try:
                        row.update(_speed(time_us(block, calls, device), mbytes, copy_gbs))
                        blocks[f"{layout}/{backend}"] = row["us"]
                    except Exception as e:  # noqa: BLE001 - as above
                        traceback.print_exc()
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    out(row)
            if blocks:
                best = min(blocks, key=blocks.get)
                summary = {"summary": True, "shape": shape, "M": M, "block_us": blocks}
                if device.type == "cuda":  # the CPU's times are no claim: no winner named
                    summary.update(best=best, best_us=blocks[best])
                if device.type == "cuda" and "separate/linear" in blocks:
                    summary["speedup_over_separate_linear"] = round(blocks["separate/linear"] / blocks[best], 3)
                out(summary)
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _speed(us: float, mbytes: float, copy_gbs) -> dict:
    gbs = mbytes * 1e3 / us
    out = {"us": round(us, 2), "gbs": round(gbs)}
    if copy_gbs:
        out["frac_of_copy"] = round(gbs / copy_gbs, 3)
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the smoke run (defaults: --models tiny --m 1,4; no timing claims)")
    ap.add_argument("--models", default=None, help=f"any of {', '.join(SHAPES)} (default: 1b,8b; cpu: tiny)")
    ap.add_argument("--m", default=None, help="rows per product (default: 1,8,32,64,128,256; cpu: 1,4)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="separate, joint or both")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="any of linear, compiled, matvec")
    ap.add_argument("--compile-mode", default=MODES[1], choices=MODES, help="torch.compile mode of 'compiled'")
    ap.add_argument("--gemm-backends", default=None,
                    help="inductor's max_autotune_gemm_backends for 'compiled' (e.g. TRITON: its templates alone; "
                         "default: inductor's own, ATEN,TRITON)")
    ap.add_argument("--matvec-max-m", type=int, default=32,
                    help="the most rows 'matvec' is timed at (a launch a row)")
    a = ap.parse_args(argv)
    cpu = a.device == "cpu"

    def names(flag: str, text: str, allowed) -> list:
        out = text.split(",")
        bad = [n for n in out if n not in allowed]
        if bad:
            ap.error(f"{flag} {bad[0]!r}: choose from {', '.join(allowed)}")
        return out

    models = names("--models", a.models or ("tiny" if cpu else "1b,8b"), SHAPES)
    layouts = names("--layouts", a.layouts, LAYOUTS)
    backends = names("--backends", a.backends, BACKENDS)
    try:
        ms = [int(m) for m in (a.m or ("1,4" if cpu else "1,8,32,64,128,256")).split(",")]
    except ValueError:
        ap.error(f"--m {a.m}: give row counts separated by commas, e.g. 8,64")
    if min(ms) < 1:
        ap.error(f"--m {a.m}: give row counts of at least 1")
    if a.matvec_max_m < 1:
        ap.error(f"--matvec-max-m {a.matvec_max_m}: give at least 1")
    if not cpu and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; --device cpu runs the smoke run")
    gemm = None
    if a.gemm_backends is not None:
        allowed = ("ATEN", "TRITON", "CUTLASS", "CK", "CPP")
        given = [b.strip().upper() for b in a.gemm_backends.split(",")]
        if any(b not in allowed for b in given):
            ap.error(f"--gemm-backends {a.gemm_backends}: give inductor's backends separated by commas, from "
                     f"{', '.join(allowed)}")
        gemm = ",".join(given)
    return dict(models=models, ms=ms, layouts=layouts, backends=backends, device=torch.device(a.device),
                compile_mode=a.compile_mode, matvec_max_m=a.matvec_max_m, gemm_backends=gemm)


def main(argv=None) -> list:
    kw = parse(argv)
    path = os.path.join(os.environ["OUT"], "decode_gemm.json") if os.environ.get("OUT") else None
    if path:
        open(path, "w").close()

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
    return run(**kw, emit=emit)


if __name__ == "__main__":
    main()
