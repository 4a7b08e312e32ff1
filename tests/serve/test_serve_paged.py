"""The paged engine: preemption under a tiny block budget, chunked prefill, prefix caching, block accounting.

Every check compares greedy tokens with one-at-a-time :func:`lmforge.models.generate.generate` and ends with
the allocator's books balanced and every block free.
"""

import pytest
import torch

from lmforge.models.generate import generate
from lmforge.serve.cache import BlockAllocator, NoFreeBlocks
from lmforge.serve.engine import Engine, InvalidRequestError, SamplingParams

from tests.conftest import load_benchmark
from tests.models.test_generate import make_model


@pytest.fixture(scope="module")
def models():
    return {style: make_model(style, 64, 0.5) for style in ("gpt", "llama")}


def run(engine: Engine, requests: dict, spy=None) -> dict:
    """Add ``{id: (prompt, max_tokens)}`` greedy requests, step until done; returns ``{id: tokens}`` and the
    final outputs under ``"_final"``."""
    for rid, (prompt, n) in requests.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0))
    got = {rid: [] for rid in requests}
    final = {}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
            if out.finished:
                final[out.request_id] = out
        if spy is not None:
            spy(engine)
    got["_final"] = final
    return got


def assert_all_free(engine: Engine) -> None:
    alloc = engine.cache.allocator
    alloc.check()
    assert alloc.num_used == 0 and alloc.num_free == alloc.num_blocks - 1
    assert not engine.running and not engine.waiting and not engine._ids


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_preemption_under_a_tiny_block_budget_gives_the_same_tokens(models, style):
    """Blocks for little more than one sequence of max_seq_len: running sequences are preempted (the youngest
    first), recomputed later with their output so far, and every request still gets its greedy tokens."""
    model = models[style]
    engine = Engine(model, max_batch_size=4, max_seq_len=32, block_size=4, num_kv_blocks=10,
                    max_num_batched_tokens=16)
    prompts = {f"r{i}": ([(7 * i + j) % 60 for j in range(3 + 2 * i)], 14 - i) for i in range(5)}
    got = run(engine, prompts)
    for rid, (prompt, n) in prompts.items():
        assert got[rid] == generate(model, prompt, n, greedy=True), rid
    assert engine.scheduler.num_preemptions > 0 and engine.metrics.preemptions == engine.scheduler.num_preemptions
    assert sum(o.metrics.preemptions for o in got["_final"].values()) == engine.scheduler.num_preemptions
    assert_all_free(engine)


def test_chunked_prefill_equals_whole_prefill_and_streams_keep_decoding(models):
    """A 40-token prompt arriving while two requests decode is prefilled in chunks of the step's leftover budget;
    the decoding requests produce a token in every one of those steps; all tokens equal whole prefills."""
    model = models["llama"]
    engine = Engine(model, max_batch_size=4, max_seq_len=64, block_size=4, max_num_batched_tokens=8)
    steps = []
    schedule = engine.scheduler.schedule

    def spy():
        s = schedule()
        steps.append(([q.request_id for q in s.decode], [(q.request_id, lo, hi) for q, lo, hi in s.chunks]))
        return s

    engine.scheduler.schedule = spy
    long_prompt = [(5 * j + 3) % 60 for j in range(40)]
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.0))
    engine.add_request("b", [9, 8], SamplingParams(max_tokens=20, temperature=0.0))
    got = {"a": [], "b": [], "long": []}
    ttft = {}
    n = 0
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
            if out.finished:
                ttft[out.request_id] = out.metrics
        n += 1
        if n == 2:
            engine.add_request("long", long_prompt, SamplingParams(max_tokens=5, temperature=0.0))
    assert got["a"] == generate(model, [1, 2, 3], 20, greedy=True)
    assert got["b"] == generate(model, [9, 8], 20, greedy=True)
    assert got["long"] == generate(model, long_prompt, 5, greedy=True)
    long_chunks = [(decode, c) for decode, chunks in steps for c in chunks if c[0] == "long"]
    assert len(long_chunks) >= 5  # 40 tokens, at most 6 a step beside two decoding streams
    assert all(hi - lo <= 6 for _, (_, lo, hi) in long_chunks)
    assert all(sorted(decode) == ["a", "b"] for decode, _ in long_chunks)  # nobody waited for the prefill
    assert [lo for _, (_, lo, _) in long_chunks] == sorted(lo for _, (_, lo, _) in long_chunks)
    m = ttft["long"]
    assert m.ttft is not None and m.ttft > 0 and m.tpot is not None and m.latency >= m.ttft
    assert_all_free(engine)


def test_prefix_cache_hits_give_the_same_tokens_and_are_counted(models):
    """Requests sharing a 13-token prefix: the later ones take its 3 full blocks from the cache (counted on their
    outputs and in the allocator) and still get their greedy tokens; a different adapter id would miss."""
    model = models["gpt"]
    engine = Engine(model, max_batch_size=2, max_seq_len=48, block_size=4, num_kv_blocks=30)
    shared = [(3 * j + 1) % 60 for j in range(13)]
    first = run(engine, {"first": (shared + [5], 6)})
    assert first["first"] == generate(model, shared + [5], 6, greedy=True)
    assert first["_final"]["first"].metrics.cached_tokens == 0
    hits = engine.cache.allocator.hits
    later = {f"r{i}": (shared + [10 + i, 20 + i], 6) for i in range(3)}
    got = run(engine, later)
    for rid, (prompt, n) in later.items():
        assert got[rid] == generate(model, prompt, n, greedy=True), rid
        assert got["_final"][rid].metrics.cached_tokens == 12  # 3 full blocks of the shared prefix
    assert engine.cache.allocator.hits - hits >= 9
    again = run(engine, {"again": (shared + [5], 6)})  # the whole first request again: the same tokens
    assert again["again"] == first["first"]
    assert_all_free(engine)
    # without prefix caching nothing is looked up
    plain = Engine(model, max_batch_size=2, max_seq_len=48, block_size=4, num_kv_blocks=30,
                   enable_prefix_caching=False)
    assert run(plain, later)["r0"] == got["r0"] and plain.cache.allocator.queries == 0


def test_block_allocator_counts_shares_and_evicts_least_recently_used():
    alloc = BlockAllocator(5)  # blocks 1..4
    a, b = alloc.allocate(), alloc.allocate()
    alloc.register(a, b"A")
    alloc.register(b, b"B")
    alloc.release([a, b])  # b (the tail) becomes the older cached block
    assert alloc.num_free == 4 and alloc.num_used == 0
    assert alloc.lookup(b"A") == a and alloc.refs[a] == 1
    assert alloc.lookup(b"A") == a and alloc.refs[a] == 2  # shared
    c, d = alloc.allocate(), alloc.allocate()  # the free list first
    assert {c, d}.isdisjoint({a, b})
    e = alloc.allocate()  # then the least recently used unreferenced cached block
    assert e == b and alloc.lookup(b"B") is None
    with pytest.raises(NoFreeBlocks):
        alloc.allocate()
    alloc.check()
    alloc.release([a, a, c, d, e])
    alloc.check()
    assert alloc.num_used == 0 and alloc.lookup(b"A") == a  # kept cached while unreferenced
    with pytest.raises(RuntimeError, match="released more often"):
        alloc.release([a, a])


def test_cache_sizes_and_their_errors(models):
    model = models["llama"]
    engine = Engine(model, max_batch_size=2, max_seq_len=32, block_size=8, kv_cache_memory=1 << 20)
    per_block = 2 * model.cfg.num_layers * 8 * model.cfg.num_query_groups * model.cfg.head_dim * 4
    assert engine.cache.num_blocks == (1 << 20) // per_block and engine.memory_bytes() == engine.cache.num_blocks * per_block
    with pytest.raises(InvalidRequestError, match="one sequence of max_seq_len=32 needs 4"):
        Engine(model, max_seq_len=32, block_size=8, num_kv_blocks=3)
    with pytest.raises(InvalidRequestError, match="num_kv_blocks or kv_cache_memory"):
        Engine(model, num_kv_blocks=8, kv_cache_memory=1 << 20)
    with pytest.raises(InvalidRequestError, match="gpu_memory_utilization"):
        Engine(model, gpu_memory_utilization=1.5)
    assert torch.equal(engine.cache.tables, torch.zeros_like(engine.cache.tables))


def test_serve_load_benchmark_runs_offline(tmp_path):
    """benchmarks/serve_load.py's offline mode on the tiny shape (a tight cache: preemptions): every requested
    token is generated and counted, and the JSON report holds the latency percentiles."""
    import json

    bench = load_benchmark("serve_load")
    argv = ["--shape", "tiny", "--num-requests", "6", "--prompt-len", "4", "30", "--output-len", "2", "9",
            "--max-batch-size", "4", "--max-num-batched-tokens", "16", "--num-kv-blocks", "4", "--passes", "1",
            "--json", str(tmp_path / "load.json"), "--trace", str(tmp_path / "trace.json"), "--trace-steps", "2", "4"]
    assert bench.main(argv) == 0
    (row,) = json.loads((tmp_path / "load.json").read_text())["results"]
    work = bench.workload(bench.parse_args(argv), bench.SHAPES["tiny"]["vocab_size"])
    expected = sum(n for _, n in work)
    assert row["output_tokens"] == expected and row["output_tok_per_s"] > 0
    assert 0 < row["ttft_p50"] <= row["ttft_p99"] and 0 < row["tpot_p50"] <= row["tpot_p99"]
    # the step counters: at most one decode launch a call; every output token after a request's first came from a
    # decode row; every prompt token was fed (more with preemptions: recomputed)
    assert row["step_calls"] >= row["decode_steps"] >= row["chained_steps"] + row["mixed_steps"]
    assert row["decode_rows"] >= expected - len(work) and row["prefill_tokens"] >= sum(len(p) for p, _ in work)
    assert row["prefill_forwards"] >= 1 and row["graphs_compiled"] == 0
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]



def test_serve_load_paged_tile_flag(capsys, monkeypatch):
    """benchmarks/serve_load.py --paged-tile: the paged kernel's tile while the engines run (given back after);
    a tile that is not a power-of-two multiple of the block size, or with --url (a server's process), is refused
    with one error line naming it."""
    from lmforge.serve import kernels

    bench = load_benchmark("serve_load")
    seen = []
    monkeypatch.setattr(bench, "offline", lambda a, shape: seen.append(kernels.PAGED_TILE) or [])
    default = kernels.PAGED_TILE
    assert bench.main(["--shape", "tiny", "--paged-tile", "64"]) == 0
    assert bench.main(["--shape", "tiny"]) == 0
    assert seen == [64, default] and kernels.PAGED_TILE == default
    for argv, message in ((["--paged-tile", "48"], "--paged-tile 48: the paged kernel's tile must be a power of two"),
                          (["--paged-tile", "16", "--block-size", "32"], "--paged-tile 16"),
                          (["--paged-tile", "64", "--url", "http://x/v1"], "offline mode only")):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err

def test_serve_load_goes_on_after_a_failed_shape(tmp_path, monkeypatch, capsys):
    """One call runs several shapes: the first one failing prints its FAILED line, the second still runs and
    reports, and the exit status says something failed."""
    import json

    bench = load_benchmark("serve_load")
    real, seen = bench.offline, []

    def first_fails(a, shape):
        seen.append(shape)
        if len(seen) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(a, shape)

    monkeypatch.setattr(bench, "offline", first_fails)
    argv = ["--shape", "tiny", "tiny", "--num-requests", "2", "--prompt-len", "4", "8", "--output-len", "2", "3",
            "--max-batch-size", "2", "--passes", "1", "--json", str(tmp_path / "load.json")]
    assert bench.main(argv) == 1
    out = capsys.readouterr().out
    assert "tiny: FAILED RuntimeError: CUDA out of memory (simulated)" in out and "fresh engine:" in out
    report = json.loads((tmp_path / "load.json").read_text())
    assert seen == ["tiny", "tiny"] and report["failed"] == ["tiny"] and len(report["results"]) == 1
    assert report["results"][0]["shape"] == "tiny"


def test_engine_gpu_check_reports_every_check(capsys):
    """benchmarks/engine_gpu_check.py's runner: a check that raises prints an ERROR line and the later checks
    still run; the exit status counts mismatches and errors."""
    bench = load_benchmark("engine_gpu_check")
    ran = []

    def broken():
        ran.append("broken")
        raise ValueError("no autograd formula")

    checks = [("fine", lambda: ran.append("fine") or 0), ("broken", broken),
              ("mismatching", lambda: ran.append("mismatching") or 2)]
    assert bench.run_checks(checks) == 1
    out = capsys.readouterr().out
    assert ran == ["fine", "broken", "mismatching"]
    assert "broken: ERROR ValueError: no autograd formula" in out and "FAILED: 3 mismatches or errors" in out
    assert bench.run_checks([("fine", lambda: 0)]) == 0 and capsys.readouterr().out.strip() == "OK"


@pytest.mark.parametrize("budget,max_seq_len,max_batch", [(200, 64, 8), (32, 64, 8), (512, 60, 3), (64, 64, 8)])
def test_the_profiled_prefill_is_the_largest_forward(models, budget, max_seq_len, max_batch):
    """On a GPU the cache gets what the weights and the largest step leave: the profiled prefill (rows of a longest
    sequence's last chunk) is as many rows as prefill_groups puts in one forward (it was one row: a budget of
    several sequences' chunks was measured for one)."""
    engine = Engine(models["gpt"], max_batch_size=max_batch, max_seq_len=max_seq_len, block_size=4,
                    max_num_batched_tokens=budget)
    rows, tokens = engine._profile_shape()
    seqs = [object() for _ in range(min(rows + 1, max_batch))]  # the scheduler runs at most max_batch sequences
    groups = engine.prefill_groups([(q, max_seq_len - tokens, max_seq_len) for q in seqs])
    assert len(groups[0]) == rows and tokens == min(budget, max_seq_len)
    assert rows == {(200, 64, 8): 3, (32, 64, 8): 1, (512, 60, 3): 3, (64, 64, 8): 1}[(budget, max_seq_len, max_batch)]


def test_prefill_forwards_stay_within_the_sized_budget(models):
    """Chunks of one step are grouped so rows x longest chunk <= max_num_batched_tokens and rows x keys gathered
    <= max(budget, max_seq_len): a long chunk beside many short ones does not pad them all to its length."""
    engine = Engine(models["gpt"], max_batch_size=8, max_seq_len=64, block_size=4, max_num_batched_tokens=32)
    seqs = [object() for _ in range(7)]
    chunks = [(seqs[0], 0, 20)] + [(s, 0, 2) for s in seqs[1:5]] + [(seqs[5], 40, 43), (seqs[6], 60, 63)]
    groups = engine.prefill_groups(chunks)
    assert sorted(id(c) for g in groups for c in g) == sorted(id(c) for c in chunks)  # each chunk once
    for g in groups:
        longest = max(hi - lo for _, lo, hi in g)
        keys = max(-(-hi // 4) * 4 for _, _, hi in g)
        assert len(g) * longest <= 32 and len(g) * keys <= 64
    assert groups[0] == [(seqs[0], 0, 20)] and len(groups) < len(chunks)


def test_sampler_survives_extreme_parameters(models):
    """The batched sampler with extreme values in one batch: the smallest temperature that still samples, top_p and
    min_p that keep one token, top_k=1, penalties at their limits; every row gets a valid token, the rows whose
    filters keep one token get the argmax, and a seed gives the same tokens alone or in the batch."""
    from lmforge.models.generate import MIN_TEMPERATURE
    from lmforge.serve.request import Sequence
    from lmforge.serve.sampler import Sampler

    logits = torch.randn(6, 50) * 30
    logits[5, 7] = float("nan")
    params = [SamplingParams(temperature=MIN_TEMPERATURE, seed=1), SamplingParams(temperature=2.0, top_p=1e-9, seed=2),
              SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1e-40, seed=3),
              SamplingParams(temperature=2.0, min_p=1.0, frequency_penalty=2.0, presence_penalty=-2.0, seed=4),
              SamplingParams(temperature=2.0, top_k=10**9, seed=5), SamplingParams(temperature=1.0, seed=6)]
    seqs = [Sequence(f"s{i}", [1, 2, 3], p, torch.device("cpu"), 4) for i, p in enumerate(params)]
    for s in seqs:
        s.output_ids = [4, 4]
    tokens = Sampler().sample(seqs, logits)
    assert all(t is not None and 0 <= t < 50 for t in tokens[:5])
    assert tokens[1] == int(logits[1].argmax()) and tokens[3] == int(logits[3].argmax())
    assert tokens[5] is None and seqs[5].finish_reason == "error" and "not finite" in seqs[5].error
    alone = Sequence("x", [1, 2, 3], params[4], torch.device("cpu"), 4)
    alone.output_ids = [4, 4]
    assert Sampler().sample([alone], logits[4:5]) == [tokens[4]]


def test_decode_tables_follow_a_sequence_whose_blocks_changed(models):
    """A sequence preempted and prefilled again holds other blocks, possibly as many as before, in the same decode
    row: the row's table is rewritten (not only the blocks added since the last step)."""
    engine = Engine(models["gpt"], max_batch_size=2, max_seq_len=32, block_size=4, num_kv_blocks=20)
    # logprobs: each decode step is read at once (no step left in flight while the test preempts)
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=8, temperature=0.0, logprobs=0))
    engine.step()  # prefill
    engine.step()  # a decode step: row 0 written from a's table
    seq = engine.running[0]
    before = list(seq.block_table)
    engine.scheduler.preempt(seq)
    engine.cache.allocator.allocate()  # the free list moves on: a's next blocks are others
    engine.step()  # prefilled again
    assert len(seq.block_table) == len(before) and seq.block_table != before
    engine.step()  # decode: row 0 again
    assert engine.cache.tables[0, : len(seq.block_table)].tolist() == seq.block_table


def test_prompt_logprobs_of_a_request_preempted_mid_prefill(models):
    """Prompt logprobs gathered chunk by chunk start over when the request is preempted before its prompt is done:
    one entry per prompt token, equal to a full forward's."""
    model = models["llama"]
    engine = Engine(model, max_batch_size=2, max_seq_len=32, block_size=4, max_num_batched_tokens=4)
    prompt = [(11 * j + 2) % 60 for j in range(10)]
    engine.add_request("a", prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1))
    assert engine.step() == []  # the first chunk of 4
    engine.scheduler.preempt(engine.running[0])
    first = None
    while engine.has_work():
        for out in engine.step():
            first = first or out
    lps = first.prompt_logprobs
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0].log_softmax(-1)
    assert len(lps) == len(prompt) and lps[0] is None
    for i in range(1, len(prompt)):
        assert lps[i].token_id == prompt[i] and lps[i].logprob == pytest.approx(float(full[i - 1, prompt[i]]), abs=1e-5)
    assert_all_free(engine)


def test_every_step_launches_work_under_a_queue_of_requests(models):
    """Many requests waiting and sequences ending every few steps: a step that reads the decode step left in flight
    and cannot chain the next one schedules and launches the next itself (no call only reads a step, leaving the
    device idle until the next call), and the tokens are still the greedy ones."""
    model = models["llama"]
    engine = Engine(model, max_batch_size=4, max_seq_len=48, block_size=4, max_num_batched_tokens=64)
    launches = []
    for name in ("launch_decode", "launch_chained", "prefill"):
        original = getattr(engine.runner, name)

        def counted(*args, _original=original, **kwargs):
            launches.append(1)
            return _original(*args, **kwargs)
        setattr(engine.runner, name, counted)
    prompts = {f"r{i}": ([(5 * i + j) % 60 for j in range(2 + i % 5)], 3 + (7 * i) % 6) for i in range(8)}
    for rid, (prompt, n) in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0))
    got = {rid: [] for rid in prompts}
    idle = steps = 0
    while engine.has_work():
        before = len(launches)
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
        steps += 1
        idle += len(launches) == before and engine.has_work()
    assert idle == 0, f"{idle} of {steps} steps launched nothing while requests remained"
    for rid, (prompt, n) in prompts.items():
        assert got[rid] == generate(model, prompt, n, greedy=True), rid
    assert_all_free(engine)


def test_decode_tables_go_to_the_device_asynchronously(models, monkeypatch):
    """The decode step's block tables are copied with ``non_blocking`` from a staging buffer (pinned on a GPU): a
    blocking host-to-device copy synchronizes the stream, so the step after one in flight could not be launched
    before that one ended (no overlap of host and device work)."""
    engine = Engine(models["llama"], max_batch_size=2, max_seq_len=32, block_size=4)
    tables = engine.cache.tables
    copies = []
    original = torch.Tensor.copy_

    def spy(dst, src, non_blocking=False):
        if dst.untyped_storage().data_ptr() == tables.untyped_storage().data_ptr():
            copies.append(non_blocking)
        return original(dst, src, non_blocking)
    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    got = run(engine, {"a": ([1, 2, 3], 4), "b": ([4, 5], 5)})
    monkeypatch.undo()
    assert copies and all(copies), copies
    assert got["a"] == generate(models["llama"], [1, 2, 3], 4, greedy=True)


def test_admission_batch_gathers_admissions_into_fewer_prefill_steps(models):
    """With requests queued and sequences ending one by one, ``admission_batch=3`` admits only once three rows
    are free: fewer steps prefill (each prefills several prompts), more decode steps are chained on the device, and
    every request still gets its greedy tokens. An admission_batch below 1 is refused."""
    model = models["llama"]
    prompts = {f"r{i}": ([(3 * i + j) % 60 for j in range(2 + i % 4)], 2 + (5 * i) % 7) for i in range(10)}
    expected = {rid: generate(model, prompt, n, greedy=True) for rid, (prompt, n) in prompts.items()}
    counts = {}
    for batch in (1, 3):
        engine = Engine(model, max_batch_size=4, max_seq_len=32, block_size=4, admission_batch=batch)
        got = run(engine, prompts)
        assert {rid: got[rid] for rid in prompts} == expected, batch
        assert_all_free(engine)
        counts[batch] = engine.metrics
    assert counts[3].mixed_steps < counts[1].mixed_steps
    assert counts[3].prefill_forwards < counts[1].prefill_forwards
    assert counts[3].chained_steps > counts[1].chained_steps
    with pytest.raises(InvalidRequestError, match="admission_batch"):
        Engine(model, max_batch_size=4, max_seq_len=32, admission_batch=0)


def test_decode_rows_stay_put_when_sequences_end(models):
    """Each sequence keeps its decode row while it runs (a sequence that ends frees its row for one other to move
    into), so a block-table row is written whole only when a sequence enters it: at most twice per request here,
    not once for every row after each sequence that ends (rows in the scheduler's order shift). Tokens stay the
    greedy ones."""
    model = models["llama"]
    engine = Engine(model, max_batch_size=8, max_seq_len=48, block_size=4)
    prompts = {f"r{i}": ([(11 * i + j) % 60 for j in range(2 + i % 3)], 4 + (5 * i) % 11) for i in range(16)}
    got = run(engine, prompts)
    assert engine.runner.rows_rewritten <= 2 * len(prompts), engine.runner.rows_rewritten
    for rid, (prompt, n) in list(prompts.items())[:4]:
        assert got[rid] == generate(model, prompt, n, greedy=True), rid
    assert_all_free(engine)


def test_eager_forwards_never_use_cudnn_attention(models, monkeypatch):
    """Every attention of the engine's eager forwards (prefills, eager decode steps) runs with cuDNN's SDPA backend
    switched off: it plans each new shape (~2 ms of host time per call on an H100, the GPU idle meanwhile) and
    prefill shapes rarely repeat. The switch is restored after each forward."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    engine = Engine(models["llama"], max_batch_size=2, max_seq_len=32, block_size=4, max_num_batched_tokens=8)
    run(engine, {"a": ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 3), "b": ([5, 6], 4)})  # a's prompt in two chunks
    assert engine.metrics.prefill_forwards >= 2 and engine.metrics.decode_steps >= 3
    assert len(calls) >= 2 * (engine.metrics.prefill_forwards + engine.metrics.decode_steps)  # 2 layers each
    assert not any(calls)
    assert torch.backends.cuda.cudnn_sdp_enabled()
