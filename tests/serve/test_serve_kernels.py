"""The decode step's Triton kernels (lmforge.serve.kernels), run by Triton's interpreter on the CPU.

The interpreter must be chosen before Triton is imported, so the checks run in another Python process: one
per module (the ``interpret`` fixture, tests/forked.py), which imports torch, Triton and lmforge's serving modules
once and runs each check in a forked child of itself (a fresh copy of the imported modules). (Its bfloat16
matrix products are wrong, a limitation of the interpreter: the attention is checked in float16 and float32 here,
bfloat16 on a GPU by benchmarks/engine_gpu_check.py.)
"""

import os
import textwrap
from pathlib import Path

import pytest

from tests.forked import ForkedPython


SRC = str(Path(__file__).resolve().parents[2] / "src")

CHECKS = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from lmforge.serve import kernels as K

    torch.manual_seed(0)
    # single-row products: odd sizes (masked edges), bf16 and fp32, a row-major view; the large matrices' blocks
    # (BLOCK_K 2048) at K > 2048. (Past 4096 rows the launch differs only in warps and stages, which the
    # interpreter ignores: matvec_config's choice is checked below.)
    for N, Kd, dt in [(300, 64, torch.float32), (37, 100, torch.float32), (64, 2048, torch.bfloat16),
                      (33, 4100, torch.bfloat16)]:
        w = torch.randn(N, Kd, dtype=dt)
        x = torch.randn(1, 1, Kd, dtype=dt)
        y = K.matvec(x, w)
        assert y.shape == (1, 1, N) and y.dtype == dt, (y.shape, y.dtype)
        ref = F.linear(x.float(), w.float())
        tol = 1e-4 if dt == torch.float32 else 1e-2 * ref.abs().max().item()
        err = (y.float() - ref).abs().max().item()
        assert err <= tol, (N, Kd, dt, err)
    for N, Kd, dt in [(40, 96, torch.float32), (70, 1100, torch.bfloat16)]:  # 70: the last program's rows masked
        gu = torch.randn(1, 1, 2 * Kd, dtype=dt)
        w = torch.randn(N, Kd, dtype=dt)
        ref = F.linear(F.silu(gu[..., :Kd].float()) * gu[..., Kd:].float(), w.float())
        y = K.swiglu_matvec(gu, w)
        assert y.shape == (1, 1, N) and y.dtype == dt
        err = (y.float() - ref).abs().max().item()
        assert err <= (1e-4 if dt == torch.float32 else 1e-2 * ref.abs().max().item()), (N, Kd, dt, err)
    # the prologue and epilogues: the row RMS-normalised (its norm weight folded into the matrix), a bias, a residual
    # bf16 with a residual rounds twice (the product, then the sum) as the eager model does: up to about one bf16 ulp
    # of the largest output (2 ** -7 of it; measured 0.6-1.1% over seeds, the eager model 0.3-0.6%): 2 ulps allowed
    bf16_tol = 2 ** -6
    torch.manual_seed(0)  # this section's data whatever the cases above drew
    for N, Kd, dt in [(96, 64, torch.float32), (130, 2048, torch.bfloat16)]:
        x, w = 3 * torch.randn(1, 1, Kd, dtype=dt), torch.randn(N, Kd, dtype=dt)
        b, r = torch.randn(N, dtype=dt), torch.randn(1, 1, N, dtype=dt)
        ref = r.float() + F.linear(F.rms_norm(x.float(), (Kd,), eps=1e-5), w.float(), b.float())
        y = K.matvec(x, w, b, residual=r, rms_eps=1e-5)
        assert y.shape == (1, 1, N) and y.dtype == dt
        err = (y.float() - ref).abs().max().item()
        assert err <= (1e-4 if dt == torch.float32 else bf16_tol * ref.abs().max().item()), (N, Kd, dt, err)
        gu = torch.randn(1, 1, 2 * Kd, dtype=dt)
        w2 = torch.randn(N, Kd, dtype=dt)
        ref = r.float() + F.linear(F.silu(gu[..., :Kd].float()) * gu[..., Kd:].float(), w2.float())
        err = (K.swiglu_matvec(gu, w2, residual=r).float() - ref).abs().max().item()
        assert err <= (1e-4 if dt == torch.float32 else bf16_tol * ref.abs().max().item()), (N, Kd, dt, err)
    # rotary + cache write of one token: queries returned rotated, keys rotated and values stored at the position
    from lmforge.models.transformer import apply_rotary, rope_cos_sin
    nh, nkv, hd, p = 4, 2, 32, 17
    cos, sin = rope_cos_sin(hd, 50, 10000.0)
    for dt in (torch.float32, torch.bfloat16):
        qkv = torch.randn(1, 1, (nh + 2 * nkv) * hd, dtype=dt)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        kc, vc = torch.zeros(3, 50, nkv, hd, dtype=dt), torch.zeros(3, 50, nkv, hd, dtype=dt)
        qo = K.rope_cache_write(q, k, v, cos[p][None, None], sin[p][None, None], torch.tensor([[p]]), kc, vc)
        q_ref = apply_rotary(q.view(1, 1, nh, hd), cos[p:p + 1], sin[p:p + 1])
        k_ref = apply_rotary(k.view(1, 1, nkv, hd), cos[p:p + 1], sin[p:p + 1])
        # bf16: the model rounds each product of the rotation, the kernel only the result (1-2 units apart)
        tol = 1e-5 if dt == torch.float32 else 2e-2 * q_ref.float().abs().max().item()
        assert qo.shape == (1, 1, nh, hd) and qo.dtype == dt
        assert (qo.float() - q_ref.float()).abs().max().item() < tol
        assert (kc[0, p].float() - k_ref[0, 0].float()).abs().max().item() < tol
        assert torch.equal(vc[0, p], v.view(nkv, hd))
        kc[0, p] = 0
        vc[0, p] = 0
        assert not kc.any() and not vc.any()  # nothing else written
    cfg = K.matvec_config(2048, 2048)
    assert cfg["BLOCK_N"] * cfg["BLOCK_K"] <= 32768
    assert K.matvec_config(5000, 48) == {"BLOCK_N": K.MATVEC_ROWS, "BLOCK_K": 64, "num_warps": 8, "num_stages": 1}
    assert K.matvec_config(300, 64)["num_warps"] == 4 and K.matvec_config(33, 4100)["BLOCK_K"] == 2048
    # decode attention vs SDPA: grouped heads, keys as strided views of a slot cache, per-row positions and
    # a sliding window, spans that are not a multiple of the block, a row whose first blocks are all hidden
    for B, nh, nkv, hd, S, dt in [(1, 32, 8, 64, 384, torch.float16), (2, 6, 2, 16, 100, torch.float32),
                                  (1, 4, 4, 128, 64, torch.float32), (3, 8, 1, 32, 130, torch.float32)]:
        cache_k = torch.randn(B + 1, 500, nkv, hd, dtype=dt)
        cache_v = torch.randn(B + 1, 500, nkv, hd, dtype=dt)
        k, v = cache_k[:B, :S].transpose(1, 2), cache_v[:B, :S].transpose(1, 2)
        q = torch.randn(B, 1, nh, hd, dtype=dt).transpose(1, 2)
        pos = torch.randint(0, S, (B,))
        pos[-1] = S - 1
        keys = torch.arange(S)
        mask = (keys <= pos[:, None, None, None]) & (pos[:, None, None, None] - keys < 50)
        out = K.decode_attention(q, k, v, mask, hd ** -0.5)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                             enable_gqa=nkv != nh)
        assert out.shape == (B, nh, 1, hd) and out.dtype == dt
        err = (out.float() - ref).abs().max().item()
        assert err < (2e-3 if dt == torch.float16 else 1e-5), (B, nh, nkv, hd, S, dt, err)
    # one mask row shared by the batch (stride 0)
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    mask = (torch.arange(70) < 33)[None, None, None, :]
    out = K.decode_attention(q, k, v, mask, 0.25)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.25)
    assert (out - ref).abs().max().item() < 1e-5
    # paged decode attention vs its PyTorch reference: blocks scattered through the tables, lengths from 1 to
    # the whole table, grouped heads, a sliding window, several splits of a row's blocks
    kc, vc = torch.randn(8, 16, 2, 16), torch.randn(8, 16, 2, 16)
    tables = torch.tensor([[5, 2, 7], [3, 6, 1]], dtype=torch.int32)
    q = torch.randn(2, 4, 16)
    for lens, window, splits in ((torch.tensor([48, 1]), 0, 2), (torch.tensor([40, 45]), 21, 1)):
        ref = K.paged_attention_reference(q, kc, vc, tables, lens, 0.25, window or None)
        out = K.paged_decode_attention(q, kc, vc, tables, lens, 0.25, window, splits)
        assert out.shape == (2, 4, 16) and (out - ref).abs().max().item() < 1e-5, (window, (out - ref).abs().max())
    # fp32 with a sliding window, the case of engine_gpu_check.py: 5 rows of up to 700 keys, window 37, shared out
    # over 1 to 27 splits (27: the H100's count; most splits then hold no visible block), against a float64 reference
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(221, 16, 2, 64, generator=g), torch.randn(221, 16, 2, 64, generator=g)
    tables = (torch.randperm(220, generator=g) + 1).view(5, 44).int()
    lens, q = torch.tensor([700, 7, 627, 589, 57]), torch.randn(5, 6, 64, generator=g)
    ref = K.paged_attention_reference(q.double(), kc.double(), vc.double(), tables, lens, 0.125, 37)
    assert ref.dtype == torch.float64
    for splits in (1, 3, 27):
        out = K.paged_decode_attention(q, kc, vc, tables, lens, 0.125, 37, splits)
        assert (out.double() - ref).abs().max().item() < 1e-5, (splits, (out.double() - ref).abs().max())
    # the cache's hook in a decode step of 3 rows (rotary, cache write, the paged kernel; a sliding window) gives the
    # block's output of the reference path (gather + the model's attention) and writes the same cache
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import Transformer
    from lmforge.serve.cache import PagedKVCache
    cfg = ModelConfig(vocab_size=50, hidden_size=64, num_layers=1, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", sliding_window=9)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.eval()
    ids, pos = torch.tensor([[3], [7], [11]]), torch.tensor([[20], [5], [40]])
    filled = torch.randn(12, 16, 2, 16), torch.randn(12, 16, 2, 16)
    results, kernel_calls = [], []
    paged = K.paged_decode_attention
    K.paged_decode_attention = lambda *a: kernel_calls.append(1) or paged(*a)
    for use_kernel in (False, True):
        cache = PagedKVCache(cfg, 12, 16, 64, 4)
        cache.k[0].copy_(filled[0])
        cache.v[0].copy_(filled[1])
        cache.tables[:3, :3] = torch.tensor([[4, 9, 0], [2, 0, 0], [7, 1, 11]], dtype=torch.int32)
        cache.use_kernel = use_kernel
        with torch.no_grad():
            x, rope = model.embed(ids, positions=pos)
            cache.bind_decode(torch.arange(48))
            results.append((model.layers[0](x, rope, cache, 0, pos, None), cache.k[0].clone(), cache.v[0].clone()))
    (ref, k_ref, v_ref), (out, k_out, v_out) = results
    assert (out - ref).abs().max().item() < 1e-5 and (k_out - k_ref).abs().max().item() < 1e-5
    assert torch.equal(v_out, v_ref) and not torch.equal(k_out, filled[0]) and len(kernel_calls) == 1
    print("kernels ok")
""")


# The paged kernel with one cache block per loop iteration (the default) and with several (a tile of 64 or 128
# positions gathered through a vector of table entries): each against the float64 reference, with 3 splits and
# (several blocks a tile) with the heuristic's.
TILES_CHECK = textwrap.dedent("""
    import torch
    from lmforge.serve import kernels as K

    # rows of mixed lengths (1, not a multiple of the tile, a whole tile, several), blocks scattered through the
    # tables; grouped heads (4 a group and 1), head sizes 64 and 128, fp16 and fp32 (IEEE products), windows, blocks
    # of 16 and 32. Whatever the kernel must not read is NaN (the blocks no row holds, where the table's entries past
    # a row's blocks point, the blocks wholly before a row's window), so a read past a row's keys shows in the output.
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([1, 70, 128, 200, 15])
    cases = [  # (heads, kv heads, head dim, block size, dtype, window, tolerance)
        (8, 2, 64, 16, torch.float16, 0, 2e-3), (4, 4, 128, 16, torch.float32, 37, 1e-5),
        (8, 2, 64, 32, torch.float32, 100, 1e-5)]
    for nh, nkv, hd, bs, dt, window, tol in cases:
        width = -(-int(lens.max()) // bs) + 1  # a spare column past every row's blocks
        used = [-(-int(n) // bs) for n in lens]
        kc = torch.randn(1 + sum(used), bs, nkv, hd, generator=g)
        vc = torch.randn(1 + sum(used), bs, nkv, hd, generator=g)
        tables = torch.zeros(len(lens), width, dtype=torch.int32)  # block 0: never read
        order = (torch.randperm(sum(used), generator=g) + 1).tolist()
        kc[0], vc[0] = float("nan"), float("nan")
        for r, n in enumerate(used):
            tables[r, :n] = torch.tensor(order[:n], dtype=torch.int32)
            order = order[n:]
            if window:  # blocks wholly before the window
                for j in range(max(int(lens[r]) - window, 0) // bs):
                    kc[tables[r, j]], vc[tables[r, j]] = float("nan"), float("nan")
        q = torch.randn(len(lens), nh, hd, generator=g)
        kc, vc, q = kc.to(dt), vc.to(dt), q.to(dt)
        ref = K.paged_attention_reference(q.double(), kc.double().nan_to_num(), vc.double().nan_to_num(), tables, lens,
                                          hd ** -0.5, window or None)
        for tile in (bs, 64, 128):
            for splits in ((3,) if tile == bs else (0, 3)):  # one block a tile: the heuristic's splits above too
                out = K.paged_decode_attention(q, kc, vc, tables, lens, hd ** -0.5, window, splits, tile)
                err = (out.double() - ref).abs().max().item()
                assert out.dtype == dt and err < tol, (nh, nkv, hd, bs, dt, window, tile, splits, err)
    print("tiles ok")
""")



# benchmarks/paged_attention.py's case on a tiny shape (fp16: the interpreter's bf16 products are wrong), each tile
# against the float64 reference; the timer is a stand-in (CUDA graphs need a GPU).
BENCH_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, BENCHMARKS)
    import paged_attention as P

    P.CASES["tiny"] = (4, 2, 16, 3, 20, 70)
    calls = []
    rows = P.run_case("tiny", [16, 64], False, lambda fn, xs: calls.append(len(xs)) or 10.0, 100.0,
                      torch.device("cpu"), torch.float16)
    assert [r["tile"] for r in rows] == [16, 64] and all(r["ok"] and r["max_err"] < 2e-3 for r in rows), rows
    q, lengths, copies, needed = P.make_case(4, 2, 16, 3, 20, 70, torch.device("cpu"), torch.float16)
    assert needed == int(lengths.sum()) * 2 * 16 * 2 * 2 and len(copies) == 16 == calls[0]  # 16 copies: the cap
    gbs = needed / 10.0 / 1e3  # bytes / us
    assert rows[0]["gbs"] == round(gbs) and rows[0]["frac_of_copy"] == round(gbs / 100, 3), rows[0]
    # a rollout-shaped case: every row at one length, tables sized for more positions; --splits times each split
    P.CASES["tiny_rollout"] = (4, 2, 16, 1, 20, 20, 64)
    row, = P.run_case("tiny_rollout", [16], False, lambda fn, xs: 10.0, 100.0, torch.device("cpu"), torch.float16,
                      splits_list=(3,))
    assert row["table_blocks"] == 4 and row["lengths"] == [20, 20] and row["ok"], row
    assert [(e["splits"], e["ok"]) for e in row["by_splits"]] == [(3, True)], row["by_splits"]
    print("bench ok")
""")

# The engine's batch-1 decode through the kernels (folded norms, the five-kernel block, rotary + cache write,
# a sliding window) gives the greedy tokens of the same model without them. Each token's kernel calls are
# counted, so a fallback to the model's own code cannot pass unnoticed.
ENGINE_CHECK = textwrap.dedent("""
    import copy
    from collections import Counter
    import torch
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import Transformer, fuse_projections
    from lmforge.serve import kernels as K
    from lmforge.serve.engine import Engine, SamplingParams

    # 16 rows a program: the same kernel code as the default's 2 rows (which the kernels' check runs on every
    # kind of product) in an eighth of the programs the interpreter runs one by one
    K.MATVEC_ROWS = 16
    calls = Counter()
    for name in ("_matvec_op", "rope_cache_write", "paged_decode_attention"):
        def counted(*args, _fn=getattr(K, name), _name=name, **kw):
            calls[_name] += 1
            return _fn(*args, **kw)
        setattr(K, name, counted)

    for window in (None, 5):
        cfg = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=96, max_position_embeddings=64, normalization="rmsnorm",
                          activation="swiglu", bias=False, position_embedding_type="rope",
                          share_embeddings_and_output_weights=False, init_method_std=0.3, sliding_window=window)
        ref = Transformer(cfg)
        ref.init_weights(seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # norm weights far from 1, so folding them matters
            for layer in ref.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        ref.eval()
        fast = copy.deepcopy(ref)
        fuse_projections(fast)
        K.use_decode_kernels(fast)
        assert all(type(b) is K.DecodeBlock and b.folded for b in fast.layers)
        outputs = []
        for model in (ref, fast):
            engine = Engine(model, None, max_batch_size=1, max_seq_len=40, decode_kernels=model is fast)
            tokens = []
            for i, prompt in enumerate(([3, 17, 42, 5, 9, 11, 2], [60])):
                engine.add_request(str(i), prompt, SamplingParams(max_tokens=4, temperature=0.0))
                tokens.append([])
                while engine.has_work():
                    for out in engine.step():
                        tokens[-1] += out.token_ids
            outputs.append(tokens)
        assert outputs[0] == outputs[1] and len(outputs[0][0]) == 4, (window, outputs)
    # per window: 2 prompts x 3 decode steps x 2 layers; the one-token prompt's prefill is a single row too (its
    # 2 layers run the block's products, and the reference attention: the cache is not in a decode step)
    assert calls == {"_matvec_op": 2 * (2 * 3 * 2 + 2) * 4, "rope_cache_write": 2 * 2 * 3 * 2,
                     "paged_decode_attention": 2 * 2 * 3 * 2}, calls
    print("engine ok")
""")


# The start-up capture of a compiled engine (ModelRunner.capture_all) on a model whose parameters require grad,
# with the Triton kernels installed (the interpreter runs them on CPU tensors). The pieces are compiled as on a
# GPU but with the aot_eager backend, which traces a backward graph when grad is enabled: through the custom
# ops, which have none, that failed ("Trying to backward through lmforge.matvec.default"). CUDA graphs
# themselves are left out (a stand-in DecodeGraphs runs the compiled pieces once per shape).
CAPTURE_CHECK = textwrap.dedent("""
    from collections import Counter
    import torch
    from lmforge.models.transformer import fuse_projections
    from lmforge.serve import kernels as K
    from lmforge.serve import runner as R
    from lmforge.serve.cache import PagedKVCache
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import Transformer

    calls = Counter()
    matvec = K._matvec_op
    K._matvec_op = lambda *a: calls.update(["matvec"]) or matvec(*a)
    draw = K.sampled_draw
    K.sampled_draw = lambda *a: calls.update([("draw", a[2] is not None, a[3])]) or draw(*a)
    assert K.DRAW_KERNEL is True  # the default; its start-up compile is checked here
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4,
                                    num_query_groups=2, ffn_hidden_size=96, max_position_embeddings=64,
                                    normalization="rmsnorm", activation="swiglu", bias=False,
                                    position_embedding_type="rope")).eval()
    assert all(p.requires_grad for p in model.parameters())  # as built for training (the benchmarks' models too)
    fuse_projections(model)
    K.use_decode_kernels(model)
    cache = PagedKVCache(model.cfg, 3, 16, 16, 1, torch.device("cpu"), torch.float32)
    runner = R.ModelRunner(model, cache, 1, 16)
    modes = []

    class CPUGraphs(R.DecodeGraphs):
        def __init__(self, runner):
            compiled = lambda fn: torch.compile(fn, backend="aot_eager")
            self.embed, self.blocks, self.head = (compiled(runner._decode_embed), compiled(runner._decode_blocks),
                                                  compiled(runner._decode_head))
            self.spans, self.keys, self.graphs = [(0, len(runner.model.layers))], runner.keys, {}
            self.inputs = torch.zeros(3, runner.max_rows, dtype=torch.long)

        def capture(self, B, span):
            modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
            out = self._step(self.inputs[0, :B, None], self.inputs[1, :B, None], self.keys[:span])
            self.graphs[(B, span)] = ([], out)

    runner.graphs = CPUGraphs(runner)
    runner.capture_all(lambda msg: None)
    assert modes == [(False, True)], modes  # the mode Engine.step replays in
    assert calls["matvec"] > 0, calls  # the custom op ran inside the compiled pieces
    # the sampled steps' draw kernels compiled at start-up: plain, tempered and filtered rows
    assert [calls[("draw", t, f)] for t, f in ((False, True), (True, True), (False, False))] == [1, 1, 1], calls
    logits, greedy = runner.graphs.graphs[(1, 16)][1]
    assert logits.shape == (1, model.cfg.vocab_size) and not logits.requires_grad
    print("capture ok")
""")


DRAW_CHECK = textwrap.dedent("""
    import torch
    from lmforge.models.generate import MIN_TEMPERATURE
    from lmforge.serve import kernels as K
    from lmforge.serve.request import LOGIT_LIMIT, SamplingParams, Sequence
    from lmforge.serve.sampler import RowSampling, filter_rows, filter_settings, invert, next_tokens, row_keys, uniforms

    LIMIT = LOGIT_LIMIT / MIN_TEMPERATURE
    K.DRAW_BLOCK = 1024  # several chunks at a small vocabulary, the last one shorter (3001 = 2 x 1024 + 953)
    g = torch.Generator().manual_seed(0)
    tally = {"draws": 0, "kernel_vs_float64": 0, "torch_vs_float64": 0}

    def torch_draw(rows, u):  # next_tokens' tensor operations on filtered rows: picks, -1 where not finite
        pick, ok = invert(rows, u)
        return pick.masked_fill_(~ok, -1)

    def against_float64(picks, rows, u):
        # the kernel's picks and the tensor operations' (on the same filtered rows) against the float64 inverse of
        # each row's distribution function: a pick unlike float64's only where the target sits on a boundary
        cdf = rows.double().softmax(-1).cumsum(-1)
        want = torch.searchsorted(cdf, u.double()[:, None] * cdf[:, -1:])[:, 0].clamp_(max=rows.shape[1] - 1)
        assert bool((rows.gather(1, picks[:, None]) > float("-inf")).all())  # never a filtered token
        for r in (picks != want).nonzero()[:, 0].tolist():
            edge = cdf[r, min(int(picks[r]), int(want[r]))]
            assert abs(float(u[r]) * float(cdf[r, -1]) - float(edge)) < 1e-5, (r, int(picks[r]), int(want[r]))
        tally["draws"] += len(picks)
        tally["kernel_vs_float64"] += int((picks != want).sum())
        tally["torch_vs_float64"] += int((torch_draw(rows, u) != want).sum())

    n, V = 32, 3001
    for b in range(2):
        x = torch.randn(n, V, generator=g) * 3
        x[torch.rand(n, V, generator=g) < 0.3] = float("-inf")  # tokens filtered before the draw
        u = uniforms(row_keys(torch.arange(n), torch.full((n,), b)))
        temp = torch.rand(n, 1, generator=g) + 0.5
        for t in (None, temp):  # the kernel applies the temperature and clamp as it reads (a plain row's filter)
            picks = K.sampled_draw(x, u, t, True, LIMIT)
            rows = filter_rows(x, t, None, None, None)
            assert picks.dtype == torch.int64 and torch.equal(picks, torch_draw(rows, u)), b
            against_float64(picks, rows, u)
        # top-k, top-p and min-p rows: filtered by filter_rows first, the kernel draws from them as given
        params = [SamplingParams(max_tokens=1, temperature=0.7 + 0.01 * i, top_k=[0, 5, 50][i % 3],
                                 top_p=[1.0, 0.9, 0.5][i % 3 - 1], min_p=0.02 * (i % 2)) for i in range(n)]
        rows = filter_rows(x.clone(), *filter_settings(params, V, "cpu"))
        picks = K.sampled_draw(rows, u, None, False, LIMIT)
        assert torch.equal(picks, torch_draw(rows, u)), b
        against_float64(picks, rows, u)
    # the kernel's sums are float64: no further from the float64 draw than the tensor operations' float32 sums
    assert tally["kernel_vs_float64"] <= min(tally["torch_vs_float64"], tally["draws"] // 200), tally

    # rows that are not finite: -1, as next_tokens marks them; the clamp (apply_filter) draws +inf and -inf rows
    x = torch.randn(6, V, generator=g)
    x[0] = float("-inf")  # every token filtered
    x[1, 7] = float("nan")
    x[2, 2999] = float("inf")
    x[3, :2900] = float("-inf")  # the first chunks all filtered: the draw lands in the last, shorter one
    x[4, 1000] = 80.0  # one token carries all the mass
    x[5] = float("nan")
    u = torch.tensor([0.5, 0.5, 0.5, 0.999, 1e-7, 0.5])
    assert K.sampled_draw(x, u, None, False, LIMIT).tolist()[:3] == [-1, -1, -1]
    given = K.sampled_draw(x, u, None, False, LIMIT)
    assert given[5] == -1 and torch.equal(given[3:5], torch_draw(x[3:5], u[3:5])) and int(given[3]) >= 2900
    clamped = K.sampled_draw(x, u, None, True, LIMIT)
    want = torch_draw(filter_rows(x, None, None, None, None), u)
    assert torch.equal(clamped, want) and clamped[1] == clamped[5] == -1 and clamped[2] == 2999, (clamped, want)
    assert 0 <= int(clamped[0]) < V and int(clamped[4]) == 1000
    # a vocabulary smaller than one block, and of one token
    for V1 in (50, 1):
        x = torch.randn(8, V1, generator=g)
        u = uniforms(row_keys(torch.arange(8), torch.zeros(8, dtype=torch.long)))
        assert torch.equal(K.sampled_draw(x, u, None, True, LIMIT), torch_draw(x, u))

    # next_tokens through RowSampling(kernel=True): the same tokens as the tensor operations, dense (every row
    # samples; padding rows after them keep their argmax) and not (greedy rows between), filters or none
    V = 3001
    for kinds in (["plain"] * 5, ["plain", "greedy", "topk", "plain", "greedy"]):
        settings = {"plain": dict(temperature=1.0), "greedy": dict(temperature=0.0),
                    "topk": dict(temperature=0.8, top_k=7)}
        seqs = [Sequence(f"r{i}", [1], SamplingParams(max_tokens=4, seed=i, **settings[k]), torch.device("cpu"), 9)
                for i, k in enumerate(kinds)]
        logits = torch.randn(8, V, generator=g) * 2
        drawn = {}
        for kernel in (False, True):
            sampling = RowSampling.build(seqs, V, "cpu", kernel=kernel)
            assert sampling.kernel is kernel and sampling.advanced().kernel is kernel
            out = []
            for _ in range(3):  # chained steps: each row's next token index
                out.append(next_tokens(logits, logits.argmax(-1), sampling).tolist())
                sampling = sampling.advanced()
            drawn[kernel] = out
        assert drawn[True] == drawn[False], (kinds, drawn)
        assert all(row[5:] == logits.argmax(-1)[5:].tolist() for row in drawn[True])
    print("draw ok", tally)
""")

DRAW_ENGINE_CHECK = textwrap.dedent("""
    import torch
    from lmforge.serve import kernels as K
    from lmforge.serve.engine import Engine, SamplingParams
    from tests.serve.test_serve_engine import PROMPTS, make_model

    calls = []
    draw = K.sampled_draw
    K.sampled_draw = lambda *args: calls.append(args[0].shape) or draw(*args)
    model = make_model("llama")
    params = [SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=11),
              SamplingParams(max_tokens=9, temperature=1.3, seed=-(2 ** 62) - 5),
              SamplingParams(max_tokens=9, temperature=1.0, seed=3)]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    got = {}
    for on in (True, False):
        K.DRAW_KERNEL = on
        del calls[:]
        engine = Engine(model, max_batch_size=4)
        assert engine.runner.draw_kernel is on
        got[on] = engine.generate(prompts, params)
        assert engine.metrics.chained_steps >= 5  # the drawn tokens fed the next steps on the device
        assert bool(calls) is on, len(calls)
    assert got[True] == got[False] and got[True][0] != got[True][1], got
    engine = Engine(model, max_batch_size=4, decode_kernels=False)  # the switch: no decode kernels, no draw kernel
    assert not engine.runner.draw_kernel
    print("draw engine ok")
""")


@pytest.fixture(scope="module")
def interpret(tmp_path_factory):
    """``interpret(code) -> (exit status, output)``: the code run by Triton's interpreter (see the module's
    docstring), in the current directory with the checkout's src first on the path."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    python = ForkedPython(tmp_path_factory.mktemp("interpret"), ["torch", "triton", "lmforge.serve.engine",
                          "lmforge.serve.kernels", "lmforge.serve.runner", "lmforge.serve.sampler"], env)
    yield python.run
    python.close()


def test_kernels_match_reference_ops_in_the_triton_interpreter(interpret):
    rc, out = interpret(CHECKS)
    assert rc == 0 and "kernels ok" in out, out[-6000:]


def test_paged_kernel_tiles_match_the_float64_reference(interpret):
    rc, out = interpret(TILES_CHECK)
    assert rc == 0 and "tiles ok" in out, out[-6000:]


def test_paged_attention_benchmark_case(interpret):
    rc, out = interpret(f"BENCHMARKS = {str(Path(SRC).parent / 'benchmarks')!r}\n" + BENCH_CHECK)
    assert rc == 0 and "bench ok" in out, out[-6000:]


def test_paged_attention_benchmark_sweep():
    """The benchmark's sweep of one tile: every warps x stages at the heuristic's splits (a launch that fails is
    recorded, not fatal), then the other splits with the fastest correct launch's warps and stages."""
    from tests.conftest import load_benchmark

    bench = load_benchmark("paged_attention")

    def launch(cfg, splits):
        if cfg["num_stages"] == 4:
            raise RuntimeError("out of resources: shared memory")
        us = 10.0 * cfg["num_warps"] + cfg["num_stages"] + (splits or 3)
        return {"us": us, "ok": not (cfg["num_warps"] == 2 and cfg["num_stages"] == 1)}  # the fastest is wrong

    best, timings = bench.sweep_tile(launch, 64, 3, 8)
    assert len(timings) == 12 + 4 and sum("error" in t for t in timings) == 3
    assert [(t["num_warps"], t["num_stages"], t["splits"]) for t in timings[12:]] == [(2, 2, s) for s in (1, 2, 4, 8)]
    assert best == {"num_warps": 2, "num_stages": 2, "splits": 1, "us": 23.0, "ok": True}


def test_paged_attention_benchmark_command_line(capsys):
    """--cases rollout names the GRPO rollout's decode shapes (1B heads, tables for 384 positions); --splits is a
    list of splits from 1 to 64, anything else one error line."""
    import pytest

    from tests.conftest import load_benchmark

    bench = load_benchmark("paged_attention")
    cases, tiles, sweep, splits = bench.parse(["--cases", "rollout,8b_b128", "--tiles", "32,128", "--splits", "1,2,4"])
    assert cases == ["1b_r64_l128", "1b_r64_l256", "1b_r64_l384", "1b_r256_l256", "8b_b128"]
    assert tiles == [32, 128] and not sweep and splits == [1, 2, 4]
    assert all(bench.CASES[c][:4] == (32, 8, 64, 64 if "r64" in c else 256) and bench.CASES[c][6] == 384
               for c in cases[:4])
    assert bench.parse([])[3] == []  # no --splits: the heuristic's alone
    for bad, says in (("0", "--splits 0: give splits from 1 to 64"), ("1,x", "--splits 1,x: give integers")):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse(["--splits", bad])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_paged_config_tile_choice():
    """The paged kernel's tile: 128 positions (at least one block) unless a tile or PAGED_TILE asks for another
    (a tile of one block keeps the launch of before); a tile that is not a power of
    two of at least the block size is refused, naming the value; the splits never outnumber the table's tiles."""
    import pytest
    import torch

    from lmforge.serve import kernels as K

    assert K.paged_config(16, 128)["TILE"] == 128 and K.paged_config(32, 64)["TILE"] == 128
    assert K.paged_config(256, 64)["TILE"] == 256  # never less than a block
    assert K.paged_config(16, 128, 16) == {"TILE": 16, "num_warps": 4, "num_stages": 3}
    assert K.paged_config(16, 128, 64)["TILE"] == 64
    old = K.PAGED_TILE
    try:
        K.PAGED_TILE = 32
        assert K.paged_config(16, 128)["TILE"] == 32 and K.paged_config(16, 128, 64)["TILE"] == 64
    finally:
        K.PAGED_TILE = old
    for bad in (8, 24, 48):
        with pytest.raises(ValueError, match=f"got {bad}"):
            K.paged_config(16, 128, bad)
    with pytest.raises(ValueError, match="got 16"):
        K.paged_config(32, 64, 16)
    for hd in (64, 128, 256):  # the larger tiles' stages fit the shared memory, in bf16 and fp32
        for itemsize in (2, 4):
            for tile in (32, 64, 128):
                cfg = K.paged_config(16, hd, tile, itemsize)
                assert 16 <= cfg["TILE"] <= tile and cfg["num_stages"] >= 1
                assert cfg["TILE"] == 16 or 2 * cfg["TILE"] * hd * itemsize * cfg["num_stages"] <= K.PAGED_STAGE_BYTES
    assert K.paged_config(16, 256, 128, 4)["TILE"] == 64  # (128, 256) fp32: 256 KB a stage
    cpu = torch.device("cpu")
    assert K.paged_splits(1, 1, 20, cpu) == 16 and K.paged_splits(1, 1, 20, cpu, tile_blocks=8) == 3


def test_batch_one_decode_through_the_kernels_matches_the_model(interpret):
    rc, out = interpret(ENGINE_CHECK)
    assert rc == 0 and "engine ok" in out, out[-6000:]


def test_kernels_are_installed_only_where_they_apply():
    """use_decode_kernels swaps module classes in place (same state dict names) and folds a Llama block's norm
    weights into its fused projections (same function); on the CPU the model's own code runs."""
    import torch

    from lmforge.models.transformer import Attention, fuse_projections
    from lmforge.serve.kernels import DecodeBlock, DecodeGatedMLP, MatVecLinear, use_decode_kernels
    from tests.models.test_generate import make_model

    torch.manual_seed(0)
    model = make_model("llama", 64, 0.5)
    with torch.no_grad():
        for layer in model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    ids = torch.tensor([[3, 17, 42, 5, 9]])
    with torch.no_grad():
        ref = model(ids)
    keys = set(model.state_dict())
    fuse_projections(model)
    n = use_decode_kernels(model)
    kinds = {type(m) for m in model.modules()}
    assert {MatVecLinear, DecodeGatedMLP, DecodeBlock} <= kinds and n > 0
    assert all(type(layer.self_attn) is Attention for layer in model.layers)  # attention: the cache's hook
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert all(layer.folded and torch.equal(layer.input_layernorm.weight, torch.ones(32)) for layer in model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)
    assert len(model.state_dict()) < len(keys)  # fused projections: fewer, larger matrices

    gpt = make_model("gpt", 64, 0.5)  # LayerNorm blocks: swapped, nothing folded
    with torch.no_grad():
        ref = gpt(ids)
    fuse_projections(gpt)
    use_decode_kernels(gpt)
    assert all(type(layer) is DecodeBlock and not layer.folded for layer in gpt.layers)
    with torch.no_grad():
        torch.testing.assert_close(gpt(ids), ref, atol=1e-5, rtol=1e-5)


def test_start_up_capture_runs_in_inference_mode_through_the_custom_ops(interpret):
    rc, out = interpret(CAPTURE_CHECK)
    assert rc == 0 and "capture ok" in out, out[-6000:]


def test_draw_kernel_matches_the_tensor_draw_and_float64(interpret):
    """lmforge.serve.kernels.sampled_draw (two Triton kernels) draws next_tokens' distribution: on rows with
    filtered (-inf) tokens, tempered or top-k/top-p/min-p-filtered rows, over chunks with a shorter last one, it
    picks the tensor operations' tokens, unlike a float64 inverse only where the target sits on a boundary; rows
    that are not finite give -1 (every token filtered, NaN, +inf as given), the clamp draws the +inf row; and
    next_tokens through RowSampling(kernel=True) gives the same tokens, dense or not."""
    rc, out = interpret(DRAW_CHECK)
    assert rc == 0 and "draw ok" in out, out[-6000:]


def test_engine_draws_sampled_steps_with_the_kernel_where_decode_kernels_run(interpret):
    """The engine's chained sampled steps draw with the Triton kernels when its decode kernels run (here Triton's
    interpreter) and DRAW_KERNEL is on, the same tokens as the tensor operations; decode_kernels=False turns it off."""
    rc, out = interpret(DRAW_ENGINE_CHECK)
    assert rc == 0 and "draw engine ok" in out, out[-6000:]
