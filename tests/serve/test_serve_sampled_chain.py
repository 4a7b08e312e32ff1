"""Sampled decode steps drawn on the device and chained (lmforge.serve.sampler.next_tokens, RowSampling).

A request's k-th token is its filtered distribution's inverse at a uniform that is a fixed function of (its seed,
k): the engine must draw exactly what a plain loop over full forwards draws with that rule, whether its steps
were chained on the device (every row plain) or read by the host sampler (a penalised row beside it)."""

import pytest
import torch

from lmforge.serve.engine import Engine, InvalidRequestError, SamplingParams
from lmforge.serve.sampler import draw, filter_rows, filter_settings, row_keys, uniforms

from tests.conftest import load_benchmark
from tests.serve.test_serve_engine import PROMPTS, make_model

PLAIN = [SamplingParams(max_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=11),
         SamplingParams(max_tokens=9, temperature=1.3, min_p=0.05, seed=-(2 ** 62) - 5),
         SamplingParams(max_tokens=9, temperature=0.0)]


@torch.no_grad()
def _reference(model, prompt: list[int], p: SamplingParams) -> list[int]:
    """The rule step by step: a full forward per token, the filters, the seeded draw."""
    tokens = list(prompt)
    V = model.cfg.vocab_size
    for k in range(p.max_tokens):
        logits = model(torch.tensor([tokens]))[0, -1:].float()
        if p.greedy:
            tokens.append(int(logits.argmax()))
            continue
        pick, ok = draw(filter_rows(logits, *filter_settings([p], V, logits.device)),
                        row_keys(torch.tensor([p.seed]), torch.tensor([k])))
        assert bool(ok[0])
        tokens.append(int(pick[0]))
    return tokens[len(prompt):]


def test_draws_follow_the_distribution():
    """Counted over 40,000 draws (seed 7, token indices 0..39,999): each token as often as its probability
    (within 4 standard deviations), a filtered token never; a row that is not finite is flagged."""
    n = 40_000
    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    logits = probs.log()[None].expand(n, -1)  # log 0 = -inf: filtered
    keys = row_keys(torch.full((n,), 7), torch.arange(n))
    pick, ok = draw(logits, keys)
    freq = torch.bincount(pick, minlength=5).double() / n
    assert bool(ok.all()) and freq[2] == 0
    assert torch.all((freq - probs.double()).abs() <= 4 * (probs.double() * (1 - probs.double()) / n).sqrt())
    u = uniforms(keys)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert len(set(u.tolist())) > 0.99 * n  # a uniform per (seed, index)
    _, flagged = draw(torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), keys[:2])
    assert flagged.tolist() == [False, True]


def test_sampled_steps_chain_and_draw_the_seeded_rule():
    model = make_model("llama")
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    want = [_reference(model, q, p) for q, p in zip(prompts, PLAIN)]
    assert want[0] != want[1]  # a real draw: the two sampled requests differ
    engine = Engine(model, max_batch_size=4)
    assert engine.generate(prompts, PLAIN) == want
    assert engine.metrics.chained_steps >= 5  # the sampled steps ran back to back on the device
    # beside a penalised request (its rows are read and drawn by the host sampler, no step chained): same tokens
    engine = Engine(model, max_batch_size=4)
    penalised = SamplingParams(max_tokens=12, temperature=1.0, repetition_penalty=1.3, seed=2)
    got = engine.generate(prompts + [PROMPTS[1]], PLAIN + [penalised])
    assert got[:3] == want and engine.metrics.chained_steps == 0
    assert engine.cache.allocator.num_used == 0


def test_a_draw_from_a_distribution_that_is_not_finite_fails_its_request_alone():
    """A device-drawn row whose logits are NaN gives -1, read as that request's error; the other rows go on."""
    model = make_model("llama")
    engine = Engine(model, max_batch_size=2)
    decode_step = engine.runner.decode_step
    broken = {}

    def nan_for_one_row(ids, positions, keys):
        logits, greedy = decode_step(ids, positions, keys)
        row = next((r for r, s in enumerate(engine.runner._row_seq) if s.request_id == "bad"), None)
        if row is not None and positions[row, 0] >= len(PROMPTS[0]) + 2:
            logits = logits.clone()
            logits[row] = float("nan")
            broken["row"] = row
        return logits, greedy

    engine.runner.decode_step = nan_for_one_row
    engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=8, temperature=1.0, seed=1))
    engine.add_request("ok", PROMPTS[2], SamplingParams(max_tokens=8, temperature=1.0, seed=2))
    outs = {}
    while engine.has_work():
        for o in engine.step():
            tokens, _ = outs.get(o.request_id, ([], None))
            outs[o.request_id] = (tokens + list(o.token_ids), o)
    assert "row" in broken
    bad, ok = outs["bad"][1], outs["ok"][1]
    assert bad.finish_reason == "error" and "not finite" in bad.error and len(outs["bad"][0]) == 3
    assert ok.finish_reason == "length" and outs["ok"][0] == _reference(model, PROMPTS[2], SamplingParams(
        max_tokens=8, temperature=1.0, seed=2))
    assert engine.cache.allocator.num_used == 0


def test_chained_draws_use_each_tokens_own_uniform(monkeypatch):
    """RowSampling computes the uniforms of WINDOW chained steps at once (and draws every row in place when all
    rows sample): step j of a chain, across window boundaries, must draw what one step's row_keys(seed, counter
    + j) draws (the host sampler's rule), with all rows sampled or a greedy row among them, padding rows kept."""
    from lmforge.serve.request import Sequence
    from lmforge.serve.sampler import RowSampling, next_tokens

    monkeypatch.setattr(RowSampling, "WINDOW", 3)
    V, steps = 50, 7
    params = [SamplingParams(max_tokens=9, temperature=1.0, seed=5), SamplingParams(max_tokens=9, temperature=0.0),
              SamplingParams(max_tokens=9, temperature=0.7, top_k=10, seed=2 ** 40 + 3)]
    logits = torch.randn(steps, 4, V, generator=torch.Generator().manual_seed(0))  # 4 rows: the last is padding
    for rows in ([0, 2], [0, 1, 2]):  # every row samples (dense) / a greedy row among them
        seqs = [Sequence(f"r{i}", [1], params[i], torch.device("cpu"), 9) for i in rows]
        for i, s in enumerate(seqs):
            s.num_generated = 2 + i
        sampling = RowSampling.build(seqs, V, "cpu")
        assert sampling.dense == (rows == [0, 2])
        for j in range(steps):
            got = next_tokens(logits[j], logits[j].argmax(-1), sampling).tolist()
            want = logits[j].argmax(-1).tolist()
            for b, s in enumerate(seqs):
                if not s.params.greedy:
                    pick, _ = draw(filter_rows(logits[j, b: b + 1], *filter_settings([s.params], V, "cpu")),
                                   row_keys(torch.tensor([s.seed]), torch.tensor([s.num_generated + j])))
                    want[b] = int(pick[0])
            assert got == want, (rows, j)
            sampling = sampling.advanced()


class _CountingTokenizer:
    """Text of one character per token; counts its decodes. ``eod_id``: the end-of-text token."""

    def __init__(self, eod_id):
        self.eod_id, self.decodes = eod_id, 0

    def decode(self, ids, skip_special_tokens=False) -> str:
        self.decodes += 1
        return "".join(chr(97 + t % 26) for t in ids)


def _run(engine: Engine, prompts, params) -> tuple[dict, dict]:
    """Each request's tokens and its outputs, stepping by hand (request i is "q{i}")."""
    for i, (q, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"q{i}", q, p)
    tokens, outs = {}, {}
    while engine.has_work():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
            outs.setdefault(o.request_id, []).append(o)
    return tokens, outs


def test_token_id_only_engine_draws_the_same_tokens_with_no_text():
    """detokenize=False, stream_outputs=False (online RL's rollouts): the tokens and finish reasons of the default
    engine (an end-of-text token still stops a request), greedy and seeded draws, no decode of any text, and one
    output per request, at its end; stop strings are refused with the reason."""
    model = make_model("llama")
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[6]]
    params = [SamplingParams(max_tokens=14, temperature=1.0, seed=s) for s in (1, 2, 3)] + [
        SamplingParams(max_tokens=14, temperature=0.0)]
    first, _ = _run(Engine(model, _CountingTokenizer(None), max_batch_size=4), prompts, params)
    eod = first["q0"][4]  # a token request 0 draws: with it as end-of-text, that request stops early
    streamed, _ = _run(Engine(model, _CountingTokenizer(eod), max_batch_size=4), prompts, params)
    tok = _CountingTokenizer(eod)
    engine = Engine(model, tok, max_batch_size=4, detokenize=False, stream_outputs=False)
    got, outs = _run(engine, prompts, params)
    assert got == streamed and len(got["q0"]) < 14
    assert outs["q0"][0].finish_reason == "stop"
    assert all(len(o) == 1 and o[0].finished and o[0].text == "" for o in outs.values())
    assert tok.decodes == 0 and engine.metrics.chained_steps > 0
    with pytest.raises(InvalidRequestError, match="detokenize=False"):
        engine.add_request("s", [1, 2], SamplingParams(max_tokens=3, stop=["ab"]))


def test_decode_steps_padded_to_a_larger_batch_draw_the_same_tokens():
    """A compiled engine with decode_batches runs a step of n rows in the smallest captured batch >= n, rows
    beyond n padding. The same padding on the eager step (CPU): the tokens of unpadded steps, greedy and sampled,
    as requests end and the batch shrinks."""
    model = make_model("llama")
    prompts = [PROMPTS[i] for i in (0, 1, 2, 4, 6)]
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=1.0 if i % 2 else 0.0, seed=i) for i in range(5)]
    want, _ = _run(Engine(model, max_batch_size=8), prompts, params)
    engine = Engine(model, max_batch_size=8)
    engine.runner.batches = [2, 8]  # what compile_decode with decode_batches=[2] sets (no CUDA graphs on a CPU)
    assert [engine.runner.batch_bucket(n) for n in (1, 2, 3, 8)] == [2, 2, 8, 8]
    padded = []
    launch = engine.runner.decode_step
    engine.runner.decode_step = lambda ids, *a: padded.append(ids.shape[0]) or launch(ids, *a)
    got, _ = _run(engine, prompts, params)
    assert got == want and set(padded) == {2, 8} and engine.metrics.chained_steps > 0
    with pytest.raises(InvalidRequestError, match="decode_batches must be batch sizes from 1 to 8"):
        Engine(model, max_batch_size=5, decode_batches=[16])


def test_steps_chain_on_past_sequences_that_end_as_padding_rows():
    """Compiled with a captured batch size above the live rows (decode_batches), a sequence that ends on its
    end-of-text token leaves a padding row behind and the steps go on chained: the tokens of an engine that
    schedules afresh after every end, every block given back, and a second round of the same prompts (their
    blocks now from the prefix cache, next to the rows the ended sequences wrote last) draws them again."""
    model = make_model("llama")
    prompts = [PROMPTS[i] for i in (0, 2, 4, 5, 6)]
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=s) for s in range(4)] + [
        SamplingParams(max_tokens=16, temperature=0.0)]
    first, _ = _run(Engine(model, _CountingTokenizer(None), max_batch_size=8), prompts, params)
    eod = max(set(first["q0"][2:10]), key=lambda t: sum(t in first[q][:12] for q in first))
    plain = Engine(model, _CountingTokenizer(eod), max_batch_size=8)
    want, _ = _run(plain, prompts, params)
    ends = [q for q, t in want.items() if len(t) < 16]
    assert len(ends) >= 2  # several requests stop early, at different steps
    engine = Engine(model, _CountingTokenizer(eod), max_batch_size=8, block_size=4)  # full blocks to cache
    engine.runner.batches = [8]  # what compile_decode with decode_batches=[8] sets (no CUDA graphs on a CPU)
    padded_rows = []
    launch = engine.runner.launch_chained

    def spy(d, seqs=None):
        padded_rows.append(sum(s is None for s in (seqs or [])))
        return launch(d, seqs)

    engine.runner.launch_chained = spy
    got, outs = _run(engine, prompts, params)
    assert got == want and max(padded_rows) >= 2
    assert engine.metrics.chained_steps > plain.metrics.chained_steps  # the ends no longer break the chain
    assert engine.cache.allocator.num_used == 0 and not engine.running
    again, _ = _run(engine, prompts, params)
    assert again == want and engine.cache.allocator.hits > 0


# -- the two-level draw (sampler.invert): chunk masses, then a scan inside the chosen chunk ----------------------

def _one_scan(processed, u):
    """The draw before the two levels: one softmax and one scan over the whole vocabulary (a reference)."""
    cdf = processed.softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    pick = torch.searchsorted(cdf, u[:, None] * total)[:, 0]
    return pick.clamp_(max=processed.shape[-1] - 1), torch.isfinite(total[:, 0])


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile of ``df`` degrees of freedom at the standard normal quantile ``z`` (3.09: 0.999),
    by the Wilson-Hilferty approximation."""
    a = 2 / (9 * df)
    return df * (1 - a + z * a ** 0.5) ** 3


@pytest.mark.parametrize("chunk", [4, 5])  # 13 tokens: chunks 4+4+4+1 (a shorter last chunk) / 5+5+3
def test_the_two_level_draw_picks_each_token_as_often_as_its_probability(chunk):
    """40,000 draws (seed 3, token indices 0..39,999) from 13 uneven probabilities, a whole chunk of them and
    single tokens filtered (-inf): the counts pass a chi-square test at 0.999, a filtered token (or a place past
    the vocabulary in the last chunk) is never drawn."""
    from lmforge.serve.sampler import invert

    n = 40_000
    probs = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.31, 0.02, 0.0, 0.17, 0.005, 0.12, 0.3, 0.045, 0.03])
    logits = probs.log()[None].expand(n, -1)
    pick, ok = invert(logits, uniforms(row_keys(torch.full((n,), 3), torch.arange(n))), chunk=chunk)
    counts = torch.bincount(pick, minlength=13).double()
    assert bool(ok.all()) and counts.sum() == n and counts[probs == 0].sum() == 0
    live = probs > 0
    expected = n * probs.double()[live]
    chi2 = float(((counts[live] - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(int(live.sum()) - 1), chi2
    # the same uniforms through one scan over the vocabulary: the same tokens here (no target near a boundary)
    assert torch.equal(pick, _one_scan(logits, uniforms(row_keys(torch.full((n,), 3), torch.arange(n))))[0])


@pytest.mark.parametrize("V, chunk", [(3001, None), (3000, 100)])  # a prime vocabulary: a shorter last chunk
def test_the_two_level_draw_is_the_inverse_of_the_float64_distribution(V, chunk):
    """Rows of random logits, half of them top-k and min-p filtered: each pick equals a float64 scan's at the same
    uniform, but where that uniform lies within 1e-5 of the boundary between the two picks; a pick never has zero
    probability."""
    from lmforge.serve.sampler import draw_chunk, invert

    g = torch.Generator().manual_seed(0)
    n = 2000
    logits = torch.randn(n, V, generator=g) * 3
    half = [SamplingParams(temperature=0.7, top_k=200, min_p=0.01)] * (n // 2)
    logits[: n // 2] = filter_rows(logits[: n // 2], *filter_settings(half, V, "cpu"))
    u = uniforms(row_keys(torch.full((n,), 5), torch.arange(n)))
    pick, ok = invert(logits, u, chunk=chunk)
    assert bool(ok.all())
    assert chunk is not None or V % draw_chunk(V)  # the default chunk leaves a shorter last one here
    p64 = logits.double().softmax(-1)
    cdf = p64.cumsum(-1)
    want = torch.searchsorted(cdf, u.double()[:, None] * cdf[:, -1:])[:, 0]
    assert bool((p64.gather(1, pick[:, None]) > 0).all())
    differ = (pick != want).nonzero()[:, 0]
    for r in differ.tolist():  # the target sits on the boundary between the two tokens
        edge = cdf[r, min(int(pick[r]), int(want[r]))]
        assert abs(float(u[r]) * float(cdf[r, -1]) - float(edge)) < 1e-5, r
    assert len(differ) <= n // 100


def test_the_two_level_draw_flags_rows_as_the_one_scan_did():
    """Every token filtered, a NaN logit, an unclamped +inf logit: not finite (as one scan over the vocabulary
    flagged them), the picks valid indices. next_tokens filters first (filter_rows clamps, as before): the +inf
    logit is drawn, -inf logits sit at the floor (a row of them all is drawn, not flagged), a NaN row gives -1."""
    from lmforge.serve.request import Sequence
    from lmforge.serve.sampler import RowSampling, invert, next_tokens

    V = 11
    rows = torch.randn(5, V, generator=torch.Generator().manual_seed(1))
    rows[0] = float("-inf")
    rows[1, 7] = float("nan")
    rows[2, 9] = float("inf")
    rows[3, :6] = float("-inf")  # a whole first chunk filtered
    u = torch.tensor([0.5, 0.5, 0.5, 0.999, 1e-7])
    for chunk in (3, 4, None):
        pick, ok = invert(rows, u, chunk=chunk)
        assert ok.tolist() == _one_scan(rows, u)[1].tolist() == [False, False, False, True, True]
        assert bool(((pick >= 0) & (pick < V)).all()) and int(pick[3]) >= 6
        assert pick[3:].tolist() == _one_scan(rows, u)[0][3:].tolist()
    seqs = [Sequence(f"r{i}", [1], SamplingParams(max_tokens=4, temperature=1.0, seed=i), torch.device("cpu"), 9)
            for i in range(5)]
    got = next_tokens(rows, rows.nan_to_num().argmax(-1), RowSampling.build(seqs, V, "cpu"))
    assert got[1:3].tolist() == [-1, 9] and 0 <= int(got[0]) < V and int(got[3]) >= 6


def test_a_sampled_step_at_temperature_one_scans_no_vocabulary_wide_row():
    """A chained step's draw (every row at temperature 1, no filter: a GRPO rollout's) runs no scan over a whole
    row and no division by the temperature: the only whole-row passes are the clamp, the softmax and the chunk
    sums (each a kernel over the batch's logits on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lmforge.serve.request import Sequence
    from lmforge.serve.sampler import RowSampling, next_tokens

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append((func.__name__.split(".")[0], args[0].shape if torch.is_tensor(args[0]) else None))
            return func(*args, **(kwargs or {}))

    n, V = 4, 3000
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(2))
    seqs = [Sequence(f"r{i}", [1], SamplingParams(max_tokens=4, temperature=1.0, seed=i), torch.device("cpu"), 9)
            for i in range(n)]
    sampling = RowSampling.build(seqs, V, "cpu")
    sampling.uniforms()  # the window of uniforms (once per 64 steps)
    greedy = logits.argmax(-1)
    with Record() as rec:
        next_tokens(logits, greedy, sampling)
    scans = [shape for name, shape in rec.ops if name.startswith("cumsum")]
    assert scans and all(shape[-1] < V for shape in scans)
    views = ("alias", "slice", "view", "select", "unsqueeze")
    whole = [name for name, shape in rec.ops if shape == (n, V) and name not in views + ("gather",)]
    assert sorted(whole) == ["_softmax", "clamp"] and not any(name.startswith("div") for name, _ in rec.ops)


def test_the_draw_benchmark_runs(capsys):
    """benchmarks/sampled_draw.py (run by hand at 64 x 128,256) on a small size: its time, operations and the
    agreement counts with the one-scan and float64 draws; on the CPU the tensor operations draw (no Triton kernel:
    ``kernel`` false) and --kernel is refused in one line."""
    module = load_benchmark("sampled_draw")
    out = module.main(["--rows", "4", "--vocab", "2003", "--repeats", "2", "--warmup", "1", "--agreement", "2"])
    assert out["ms_per_draw_min"] > 0 and out["ops_per_draw"] > 0 and out["agreement"]["draws"] == 8
    assert 0 <= out["agreement"]["two_level_vs_float64"] <= 8
    assert out["kernel"] is False and "kernel_vs_float64" not in out["agreement"]
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--kernel"])
    assert exit_info.value.code == 2 and "--kernel: the Triton draw runs on a CUDA device" in capsys.readouterr().err
