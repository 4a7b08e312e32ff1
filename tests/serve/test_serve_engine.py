"""The engine: slot cache == full forward, batched/continuous greedy == one-at-a-time generate(), sampling."""

import pytest
import torch

from lmforge.models import Transformer
from lmforge.models.generate import generate
from lmforge.serve.cache import PagedKVCache
from lmforge.serve.engine import (Engine, InvalidRequestError, PromptTooLongError, SamplingParams,
                                  process_logits)

from tests.models.test_generate import make_model as tiny_model

STYLES = ("gpt", "llama")


def make_model(style: str, max_positions: int = 64, std: float = 0.5) -> Transformer:
    """The generate tests' tiny model, with room for 64 positions."""
    return tiny_model(style, max_positions, std)


PROMPTS = [[3, 17, 42, 5, 9], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [1, 2], [60, 0, 33, 8],
           [5, 5, 5, 5, 5, 5, 5], [40, 41, 42]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.mark.parametrize("style", STYLES)
def test_paged_cache_matches_full_forward(style):
    """Rows in scattered blocks, a chunk after an earlier one (it attends through its table), a decode step with a
    padding row: every row's logits are those of a full forward of its tokens."""
    model = make_model(style)
    prompts = PROMPTS[:3]
    bs = 4
    cache = PagedKVCache(model.cfg, num_blocks=16, block_size=bs, max_seq_len=32, max_rows=4)
    tables = torch.tensor([[9, 2, 0, 0], [5, 0, 0, 0], [3, 14, 7, 11]])  # not in order, padded with scratch 0
    lens = torch.tensor([len(p) for p in prompts])
    first = torch.tensor([3, 1, 6])  # the first chunk of each prompt, then the rest
    with torch.no_grad():
        for lo, hi in ((torch.zeros(3, dtype=torch.long), first), (first, lens)):
            T = int((hi - lo).max())
            ids = torch.zeros(3, T, dtype=torch.long)
            pos = torch.zeros(3, T, dtype=torch.long)
            for b, p in enumerate(prompts):
                n = int(hi[b] - lo[b])
                ids[b, :n] = torch.tensor(p[lo[b]: hi[b]])
                pos[b, :n] = torch.arange(int(lo[b]), int(hi[b]))
            valid = torch.arange(T)[None] < (hi - lo)[:, None]
            cache.bind(tables, pos, valid)
            logits = model(ids, kv_cache=cache, positions=pos)
            for b, p in enumerate(prompts):
                full = model(torch.tensor([p[: hi[b]]]))[0, lo[b]:]
                torch.testing.assert_close(logits[b, : int(hi[b] - lo[b])], full, atol=1e-5, rtol=1e-5)
        # one decode step through the static tables, every row at its own position; row 1 is padding
        cache.tables[:3, :4] = tables.int()
        cache.tables[1] = 0
        nxt = torch.tensor([[4], [0], [6]])
        dpos = torch.tensor([[5], [0], [11]])
        x, rope = model.embed(nxt, positions=dpos)
        cache.bind_decode(torch.arange(20))  # a span beyond every length: the mask hides the rest
        for layer in model.layers:
            x = layer(x, rope, cache, 0, dpos, None)
        step = torch.nn.functional.linear(model.norm(x), model.output_weight())
        for b in (0, 2):
            full = model(torch.tensor([prompts[b] + [int(nxt[b, 0])]]))[0, -1]
            torch.testing.assert_close(step[b, 0], full, atol=1e-5, rtol=1e-5)
    # the padding writes went to the scratch block only: row 1's block holds its prompt token alone
    assert torch.count_nonzero(cache.k[0][5, 1:]) == 0


@pytest.mark.parametrize("style", STYLES)
def test_batched_greedy_equals_single_requests(style):
    model = make_model(style)
    engine = Engine(model, max_batch_size=8)
    out = engine.generate(PROMPTS, GREEDY)
    for prompt, got in zip(PROMPTS, out):
        assert got == generate(model, prompt, 12, greedy=True)
    assert not engine.has_work() and engine.running == [] and not engine._ids


@pytest.mark.parametrize("style", STYLES)
def test_continuous_batching_equals_single_requests(style):
    """Small batch, a small token budget (the 11-token prompt is prefilled in chunks beside decoding rows),
    different lengths: requests join and leave a running batch."""
    model = make_model(style)
    engine = Engine(model, max_batch_size=3, max_num_batched_tokens=12)
    lengths = [3, 9, 1, 14, 6, 2, 11]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths]
    for i, (p, sp) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"r{i}", p, sp)
    got = {f"r{i}": [] for i in range(len(PROMPTS))}
    late_added = False
    max_running = 0
    steps = 0
    while engine.has_work():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
        steps += 1
        max_running = max(max_running, len(engine.running))
        if steps == 4 and not late_added:  # a request arriving while others run
            engine.add_request("late", [9, 8, 7], SamplingParams(max_tokens=10, temperature=0.0))
            got["late"] = []
            late_added = True
    assert max_running == 3
    for i, (p, n) in enumerate(zip(PROMPTS, lengths)):
        assert got[f"r{i}"] == generate(model, p, n, greedy=True), i
    assert got["late"] == generate(model, [9, 8, 7], 10, greedy=True)


def _count_chained(engine: Engine) -> list:
    """Count the decode steps launched before the step before them was read (see Engine.step)."""
    calls = []
    launch = engine._launch_chained

    def spy(d):
        calls.append(d)
        return launch(d)

    engine._launch_chained = spy
    return calls


def test_pipelined_greedy_steps_overlap_and_equal_single_requests():
    """A greedy batch runs one step ahead: each call launches the next step before reading the last."""
    model = make_model("llama")
    engine = Engine(model, max_batch_size=4)
    chained = _count_chained(engine)
    prompts = PROMPTS[:4]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    got = {f"r{i}": [] for i in range(4)}
    first = engine.step()  # prefill: every request's first token
    assert sorted(o.request_id for o in first) == ["r0", "r1", "r2", "r3"]
    for o in first:
        got[o.request_id].extend(o.token_ids)
    assert engine.step() == [] and engine._inflight is not None  # the first decode step is left running
    while engine.has_work():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == generate(model, p, 12, greedy=True)
    # 12 tokens: 1 from the prefill and 11 decode steps; all but the first start from the device's argmax
    # of the step before them, and none is launched past max_tokens (no wasted step)
    assert len(chained) == 10
    assert engine._inflight is None and engine.running == [] and not engine._ids


def test_decode_tables_are_copied_only_when_a_row_changed():
    """The decode step reads the block tables on the device: they are copied from the host only when a row
    changed (a new sequence in it, a block added: every block_size steps), and the tokens are those of single
    requests (a stale table would read another sequence's keys)."""
    model = make_model("llama")
    engine = Engine(model, max_batch_size=4, block_size=4)
    prompts = [PROMPTS[0], PROMPTS[4] + [1], PROMPTS[5][:5]]  # 5 tokens each: their rows grow at the same steps
    got = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
    for p, g in zip(prompts, got):
        assert g == generate(model, p, 20, greedy=True)
    # 19 decode steps over positions 5..23: a block added at positions 8, 12, 16 and 20, after the first copy
    assert engine.metrics.decode_steps == 19 and engine.runner.table_copies == 5


def test_pipelined_steps_with_stops_aborts_and_late_requests():
    """A sequence that stops on a token while the next step runs, an abort between steps, a sampled request
    joining a pipelined greedy batch: the others' tokens are those of single greedy requests."""
    model = make_model("gpt")
    engine = Engine(model, max_batch_size=4)
    chained = _count_chained(engine)
    # r1's prompt: its 5th greedy token is one it has not produced before (the stop below needs that)
    prompts = [PROMPTS[0], PROMPTS[6], PROMPTS[2], PROMPTS[3]]
    refs = [generate(model, p, 14, greedy=True) for p in prompts]
    stop_at = refs[1][4]
    assert stop_at not in refs[1][:4]  # r1 stops after 4 tokens, while a pipelined step runs
    drained = []
    finish_decode = engine._finish_decode

    def spy(d, touched):
        drained.append([s.finish_reason for s in d.seqs])
        return finish_decode(d, touched)

    engine._finish_decode = spy
    params = [SamplingParams(max_tokens=14, temperature=0.0),
              SamplingParams(max_tokens=14, temperature=0.0, stop_token_ids=[stop_at]),
              SamplingParams(max_tokens=14, temperature=0.0),
              SamplingParams(max_tokens=14, temperature=0.0)]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    got = {f"r{i}": [] for i in range(4)}
    finish = {}
    steps = 0
    sampled = SamplingParams(max_tokens=6, temperature=1.0, top_k=5, seed=3)
    while engine.has_work():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finished:
                finish[o.request_id] = o.finish_reason
        steps += 1
        if steps == 8:
            assert engine._inflight is not None
            out = engine.abort("r3")  # while a step of it is in flight
            assert out.finished and out.finish_reason == "abort"
            got["r3"].extend(out.token_ids)
            finish["r3"] = out.finish_reason
            assert engine.abort("r3") is None  # once only
        if steps == 9:
            engine.add_request("late", PROMPTS[4], sampled)
    assert got["r0"] == refs[0] and got["r2"] == refs[2]
    assert got["r1"] == refs[1][: refs[1].index(stop_at)] and finish["r1"] == "stop"
    assert got["r3"] == refs[3][: len(got["r3"])] and len(got["r3"]) < 14 and finish["r3"] == "abort"
    assert len(chained) > 0
    assert [None, "stop", None, None] in drained  # the step after r1's stop was read at once (slots move)
    alone = Engine(model, max_batch_size=4).generate([PROMPTS[4]], sampled)[0]
    assert got["late"] == alone and len(alone) == 6
    assert engine.running == [] and not engine._ids


def test_context_limit_and_validation():
    model = make_model("llama", max_positions=16)
    engine = Engine(model, max_batch_size=2)
    out = engine.generate([list(range(13))], SamplingParams(max_tokens=10, temperature=0.0))
    assert out[0] == generate(model, list(range(13)), 10, greedy=True) and len(out[0]) == 3
    with pytest.raises(PromptTooLongError, match="at most 15 tokens"):
        engine.add_request("x", list(range(16)), GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("x", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("x", [1000], GREEDY)
    for bad, name in ((dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
                      (dict(logprobs=99), "logprobs"), (dict(min_p=2), "min_p")):
        with pytest.raises(InvalidRequestError, match=name) as err:
            engine.add_request("x", [1], SamplingParams(**bad))
        assert err.value.param == name


def test_stop_tokens_seeds_and_logprobs():
    model = make_model("llama")
    engine = Engine(model, max_batch_size=4)
    free = generate(model, PROMPTS[0], 10, greedy=True)
    stop_at = free[4]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))
    assert out[0] == free[: free.index(stop_at)]
    # per-request seeds: the same seed gives the same tokens whatever runs beside it
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.95, min_p=0.01, seed=5)
    alone = engine.generate([PROMPTS[1]], sp)[0]
    crowd = engine.generate([PROMPTS[1], PROMPTS[2], PROMPTS[1]],
                            [sp, SamplingParams(max_tokens=10, seed=6), SamplingParams(max_tokens=10, seed=7)])
    assert crowd[0] == alone and len(alone) == 10
    # logprobs are the model's log-softmax at each step
    engine.add_request("lp", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logprobs=2))
    lps = []
    while engine.has_work():
        for o in engine.step():
            lps.extend(o.logprobs)
    assert [lp.token_id for lp in lps] == free[:3]
    with torch.no_grad():
        full = model(torch.tensor([PROMPTS[0] + free[:2]]))[0].float().log_softmax(-1)
    for i, lp in enumerate(lps):
        row = full[len(PROMPTS[0]) - 1 + i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(2).indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely


def test_process_logits_filters_and_penalties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    greedy = SamplingParams(temperature=0)
    assert torch.equal(process_logits(logits, [greedy], [([], [])]), logits)
    kept = lambda p: torch.isfinite(process_logits(logits, [p], [([], [])])[0]).nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(SamplingParams(top_k=2)) == [1, 3]
    assert kept(SamplingParams(top_p=0.8)) == [1, 3]
    assert kept(SamplingParams(top_p=0.9)) == [1, 2, 3]
    assert kept(SamplingParams(min_p=0.3)) == [1, 3]  # p(3)/p(1) = e^-1 = 0.37; p(2)/p(1) = 0.14
    out = process_logits(logits, [SamplingParams(temperature=2.0)], [([], [])])
    torch.testing.assert_close(out, logits / 2)
    # repetition penalty over prompt and output: positive logits divided, negative multiplied
    out = process_logits(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], [([1], [4])])
    assert out[0].tolist() == [0.0, 1.5, 1.0, 2.0, -2.0]
    # frequency and presence penalties over the output only
    out = process_logits(logits, [SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=1.0)],
                         [([2], [3, 3, 1])])
    assert out[0].tolist() == [0.0, 3.0 - 1.5, 1.0, 2.0 - 2.0, -1.0]
    # rows keep their own parameters
    both = process_logits(logits.repeat(2, 1), [SamplingParams(top_k=1), greedy], [([], []), ([], [])])
    assert torch.isfinite(both[0]).sum() == 1 and torch.isfinite(both[1]).all()


@pytest.mark.parametrize("style", STYLES)
def test_prompt_logprobs_in_a_padded_prefill(style):
    """Prompt logprobs (echo) of prompts of different lengths prefilled together equal a full forward's, and
    max_tokens=0 requests end after the prefill while the others of the batch go on."""
    model = make_model(style)
    engine = Engine(model, None, max_batch_size=4)
    k = 3
    wants = {"a": (PROMPTS[2], 0), "b": (PROMPTS[0], 5), "c": (PROMPTS[1], 0), "d": (PROMPTS[5], 4)}
    for rid, (prompt, n) in wants.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, prompt_logprobs=k))
    first = {o.request_id: o for o in engine.step()}  # one prefill of all four
    assert first["a"].finished and first["a"].token_ids == [] and first["a"].finish_reason == "length"
    assert first["c"].finished and first["c"].prompt_logprobs == [None]  # a one-token prompt has nothing to score
    assert not first["b"].finished and len(first["b"].token_ids) == 1
    for rid, (prompt, n) in wants.items():
        lps = first[rid].prompt_logprobs
        with torch.no_grad():
            full = model(torch.tensor([prompt]))[0].log_softmax(-1)  # (T, V)
        assert len(lps) == len(prompt) and lps[0] is None
        for i in range(1, len(prompt)):
            assert lps[i].token_id == prompt[i]
            assert lps[i].logprob == pytest.approx(float(full[i - 1, prompt[i]]), abs=1e-5)
            top_v, top_i = full[i - 1].topk(k)
            assert [t for t, _ in lps[i].top] == top_i.tolist()
    rest = {rid: [] for rid in wants}
    while engine.has_work():
        for o in engine.step():
            assert o.prompt_logprobs is None  # sent once, with the first output
            rest[o.request_id].extend(o.token_ids)
    assert first["b"].token_ids + rest["b"] == generate(model, PROMPTS[0], 5, greedy=True)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("e", PROMPTS[0], SamplingParams(max_tokens=0))  # 0 needs prompt logprobs


def _metaspace_tokenizer(folder, text: str):
    """A SentencePiece-style tokenizer (Metaspace: a word-start space is a piece of its token, byte fallback)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    from lmforge.data.tokenizers import load_tokenizer

    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    backend.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"] + byte_tokens))
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder / "tokenizer.json")


@pytest.mark.parametrize("kind", ["byte_level_bpe", "metaspace"])
def test_streamed_text_equals_a_whole_decode(kind, tmp_path):
    """The engine decodes only the newest few tokens per step; the streamed pieces still add up to the text of
    decoding every generated token at once, for multi-byte characters split across tokens too."""
    import inspect
    import textwrap

    from lmforge.data.tokenizers import train_bpe

    text = inspect.getsource(textwrap) + " héllo wörld, naïve café — 日本語のテキスト 😀🚀 ∑∫ " * 40
    if kind == "byte_level_bpe":
        (tmp_path / "corpus.txt").write_text(text)
        tok = train_bpe([tmp_path / "corpus.txt"], 400, tmp_path / "tok")
    else:
        tok = _metaspace_tokenizer(tmp_path / "tok", text)
    from lmforge.models import ModelConfig

    cfg = ModelConfig(**{**make_model("llama").cfg.to_dict(), "vocab_size": tok.vocab_size,
                         "max_position_embeddings": 256})
    model = Transformer(cfg)
    model.init_weights(seed=3)
    engine = Engine(model.eval(), tok, max_batch_size=4)
    prompts = [tok.encode(t) for t in ("日本", "def f", "😀", " naïve")]
    for i, prompt in enumerate(prompts):  # random weights + temperature 1: arbitrary token sequences
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=i, ignore_eos=True))
    pieces = {f"r{i}": [] for i in range(len(prompts))}
    ids = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            pieces[out.request_id].append(out.text)
            ids[out.request_id].extend(out.token_ids)
    multibyte = 0
    for rid in pieces:
        whole = tok.decode(ids[rid], skip_special_tokens=True)
        assert "".join(pieces[rid]) == whole, rid
        multibyte += sum(ord(c) > 127 for c in whole)
    assert multibyte > 20  # the check covered characters of several bytes


def test_compiled_model_is_fused_and_frozen_before_the_cache_is_sized(monkeypatch):
    """The KV cache is sized (on a GPU: from the memory the weights leave) after the model took its serving form:
    fused projections, frozen parameters. Sized before, the fusion's copies came on top of a full card (8B OOM)."""
    import lmforge.serve.engine as engine_mod
    from lmforge.serve.runner import prepare_model

    events = []

    def recorded_prepare(model, compiled, decode_kernels, live=False):
        events.append(("prepare", compiled))  # False: compile_decode is GPU-only; prepared as if compiled
        return prepare_model(model, True, decode_kernels)

    def recorded_blocks(self, *args):
        fused = getattr(self.model.layers[0].self_attn, "qkv_proj", None) is not None
        events.append(("size", fused, all(not p.requires_grad for p in self.model.parameters())))
        return 4

    monkeypatch.setattr(engine_mod, "prepare_model", recorded_prepare)
    monkeypatch.setattr(Engine, "_num_blocks", recorded_blocks)
    Engine(make_model("llama"), None, max_batch_size=1, max_seq_len=64)
    assert events == [("prepare", False), ("size", True, True)]  # sized for the fused, frozen model

    model = make_model("llama")
    assert prepare_model(model, True, decode_kernels=False) is False  # no kernels on the CPU
    names = dict(model.named_parameters())
    assert "layers.0.self_attn.qkv_proj.weight" in names and "layers.0.mlp.gate_up_proj.weight" in names
    assert not any(p.requires_grad for p in model.parameters())
    assert prepare_model(model, True, decode_kernels=False) is False and len(dict(model.named_parameters())) == len(names)


def test_a_fresh_prefill_builds_no_mask_and_a_later_chunk_does(monkeypatch):
    """The prefill mask (B, 1, T, S) is built only when a layer attends through the tables: a prefill of fresh
    prompts (the hook's causal attention) builds none; a chunk after cached blocks builds one. Outputs are those
    of one-at-a-time generate() either way."""
    built = []
    original = PagedKVCache._prefill_mask

    def spy(self):
        built.append(self._bound[3] is None)
        return original(self)

    monkeypatch.setattr(PagedKVCache, "_prefill_mask", spy)
    model = make_model("llama")
    engine = Engine(model, max_batch_size=4, block_size=4)
    fresh = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    for prompt, got in zip(fresh, engine.generate(fresh, GREEDY)):
        assert got == generate(model, prompt, 12, greedy=True)
    assert not any(built)  # no mask built for fresh prompts
    later = PROMPTS[2][:8] + [30, 31]  # its first two blocks are cached: its prefill starts at position 8
    (got,) = engine.generate([later], GREEDY)
    assert got == generate(model, later, 12, greedy=True)
    assert sum(built) == 1 and len(built) == model.cfg.num_layers  # built once, then shared by every layer
