"""benchmarks/decode_gemm.py (the decode step's matrix products by layout and backend, run by hand on a GPU) in its
CPU smoke form: the tiny shape, every layout and backend, rows that say what ran; and its command line's errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("decode_gemm")


def test_decode_gemm_shapes_are_the_models_blocks(bench):
    """The products of one block: Llama-3.2-1B's read 121.6 MB (the profile's 122 MB a layer), either layout."""
    for shape, mb in (("1b", 121.6), ("8b", 436.2)):
        for layout in ("separate", "joint"):
            assert round(sum(n * k for n, k in bench.matrices(shape, layout).values()) * 2 / 1e6, 1) == mb
    assert bench.matrices("1b", "joint")["qkv"] == (3072, 2048) and bench.matrices("1b", "separate")["k"] == (512, 2048)


def test_decode_gemm_smoke_run_on_cpu(bench, tmp_path, monkeypatch):
    """Every layout x backend at the given rows: a row per product (shape, error against F.linear in fp32) and per
    block (its weight bytes the sum of its products'), 'matvec' skipped without CUDA, a summary per M naming no
    winner (CPU times are no claim); the JSON lines file holds what was printed."""
    monkeypatch.setenv("OUT", str(tmp_path))
    rows = bench.main(["--device", "cpu", "--m", "2"])
    assert [json.loads(line) for line in (tmp_path / "decode_gemm.json").read_text().splitlines()] == rows
    header, body = rows[0], rows[1:]
    assert header["device"] == "cpu" and header["timing"] == "cpu smoke: no claim"
    for layout in ("separate", "joint"):
        mats = bench.matrices("tiny", layout)
        for backend in ("linear", "compiled"):
            got = [r for r in body if r.get("layout") == layout and r.get("backend") == backend]
            assert [r["matrix"] for r in got] == [*mats, "block"]
            assert all((r["N"], r["K"]) == mats[r["matrix"]] and r["ok"] and r["M"] == 2 for r in got[:-1])
            assert got[-1]["mbytes"] == round(sum(r["mbytes"] for r in got[:-1]), 2) and got[-1]["us"] > 0
            assert backend == "linear" or all(r["kernel"] == "n/a" for r in got[:-1])  # aot_eager: no inductor code
        assert [r["skipped"] for r in body if r.get("layout") == layout and r["backend"] == "matvec"] == [
            "needs a CUDA device with Triton"]
    summary, = [r for r in body if r.get("summary")]
    assert set(summary["block_us"]) == {"separate/linear", "separate/compiled", "joint/linear", "joint/compiled"}
    assert "best" not in summary


@pytest.mark.parametrize("args, says", [
    (["--m", "0"], "--m 0: give row counts of at least 1"),
    (["--m", "8,x"], "--m 8,x: give row counts separated by commas"),
    (["--models", "70b"], "--models '70b': choose from 1b, 8b, tiny"),
    (["--backends", "linear,cutlass"], "--backends 'cutlass': choose from linear, compiled, matvec"),
    (["--gemm-backends", "TRITON,FOO"], "--gemm-backends TRITON,FOO: give inductor's backends"),
    (["--device", "cuda"], "--device cuda: no CUDA device here"),
])
def test_decode_gemm_command_line_errors(bench, capsys, monkeypatch, args, says):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)  # --device cuda: refused on any machine
    with pytest.raises(SystemExit) as exit_info:
        bench.parse(["--device", "cpu", *args] if args[0] != "--device" else args)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_decode_gemm_reports_a_failed_product_and_goes_on(bench, monkeypatch):
    """A product that fails (on a GPU: an autotuning or capture error) gets an error in its row; the layout's block
    is not timed without it, and every other product and layout still runs."""
    monkeypatch.delenv("OUT", raising=False)
    timed = bench.time_us

    def failing(fn, args_list, device, **kw):
        if len(args_list[0]) == 2 and tuple(args_list[0][1].shape) == (32, 64):  # tiny's k and v products
            raise RuntimeError("out of resources")
        return timed(fn, args_list, device, **kw)

    monkeypatch.setattr(bench, "time_us", failing)
    rows = bench.main(["--device", "cpu", "--m", "2", "--backends", "linear"])
    errors = [r["matrix"] for r in rows if "error" in r]
    assert errors == ["k", "v"] and all(r["error"] == "RuntimeError: out of resources" for r in rows if "error" in r)
    assert [r["layout"] for r in rows if r.get("matrix") == "block"] == ["joint"]
    assert [r["matrix"] for r in rows if r.get("layout") == "separate" and "us" in r] == ["q", "o", "gate", "up",
                                                                                         "down"]
    assert rows[-1]["block_us"].keys() == {"joint/linear"}
