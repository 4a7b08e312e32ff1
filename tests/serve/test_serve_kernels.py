"""The decode step's Triton kernels (lmforge.serve.kernels), run by Triton's interpreter on the CPU.

The interpreter must be chosen before Triton is imported, so the checks run in a fresh interpreter
process. (Its bfloat16 matrix products are wrong, a limitation of the interpreter: the attention is
checked in float16 and float32 here, bfloat16 on a GPU by benchmarks/engine_gpu_check.py.)
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path


SRC = str(Path(__file__).resolve().parents[2] / "src")

CHECKS = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from lmforge.serve import kernels as K

    torch.manual_seed(0)
    # single-row products: odd sizes (masked edges), bf16 and fp32, a row-major view
    for N, Kd, dt in [(300, 64, torch.float32), (37, 100, torch.float32), (64, 2048, torch.bfloat16),
                      (33, 4100, torch.bfloat16), (5000, 48, torch.float32)]:
        w = torch.randn(N, Kd, dtype=dt)
        x = torch.randn(1, 1, Kd, dtype=dt)
        y = K.matvec(x, w)
        assert y.shape == (1, 1, N) and y.dtype == dt, (y.shape, y.dtype)
        ref = F.linear(x.float(), w.float())
        tol = 1e-4 if dt == torch.float32 else 1e-2 * ref.abs().max().item()
        err = (y.float() - ref).abs().max().item()
        assert err <= tol, (N, Kd, dt, err)
    for N, Kd, dt in [(40, 96, torch.float32), (2048, 1100, torch.bfloat16)]:
        gu = torch.randn(1, 1, 2 * Kd, dtype=dt)
        w = torch.randn(N, Kd, dtype=dt)
        ref = F.linear(F.silu(gu[..., :Kd].float()) * gu[..., Kd:].float(), w.float())
        y = K.swiglu_matvec(gu, w)
        assert y.shape == (1, 1, N) and y.dtype == dt
        err = (y.float() - ref).abs().max().item()
        assert err <= (1e-4 if dt == torch.float32 else 1e-2 * ref.abs().max().item()), (N, Kd, dt, err)
    cfg = K.matvec_config(2048, 2048)
    assert cfg["BLOCK_N"] * cfg["BLOCK_K"] <= 32768
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
    print("kernels ok")
""")


def test_kernels_match_reference_ops_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "kernels ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_kernels_are_installed_only_where_they_apply():
    """use_decode_kernels swaps module classes in place (same state dict); on the CPU the model's own code runs."""
    import torch

    from lmforge.models.transformer import fuse_projections
    from lmforge.serve.kernels import DecodeAttention, DecodeGatedMLP, MatVecLinear, use_decode_kernels
    from tests.models.test_generate import make_model

    model = make_model("llama", 64, 0.5)
    ids = torch.tensor([[3, 17, 42, 5, 9]])
    with torch.no_grad():
        ref = model(ids)
    keys = set(model.state_dict())
    fuse_projections(model)
    n = use_decode_kernels(model)
    kinds = {type(m) for m in model.modules()}
    assert MatVecLinear in kinds and DecodeAttention in kinds and DecodeGatedMLP in kinds and n > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)
    assert len(model.state_dict()) < len(keys)  # fused projections: fewer, larger matrices
