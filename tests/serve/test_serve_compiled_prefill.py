"""The compiled prefill (``Engine(compile_prefill=True)``): the same greedy tokens as the eager engine, and nothing
compiles after start-up however the prefill shapes vary.

One engine serves every check (compiling is the cost): mixed prompt lengths, prompts chunked over steps (the
gather path), prefix-cache hits and preemption under a tiny block budget. The compile backend is ``aot_eager``
through a capturing compiler (dynamo's graphs, guards and dynamic shapes and AOT's functionalized graph, without
inductor's code generation, ~15 s a graph on a CPU); the engine's inductor default is what a GPU runs.
"""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend

import lmforge.serve.runner as runner_module
from lmforge.serve.engine import Engine

from tests.models.test_generate import make_model
from tests.serve.test_serve_paged import assert_all_free, run

CONFIG = dict(max_batch_size=4, max_seq_len=32, block_size=4, num_kv_blocks=10, max_num_batched_tokens=24)


@pytest.fixture(scope="module")
def compiled():
    """``(model, engine, graphs, graphs compiled at start-up, shapes seen)``: the compiled engine built with the
    attention backends narrowed to MATH (the graphs must show it: the compiled prefill honours
    ``EAGER_SDPA_BACKENDS``, the list that keeps cuDNN out on a GPU). Its start-up log is ``engine.startup_log``."""
    torch._dynamo.reset()
    graphs: list[str] = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    model = make_model("llama", 64, 0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_module, "PREFILL_BACKEND", aot_autograd(fw_compiler=capture))
        mp.setattr(runner_module, "EAGER_SDPA_BACKENDS", [SDPBackend.MATH])
        before = counters["stats"]["unique_graphs"]
        lines: list[str] = []
        engine = Engine(model, compile_prefill=True, log=lines.append, **CONFIG)
        at_start = counters["stats"]["unique_graphs"] - before
        engine.startup_log = lines
        shapes = set()
        run_prefill = engine.runner.compiled_prefill.run

        def spy(ids, positions, valid, tables, fresh=None):
            shapes.add((ids.shape[0], ids.shape[1], tables.shape[1]))
            return run_prefill(ids, positions, valid, tables, fresh)

        engine.runner.compiled_prefill.run = spy
        yield model, engine, graphs, at_start, shapes
    torch._dynamo.reset()


WORKLOADS = {
    # a tiny block budget: sequences are preempted and recomputed
    "preemption": {f"r{i}": ([(7 * i + j) % 60 for j in range(3 + 2 * i)], 14 - i) for i in range(5)},
    # mixed lengths: four short prompts in one forward, then two longer than a step's budget (prefilled in chunks)
    "mixed": {f"m{i}": ([(5 * j + 3 * i + 1) % 60 for j in range(n)], 4)
              for i, n in enumerate((3, 4, 5, 2, 23, 27, 9))},
}
SHARED = [(3 * j + 1) % 60 for j in range(13)]


def test_compiled_prefill_gives_the_eager_tokens_and_compiles_nothing_after_start_up(compiled):
    model, engine, graphs, at_start, shapes = compiled
    eager = Engine(model, **CONFIG)
    compiled_before = counters["stats"]["unique_graphs"]
    for name, requests in WORKLOADS.items():
        preempted = engine.metrics.preemptions
        got, want = run(engine, requests), run(eager, requests)
        for rid in requests:
            assert got[rid] == want[rid], (name, rid)
        if name == "preemption":
            assert engine.metrics.preemptions > preempted
    # prefix-cache hits: a first request, then three sharing its 13-token prefix (3 full cached blocks)
    first = {"first": (SHARED + [5], 6)}
    assert run(engine, first)["first"] == run(eager, first)["first"]
    later = {f"p{i}": (SHARED + [10 + i, 20 + i], 6) for i in range(3)}
    got, want = run(engine, later), run(eager, later)
    for rid in later:
        assert got[rid] == want[rid], rid
        assert got["_final"][rid].metrics.cached_tokens == 12
    assert_all_free(engine)
    calls = engine.runner.compiled_prefill.calls
    assert calls["fresh"] > 0 and calls["gather"] > 0  # both paths served (chunks, cache hits, recomputes)
    assert len({b for b, _, _ in shapes}) >= 3 and len({t for _, t, _ in shapes}) >= 2, shapes
    assert len({nb for _, _, nb in shapes}) >= 3, shapes
    assert counters["stats"]["unique_graphs"] == compiled_before  # no compile after start-up


def test_compiled_prefill_warm_up_compiles_each_path_once(compiled):
    """Start-up compiles one graph per path (fresh, gather), at the path's first warm-up shape (several rows); its
    other shapes, one row among them, run that graph (dynamo compiled nothing more: no size-1 specialisation, no
    recompile). On a torch without size-oblivious tracing a row of 1 is a graph apart (two per path)."""
    _, engine, graphs, at_start, _ = compiled
    per_path = 1 if runner_module.SIZE_OBLIVIOUS else 2
    assert at_start == len(graphs) == 2 * per_path
    assert engine.runner.compiled_prefill.graphs == {"fresh": per_path, "gather": per_path}
    warm = [line for line in engine.startup_log if line.startswith("compiling prefill:")]
    assert len(warm) == len(engine.runner.compiled_prefill.shapes()) == 6
    for path in ("fresh", "gather"):
        lines = [line for line in warm if f"({path} path," in line]
        assert "compiled a graph" in lines[0] and "(" + path + " path, 2 rows," in lines[0], lines
        one_row = [line for line in lines if ", 1 rows," in line]
        assert one_row and all(("no new graph" in line) == runner_module.SIZE_OBLIVIOUS for line in one_row), lines
        assert all("no new graph" in line for line in lines[1:] if ", 1 rows," not in line), lines
    summary = [line for line in engine.startup_log if line.startswith("compiled the prefill")]
    assert len(summary) == 1 and f"graphs compiled: fresh {per_path}, gather {per_path}" in summary[0], summary


def test_compiled_prefill_keeps_the_engines_attention_backends(compiled):
    """The graphs were traced under ``EAGER_SDPA_BACKENDS`` (narrowed to MATH here): no fused SDPA kernel in
    them, where the CPU's default picks its flash kernel. On a GPU the same list keeps cuDNN's SDPA out."""
    _, _, graphs, _, _ = compiled
    assert graphs and all("mul" in g for g in graphs)
    assert not any("_scaled_dot_product_flash" in g or "_scaled_dot_product_efficient" in g
                   or "_scaled_dot_product_cudnn" in g for g in graphs)


def test_compiled_prefill_pads_tokens_and_blocks(compiled):
    """Every compiled forward's tokens are a multiple of 16 and its tables at least 2 blocks wide (the size classes
    warmed up at start-up)."""
    _, engine, _, _, shapes = compiled
    assert shapes
    assert all(t % runner_module.PREFILL_TOKEN_STEP == 0 and nb >= 2 for _, t, nb in shapes), shapes


def test_compile_prefill_flags_reach_the_engine(monkeypatch):
    """``lmforge serve --compile-prefill`` and ``benchmarks/serve_load.py --compile-prefill`` build the engine with
    ``compile_prefill=True`` (and without the flag, False)."""
    import lmforge.serve.server as server
    from lmforge.cli import main

    from tests.conftest import load_benchmark

    served = []
    monkeypatch.setattr(server, "run_server", lambda model, **kw: served.append(kw["compile_prefill"]))
    assert main(["serve", "some/model", "--compile-prefill"]) == 0 and main(["serve", "some/model"]) == 0
    assert served == [True, False]
    bench = load_benchmark("serve_load")
    built = []

    def engine(*args, **kwargs):
        built.append(kwargs["compile_prefill"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "Engine", engine)
    argv = ["--shape", "tiny", "--num-requests", "1", "--prompt-len", "4", "8", "--output-len", "2", "3"]
    assert bench.main(argv + ["--compile-prefill"]) == 1 and bench.main(argv) == 1
    assert built == [True, False]


def test_compiled_prefill_warm_up_says_why_a_shape_compiled_again(monkeypatch):
    """A shape that compiles a graph again names, on its progress line, the guard of the earlier graph that it
    failed (dynamo's recompile reason, read without ``TORCH_LOGS``). Forced here: without size-oblivious tracing
    dynamo compiles a row of 1 apart (its 0/1 specialisation), and the guard it fails is on the rows of ``ids``.
    Only the fresh path's several-rows and one-row shapes are warmed up (two small graphs)."""
    monkeypatch.setattr(runner_module, "SIZE_OBLIVIOUS", False)
    monkeypatch.setattr(runner_module, "PREFILL_BACKEND", "aot_eager")
    step = runner_module.PREFILL_TOKEN_STEP
    monkeypatch.setattr(runner_module.CompiledPrefill, "shapes",
                        lambda self: [("fresh", 2, 4 * step, 1), ("fresh", 1, 5 * step, 1)])
    lines: list[str] = []
    Engine(make_model("llama", 64, 0.5), compile_prefill=True, log=lines.append, **CONFIG)
    warm = [line for line in lines if line.startswith("compiling prefill:")]
    assert len(warm) == 2 and ", 1 rows," in warm[1], warm
    assert "compiled a graph: recompiled, " in warm[1] and "ids.size()[0]" in warm[1], warm
    assert "TORCH_LOGS" not in warm[1] and "\n" not in warm[1], warm


def test_compiled_prefill_one_row_takes_the_graph_of_several_with_the_decode_kernels(monkeypatch):
    """With the decode model of a GPU engine (``compile_decode``: projections fused, norms folded, the Triton
    one-row modules installed, which branch on a single row), a prefill of one row still runs the graph compiled
    for two: the modules' one-row test (a single token, never a prefill's padded row) installs no guard that one
    row fails. The kernels' device test is made to pass on the CPU (Triton's interpreter setting); the kernels
    themselves never run (no prefill row is a single token)."""
    import lmforge.serve.kernels as kernels
    from lmforge.models.transformer import fuse_projections

    monkeypatch.setattr(kernels, "_INTERPRET", True)
    monkeypatch.setattr(runner_module, "PREFILL_BACKEND", "aot_eager")
    step = runner_module.PREFILL_TOKEN_STEP
    monkeypatch.setattr(runner_module.CompiledPrefill, "shapes",
                        lambda self: [("fresh", 2, 4 * step, 1), ("fresh", 1, 5 * step, 1)])
    model = make_model("llama", 64, 0.5)
    fuse_projections(model)
    model.requires_grad_(False)
    assert kernels.use_decode_kernels(model) > 0
    assert all(isinstance(layer, kernels.DecodeBlock) and layer.folded for layer in model.layers)
    lines: list[str] = []
    engine = Engine(model, compile_prefill=True, log=lines.append, **CONFIG)
    warm = [line for line in lines if line.startswith("compiling prefill:")]
    assert len(warm) == 2 and ", 1 rows," in warm[1], warm
    assert ("no new graph" in warm[1]) == runner_module.SIZE_OBLIVIOUS, warm
    assert engine.runner.compiled_prefill.graphs == {"fresh": 1 if runner_module.SIZE_OBLIVIOUS else 2}
