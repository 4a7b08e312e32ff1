"""The training speed paths compute what the plain ones do (fp32, 1e-6): joint q/k/v and gate/up matmuls, the
chunked head + cross-entropy, LoRA's shared x @ A, the compute-dtype LoRA cast; float8's module choice and its
refusals; the loop without per-step host syncs logs the same losses."""

import copy

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.models.transformer import set_joint_projections
from lmforge.train.objectives import CausalLMLoss, chunked_linear_cross_entropy, token_cross_entropy

TOL = 1e-6


def tiny(**kw) -> Transformer:
    cfg = dict(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
               ffn_hidden_size=64, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu", bias=False,
               position_embedding_type="rope", share_embeddings_and_output_weights=True, hidden_dropout=0.0,
               attention_dropout=0.0)
    cfg.update(kw)
    model = Transformer(ModelConfig(**cfg))
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norms and biases too, so a wrong join shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def loss_and_grads(model, tokens, mask=None, chunk=None):
    model.zero_grad(set_to_none=True)
    loss_sum, n = CausalLMLoss(model, loss_chunk_size=chunk)(tokens, loss_mask=mask)
    loss = loss_sum / n  # the trainer's per-token mean
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert abs(la.item() - lb.item()) <= TOL * max(1.0, abs(la.item()))
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        assert (ga[k] - gb[k]).abs().max().item() <= TOL * max(1.0, ga[k].abs().max().item()), k


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (3, 17), generator=g)
    mask = (torch.rand(3, 17, generator=g) > 0.3).long()
    return tokens, mask


@pytest.mark.parametrize("kw", [{}, dict(bias=True, num_query_groups=4, share_embeddings_and_output_weights=False)])
def test_joint_projections_equal_separate(batch, kw):
    tokens, mask = batch
    plain = tiny(**kw)
    joint = copy.deepcopy(plain)
    assert set_joint_projections(joint) == 4  # q/k/v and gate/up of two blocks
    assert joint.state_dict().keys() == plain.state_dict().keys()  # names (checkpoints, HF map) unchanged
    assert_same(loss_and_grads(plain, tokens, mask), loss_and_grads(joint, tokens, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cast copies: same bf16 matmuls
        a, b = CausalLMLoss(plain)(tokens)[0], CausalLMLoss(joint)(tokens)[0]
    assert abs(a.item() - b.item()) <= 1e-3 * abs(a.item())
    assert set_joint_projections(joint, on=False) == 0


def test_joint_projections_hf_round_trip(tmp_path, batch):
    """A model trained with joint projections saves, converts to HF and back bit for bit, and HF computes its
    logits."""
    transformers = pytest.importorskip("transformers")
    from lmforge.convert.hf import convert
    from lmforge.train.checkpoint import load_model, save_model

    tokens, _ = batch
    model = tiny(share_embeddings_and_output_weights=False)
    set_joint_projections(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_and_grads(model, tokens)
    opt.step()
    save_model(tmp_path / "ours", {k: v.detach() for k, v in model.state_dict().items()}, model.cfg.to_dict())
    convert(tmp_path / "ours", tmp_path / "hf", to="hf", progress=False)
    convert(tmp_path / "hf", tmp_path / "back", to="lmforge", progress=False)
    back, _ = load_model(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() < 1e-4


@pytest.mark.parametrize("cap,tied,chunk", [(None, True, 7), (5.0, False, 16), (None, False, 1000)])
def test_chunked_loss_equals_plain(batch, cap, tied, chunk):
    tokens, mask = batch
    plain = tiny(final_logit_softcapping=cap, share_embeddings_and_output_weights=tied)
    chunked = copy.deepcopy(plain)
    for m in (None, mask):
        assert_same(loss_and_grads(plain, tokens, m), loss_and_grads(chunked, tokens, m, chunk=chunk))
    with torch.no_grad():  # evaluation: no gradients computed, same sums and counts
        a, na = CausalLMLoss(plain)(tokens, loss_mask=mask)
        b, nb = CausalLMLoss(chunked, loss_chunk_size=chunk)(tokens, loss_mask=mask)
    assert abs(a.item() - b.item()) <= TOL * abs(a.item()) and int(na) == int(nb)


def test_chunked_cross_entropy_ignore_index_and_scaled_grad():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(11, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (11,), generator=g)
    labels[[0, 4, 5]] = -100
    (3.5 * chunked_linear_cross_entropy(h, w, labels, chunk=4)).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    losses = token_cross_entropy(h, w, labels.clamp(min=0))
    (3.5 * losses[labels != -100].sum()).backward()
    for got, want in ((gh, h.grad), (gw, w.grad)):
        assert (got - want).abs().max() <= TOL * want.abs().max()
    assert gh[[0, 4, 5]].abs().max() == 0  # ignored rows: no gradient
    # the head's gradient accumulates in the GEMM only on CUDA (out_dtype=float32 is CUDA-only): here the old path
    from lmforge.train.objectives import _gemm_accumulates
    assert not _gemm_accumulates(torch.zeros(13, 8), torch.zeros(4, 13, dtype=torch.bfloat16))
    # a bf16 weight (FSDP's compute copy): its gradient is the fp32 one scaled, then rounded once to bf16
    wb = w.detach().bfloat16().requires_grad_()
    wf = wb.detach().float().requires_grad_()
    for weight in (wb, wf):
        (3.5 * chunked_linear_cross_entropy(h, weight, labels, chunk=4)).backward()
    assert wb.grad.dtype == torch.bfloat16 and torch.equal(wb.grad, wf.grad.bfloat16())


def test_head_grad_check_benchmark_runs_on_cpu():
    """benchmarks/head_grad_check.py (the GPU check of the head-gradient GEMM accumulation and of clipping inside
    the fused AdamW step) at small shapes on the CPU: there the head takes the add path (exactly the old one), and
    clipping inside the step equals clipping in place with the clip acting."""
    from tests.conftest import load_benchmark

    rec = load_benchmark("head_grad_check").main(["--device", "cpu", "--small"])
    head, clip = rec["head"], rec["clip"]
    assert head["gemm_accumulate"] is False
    assert head["loss"]["max_abs"] == head["grad_hidden"]["max_abs"] == head["grad_weight"]["max_abs"] == 0.0
    assert clip["grad_norm"] > 10 * clip["max_norm"] and clip["grad_scale_left"] is False
    assert clip["max_weight_diff_after_3_steps"] <= 1e-6 and clip["max_state_diff_after_3_steps"] <= 1e-6
    assert min(head["ms_gemm"], head["ms_add"], clip["ms_folded"], clip["ms_in_place"]) > 0


def test_loss_chunk_size_auto():
    from lmforge.train.assembly import resolve_loss_chunk_size

    assert resolve_loss_chunk_size(None, ModelConfig(vocab_size=128256)) == 2048
    assert resolve_loss_chunk_size(None, ModelConfig(vocab_size=32000)) == 0
    assert resolve_loss_chunk_size(0, ModelConfig(vocab_size=128256)) == 0
    assert resolve_loss_chunk_size(512, ModelConfig(vocab_size=100)) == 512
    # activation checkpointing: smaller vocabularies chunked too, ~0.25 GiB of fp32 logits a chunk; a setting wins
    assert resolve_loss_chunk_size(None, ModelConfig(vocab_size=32000), checkpointing=True) == 2048
    assert resolve_loss_chunk_size(None, ModelConfig(vocab_size=50257), checkpointing=True) == 1280
    assert resolve_loss_chunk_size(None, ModelConfig(vocab_size=128256), checkpointing=True) == 2048
    assert resolve_loss_chunk_size(0, ModelConfig(vocab_size=32000), checkpointing=True) == 0


def test_activation_checkpointing_chunks_the_loss_of_the_built_training(tmp_path):
    """build_training resolves the objective's chunk with the job's checkpointing: a 97-token vocabulary is chunked
    when activation checkpointing is on, not when it is off or the job sets 0; an objective that is no per-token NLL
    (alignment's preference and RL losses, with their own chunked paths) is left to the vocabulary rule."""
    from lmforge.parallel.dims import ParallelDims
    from lmforge.parallel.runtime import Runtime
    from lmforge.train.assembly import OptimSpec, TrainJob, build_training
    from lmforge.train.loop import LoopSettings
    from lmforge.train.objectives import CausalLMLoss

    class NotNLL(CausalLMLoss):
        token_nll = False

    def chunk(name, objective_fn=None, **job):
        job = TrainJob(out=tmp_path / name, dims=ParallelDims(1), optim=OptimSpec(), **job,
                       loop=LoopSettings(max_steps=1, micro_batch_size=1, global_batch_size=1, accumulate=1))
        training = build_training(job, tiny(), Runtime(device=torch.device("cpu")), console_log=lambda s: None,
                                  objective_fn=objective_fn)
        return training.trainer.objective.loss_chunk_size

    full = dict(activations_checkpoint=dict(granularity="full", method=None, num_layers=None))
    assert chunk("on", **full) == (2**26 // 97 + 128) // 256 * 256
    assert chunk("off") == 0
    assert chunk("zero", loss_chunk_size=0, **full) == 0
    assert chunk("not_nll", NotNLL, **full) == 0


def lora_model(**kw):
    from lmforge.peft import LoRAConfig, apply_peft

    model = tiny(**kw)
    apply_peft(model, "lora", LoRAConfig(r=4, lora_alpha=8, target_modules=["all-linear"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B is zero at init: give it values so the update shows
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def peft_style(model, tokens):
    """The reference: every LoRA linear as peft computes it, one at a time, input cast to fp32 LoRA weights."""
    from lmforge.peft.lora import LoRALinear

    saved = LoRALinear.master_cast
    LoRALinear.master_cast = False
    try:
        return loss_and_grads(model, tokens)
    finally:
        LoRALinear.master_cast = saved


def test_lora_joint_equals_peft_style(batch):
    from lmforge.peft import peft_state_dict

    tokens, _ = batch
    ref = lora_model(bias=True)
    joint = copy.deepcopy(ref)
    assert set_joint_projections(joint) == 4
    want = peft_style(ref, tokens)
    assert_same(want, loss_and_grads(ref, tokens))  # compute-dtype cast, separate: fp32 is the same
    assert_same(want, loss_and_grads(joint, tokens))  # one base matmul and one x @ [A_q; A_k; A_v]
    assert peft_state_dict(joint).keys() == peft_state_dict(ref).keys()  # the saved adapter's names


def test_lora_with_dropout_or_dora_stays_apart():
    from lmforge.peft import LoRAConfig, apply_peft

    for cfg in (LoRAConfig(r=4, lora_dropout=0.1, target_modules=["all-linear"]),
                LoRAConfig(r=4, use_dora=True, target_modules=["all-linear"])):
        model = tiny()
        apply_peft(model, "lora", cfg)
        assert set_joint_projections(model) == 0


def test_lora_bf16_base_runs_lora_in_bf16():
    """A bf16 base: the update's matmuls run in bf16 (no fp32 copy of the input), the masters stay fp32."""
    from lmforge.peft.lora import LoRALinear

    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, alpha=8)
    seen = []
    layer.lora_A.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad is not None


# -- float8 ------------------------------------------------------------------------------------


def test_fp8_targets_only_block_projections():
    from lmforge.train.fp8 import is_fp8_target

    model = tiny(hidden_size=64, ffn_hidden_size=128, num_moe_experts=2, share_embeddings_and_output_weights=False)
    chosen = {n for n, m in model.named_modules() if is_fp8_target(m, n)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "lm_head" in linears and "layers.0.mlp.router" in linears
    assert chosen == {n for n in linears if n != "lm_head" and not n.endswith("router")}
    assert not is_fp8_target(nn.Linear(30, 64), "layers.0.self_attn.q_proj")  # not a multiple of 16


def fp8_tiny(recipe="tensorwise", joint=True):
    """The tiny model with torchao float8 block projections (emulated matmuls: any CPU), joined or apart."""
    from lmforge.train.fp8 import apply_fp8  # torchao is in the test extra

    model = tiny(hidden_size=64, ffn_hidden_size=128, share_embeddings_and_output_weights=False)
    names = apply_fp8(model, recipe, emulate=True)
    assert set_joint_projections(model, joint) == (4 if joint else 0)  # 2 blocks x (q/k/v, gate/up)
    return model, names


def test_fp8_conversion_keeps_joint_projections():
    from torchao.float8.float8_linear import Float8Linear

    from lmforge.train.fp8 import apply_fp8

    keys = list(tiny(hidden_size=64, ffn_hidden_size=128, share_embeddings_and_output_weights=False).state_dict())
    model, names = fp8_tiny("rowwise")
    assert len(names) == 14
    swapped = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == set(names) and type(model.lm_head) is nn.Linear
    assert list(model.state_dict()) == keys  # checkpoints unchanged
    for block in model.layers:  # the float8 q/k/v and gate/up run joined
        assert block.self_attn.joint_qkv and block.mlp.joint_gate_up
    with pytest.raises(ConfigError, match="model.fp8_recipe"):
        apply_fp8(model, "blockwise")


def count_fp8_work(monkeypatch, model, tokens):
    """Float8 GEMMs of one forward and float8 casts (amax + scale + cast) of one forward and backward."""
    import torchao.float8.float8_linear as f8

    counts = {"gemms": 0, "casts": 0}
    forward, cast = f8.matmul_with_hp_or_float8_args.forward, f8.hp_tensor_to_float8_dynamic

    def counting_forward(*args, **kw):
        counts["gemms"] += 1
        return forward(*args, **kw)

    def counting_cast(*args, **kw):
        counts["casts"] += 1
        return cast(*args, **kw)

    monkeypatch.setattr(f8.matmul_with_hp_or_float8_args, "forward", staticmethod(counting_forward))
    monkeypatch.setattr(f8, "hp_tensor_to_float8_dynamic", counting_cast)
    loss_sum, n = CausalLMLoss(model)(tokens)
    gemms = counts["gemms"]
    (loss_sum / n).backward()
    return gemms, counts["casts"]


def test_fp8_joint_projections_do_less_scaling_work(monkeypatch):
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    joint, _ = fp8_tiny("tensorwise")
    apart, _ = fp8_tiny("tensorwise", joint=False)
    # per block: q/k/v, o, gate/up, down (4 float8 GEMMs) instead of q, k, v, o, gate, up, down (7); each GEMM casts
    # its input and weight forward, its output gradient (twice), weight and input backward
    assert count_fp8_work(monkeypatch, joint, tokens) == (2 * 4, 2 * 4 * 6)
    assert count_fp8_work(monkeypatch, apart, tokens) == (2 * 7, 2 * 7 * 6)


def test_fp8_rowwise_joint_forward_equals_the_separate_projections():
    """Rowwise scales are per token (input) and per output row (weight): joined or apart, the same float8 values
    meet in each dot product, so the model's loss is the same; a wrong join (sizes, order) would change it."""
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    joint, _ = fp8_tiny("rowwise")
    apart, _ = fp8_tiny("rowwise", joint=False)
    loss_j, grads_j = loss_and_grads(joint, tokens)
    loss_a, grads_a = loss_and_grads(apart, tokens)
    assert abs(loss_j - loss_a) < TOL and grads_j.keys() == grads_a.keys()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_fp8_joint_matmul_is_torchaos_over_the_joint_weight(recipe):
    """The joint float8 matmul is torchao's Float8Linear over [W_q; W_k; W_v] exactly: outputs, input gradient, each
    weight's and bias's gradient (its rows of the joint weight's)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    from lmforge.train.fp8_linear import Float8Projection

    torch.manual_seed(0)
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    parts = [Float8Projection.from_float(nn.Linear(32, out), config=config) for out in (64, 32, 32)]
    whole = nn.Linear(32, 128)
    with torch.no_grad():
        whole.weight.copy_(torch.cat([p.weight for p in parts]))
        whole.bias.copy_(torch.cat([p.bias for p in parts]))
    whole = Float8Linear.from_float(whole, config=config)
    x = torch.randn(2, 5, 32, requires_grad=True)
    x_whole = x.detach().clone().requires_grad_()
    ys = Float8Projection.joint_forward(x, parts)
    y = whole(x_whole)
    assert [t.shape[-1] for t in ys] == [64, 32, 32] and torch.equal(torch.cat(ys, -1), y)
    g = torch.randn_like(y)
    torch.cat(ys, -1).backward(g)
    y.backward(g)
    assert torch.equal(x.grad, x_whole.grad)
    assert torch.equal(torch.cat([p.weight.grad for p in parts]), whole.weight.grad)
    assert torch.equal(torch.cat([p.bias.grad for p in parts]), whole.bias.grad)
    assert Float8Projection.can_join(parts)
    all_gather = dataclasses.replace(config, enable_fsdp_float8_all_gather=True) if recipe == "tensorwise" else None
    if all_gather is not None:  # float8 all-gather weights carry a scale each: they stay apart
        assert not Float8Projection.can_join([Float8Projection.from_float(nn.Linear(32, 32), config=all_gather)
                                              for _ in range(2)])


def test_fp8_trained_model_saves_the_bf16_checkpoint_and_hf_tensors(tmp_path):
    """A model trained with joint float8 projections saves what the plain model saves: the same lmforge
    checkpoint names and shapes, and after conversion the same HF tensors, holding the trained values."""
    from safetensors.torch import load_file

    from lmforge.convert.hf import convert
    from lmforge.train.checkpoint import save_model

    model, _ = fp8_tiny("tensorwise")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        loss_and_grads(model, tokens)
        opt.step()
    plain = tiny(hidden_size=64, ffn_hidden_size=128, share_embeddings_and_output_weights=False)
    for name, module in (("fp8", model), ("plain", plain)):
        save_model(tmp_path / name, module.state_dict(), module.cfg.to_dict())
        convert(tmp_path / name, tmp_path / f"{name}_hf", to="hf", family="llama", progress=False)
    ours, theirs = load_file(tmp_path / "fp8" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    for k, v in model.state_dict().items():
        assert torch.equal(ours[k], v), k  # the trained values, under the plain names
    hf, hf_plain = load_file(tmp_path / "fp8_hf" / "model.safetensors"), \
        load_file(tmp_path / "plain_hf" / "model.safetensors")
    assert {k: v.shape for k, v in hf.items()} == {k: v.shape for k, v in hf_plain.items()}
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.weight"], model.layers[1].self_attn.k_proj.weight)
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(hf["model.layers.0.mlp.up_proj.weight"], hf_plain["model.layers.0.mlp.up_proj.weight"])


def test_fp8_refused_on_cpu_and_config_keys(tmp_path):
    from lmforge.config import load_config
    from lmforge.parallel.dims import ParallelDims
    from lmforge.parallel.runtime import Runtime
    from lmforge.train.assembly import OptimSpec, TrainJob, build_training
    from lmforge.train.loop import LoopSettings

    cfg = load_config("tiny/llama", ["trainer.precision=fp8", "trainer.accelerator=cpu",
                                     f"exp_manager.explicit_log_dir={tmp_path / 'run'}"])
    assert cfg.model.fp8 is True and cfg.trainer.precision == "bf16-mixed"
    from lmforge.train.pretrain import run

    with pytest.raises(ConfigError, match=r"^model.fp8=true \(trainer.precision=fp8\) needs an NVIDIA GPU"):
        run(cfg)  # before any data or checkpoint work
    assert not (tmp_path / "run").exists()
    assert load_config("tiny/llama", ["model.fp8=true", "trainer.precision=bf16-mixed"]).model.fp8 is True
    assert load_config("tiny/llama", ["trainer.precision=fp8", "model.fp8_recipe=rowwise_with_gw_hp"]
                       ).model.fp8_recipe == "rowwise_with_gw_hp"
    with pytest.raises(ConfigError, match="model.fp8_recipe"):
        load_config("tiny/llama", ["trainer.precision=fp8", "model.fp8_recipe=blockwise"])
    with pytest.raises(ConfigError, match="trainer.precision=32"):
        load_config("tiny/llama", ["model.fp8=true", "trainer.precision=32"])
    # joint projections: on by default, off by default under float8 (measured slower there), as set when set
    from lmforge.train.pretrain import joint_projections
    assert joint_projections(load_config("tiny/llama", []).model) is True
    assert joint_projections(load_config("tiny/llama", ["trainer.precision=fp8"]).model) is False
    assert joint_projections(load_config("tiny/llama", ["trainer.precision=fp8", "model.fused_projections=true"]
                                         ).model) is True
    assert joint_projections(load_config("tiny/llama", ["model.fused_projections=false"]).model) is False
    job = TrainJob(out=tmp_path, dims=ParallelDims(1), fp8="tensorwise",
                   loop=LoopSettings(max_steps=1, micro_batch_size=1, global_batch_size=1, accumulate=1,
                                     precision="bf16-mixed"), optim=OptimSpec())
    with pytest.raises(ConfigError, match=r"^model.fp8=true \(trainer.precision=fp8\) needs an NVIDIA GPU .* on cpu"):
        build_training(job, tiny(), Runtime(device=torch.device("cpu")))
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


# -- the loop ----------------------------------------------------------------------------------


class Rows:
    def __init__(self, n, seq, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq + 1), generator=g).numpy()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def _trainer(model, steps, log_every, lr=1e-2, clip=1.0, fused=None, scaler=None, precision="32"):
    from lmforge.parallel.runtime import Runtime
    from lmforge.train.loop import LoopSettings, Trainer
    from lmforge.train.optim import build_schedule

    settings = LoopSettings(max_steps=steps, micro_batch_size=2, global_batch_size=4, accumulate=2,
                            log_every_n_steps=log_every, gradient_clip_val=clip, precision=precision)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)

    class Log:
        def __init__(self):
            self.rows = []

        def log(self, step, d):
            self.rows.append((step, d))

        def update(self, step, **kw):
            pass

    log = Log()
    trainer = Trainer(CausalLMLoss(model), model, opt, build_schedule("constant", lr, steps), Runtime(), settings,
                      log=log, scaler=scaler)
    return trainer, log


def test_loop_logs_the_losses_of_each_step():
    """Losses stay on the device between logging steps: the logged values are the steps' own losses, as a plain
    loop computes them (same model, data and optimizer)."""
    from lmforge.train.loop import MicroBatches, TrainState

    data = Rows(40, 8, 97)
    model = tiny()
    ref = copy.deepcopy(model)
    trainer, log = _trainer(model, steps=5, log_every=2)
    trainer.fit(data, None, TrainState())
    logged = {step: d["loss"] for step, d in log.rows if "loss" in d}
    assert sorted(logged) == [1, 2, 4, 5]
    assert all(isinstance(d["grad_norm"], float) for _, d in log.rows if "loss" in d)
    ref_trainer, _ = _trainer(ref, steps=5, log_every=1)
    batches = MicroBatches(data, ref_trainer.s, ref_trainer.rt)
    for step in range(5):  # the step itself hands back device tensors (nothing read back)
        loss, norm = ref_trainer.train_step(batches, step)
        assert isinstance(loss, torch.Tensor) and isinstance(norm, torch.Tensor)
        if step + 1 in logged:
            assert abs(float(loss) - logged[step + 1]) <= 1e-6


def _steps_seen(trainer, steps: int, data) -> list:
    """Run ``steps`` train steps; per step: (grad norm, the ``grad_scale`` the optimizer's step saw or None, the
    gradients' 2-norm as the step read them, whether the attribute was gone after the step)."""
    from lmforge.train.loop import MicroBatches

    seen = []
    opt = trainer.opt
    def before_step(o, args, kwargs):
        grads = [p.grad for p in o.param_groups[0]["params"]]
        seen.append((getattr(o, "grad_scale", None), float(torch.nn.utils.get_total_norm(grads))))

    hook = opt.register_step_pre_hook(before_step)
    batches = MicroBatches(data, trainer.s, trainer.rt)
    out = []
    for step in range(steps):
        _, norm = trainer.train_step(batches, step)
        scale, grads_norm = seen[-1]
        out.append((norm, scale, grads_norm, not hasattr(opt, "grad_scale")))
    hook.remove()
    return out


@pytest.mark.parametrize("clip", [0.05, 1e6])  # acts at every step / never
def test_clipping_folded_into_the_fused_adamw_step_equals_clip_then_step(monkeypatch, clip):
    """With fused AdamW and no loss scaler the gradients are not scaled before the step: the kernel divides them by
    max(1, (norm + 1e-6) / clip) (``optimizer.grad_scale``, removed after the step). Weights, optimizer state and
    the logged norm equal clipping in place then stepping (the old path, forced here) to 1e-6."""
    import lmforge.train.loop as loop

    data = Rows(24, 8, 97)
    model, ref = tiny(), tiny()
    trainer, _ = _trainer(model, steps=3, log_every=1, clip=clip, fused=True)
    assert loop.clips_in_step(trainer.opt, None)
    folded = _steps_seen(trainer, 3, data)
    monkeypatch.setattr(loop, "clips_in_step", lambda opt, scaler: False)
    ref_trainer, _ = _trainer(ref, steps=3, log_every=1, clip=clip, fused=True)
    plain = _steps_seen(ref_trainer, 3, data)
    for (norm, scale, grads_norm, gone), (ref_norm, ref_scale, ref_grads_norm, _) in zip(folded, plain):
        assert gone and ref_scale is None
        assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
        assert float(scale) == pytest.approx(max(1.0, (float(norm) + 1e-6) / clip), rel=1e-6)
        assert grads_norm == pytest.approx(float(norm), rel=1e-6)  # the kernel, not the loop, scales them
        assert ref_grads_norm == pytest.approx(min(float(ref_norm), clip), rel=1e-5)
        assert (float(scale) > 1.0) == (clip < 1.0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):  # relative: Adam's state scales with the clip (its update barely)
            torch.testing.assert_close(trainer.opt.state[p][key], ref_trainer.opt.state[q][key], rtol=1e-6,
                                       atol=1e-6 * float(ref_trainer.opt.state[q][key].abs().max()), msg=name)


def test_clipping_stays_in_place_with_a_loss_scaler_or_the_multi_tensor_adamw():
    """The fp16 path (GradScaler) and non-fused AdamW clip the gradients in place before the step, as before:
    the step sees clipped gradients and no ``grad_scale`` of the loop's."""
    from lmforge.train.optim import clips_in_step
    from lmforge.train.scaler import ParallelGradScaler

    data = Rows(8, 8, 97)
    for fused, scaler in ((True, ParallelGradScaler("cpu", init_scale=8.0)), (False, None)):
        trainer, _ = _trainer(tiny(), steps=1, log_every=1, clip=0.05, fused=fused, scaler=scaler,
                              precision="16-mixed" if scaler else "32")
        assert not clips_in_step(trainer.opt, trainer.scaler)
        [(norm, scale, grads_norm, gone)] = _steps_seen(trainer, 1, data)
        assert scale is None and gone and float(norm) > 0.05
        assert grads_norm == pytest.approx(0.05, rel=1e-4)


def test_loop_logs_the_peak_gpu_memory_on_cuda(monkeypatch):
    """On a CUDA device each training line carries ``peak_memory_gib`` (torch's max_memory_allocated in GiB); off
    CUDA the key is absent (no made-up number)."""
    import lmforge.train.loop as loop
    from lmforge.train.loop import TrainState, peak_memory

    assert peak_memory(torch.device("cpu")) == {}
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 3 * 2**29)
    assert peak_memory(torch.device("cuda", 0)) == {"peak_memory_gib": 1.5}
    assert asked == [torch.device("cuda", 0)]
    trainer, log = _trainer(tiny(), steps=2, log_every=1)
    trainer.fit(Rows(40, 8, 97), None, TrainState())
    assert all("peak_memory_gib" not in d for _, d in log.rows)  # this run is on CPU
    monkeypatch.setattr(loop, "peak_memory", lambda device: {"peak_memory_gib": float(device.type == "cpu")})
    trainer, log = _trainer(tiny(), steps=2, log_every=1)
    trainer.fit(Rows(40, 8, 97), None, TrainState())
    assert [d["peak_memory_gib"] for _, d in log.rows if "loss" in d] == [1.0, 1.0]  # asked of the run's device


def test_a_dropped_reader_stops_its_dataloader_workers_at_once():
    """MicroBatches with DataLoader workers (model.data.num_workers): a reader dropped (an evaluation's, the
    training's at the end) frees its loader by reference count, not through the cyclic collector. In a cycle, the
    collector cleared the loader's queues (their feeder threads ended) before the iterator's shutdown sent the
    workers their stop word: each worker waited out torch's 5 s join and was terminated, at every evaluation
    (the users' 1-GPU command spent 35 of its 78 s there)."""
    import gc
    import weakref

    from lmforge.parallel.runtime import Runtime
    from lmforge.train.loop import LoopSettings, MicroBatches

    settings = LoopSettings(max_steps=3, micro_batch_size=2, global_batch_size=4, accumulate=2, num_workers=1)
    reader = MicroBatches(Rows(40, 8, 97), settings, Runtime())
    plain = MicroBatches(Rows(40, 8, 97), LoopSettings(max_steps=3, micro_batch_size=2, global_batch_size=4,
                                                       accumulate=2), Runtime())
    assert [b.tolist() for b in reader.for_step(0)] == [b.tolist() for b in plain.for_step(0)]  # the same rows
    loader = weakref.ref(reader._loader)
    workers = list(reader._loader._workers)
    gc.collect()
    gc.disable()  # only reference counting may free it
    try:
        del reader
        assert loader() is None, "the reader's DataLoader iterator is held in a reference cycle"
    finally:
        gc.enable()
    for w in workers:  # stopped by their stop word (exit code 0), not terminated after a 5 s join
        w.join(timeout=0)
        assert w.exitcode == 0, w.exitcode


def test_loop_names_the_step_of_a_non_finite_loss():
    """Checked at the next logging step, the error still names the step whose loss was not finite."""
    from lmforge.train.loop import TrainState

    model = tiny()
    trainer, _ = _trainer(model, steps=6, log_every=4)
    real = trainer.train_step

    def step(batches, s):
        loss, norm = real(batches, s)
        return (loss * float("nan") if s == 1 else loss), norm

    trainer.train_step = step
    with pytest.raises(FloatingPointError, match="at step 2;"):
        trainer.fit(Rows(40, 8, 97), None, TrainState())


def test_loss_chunk_size_under_tensor_or_pipeline_parallelism_is_refused_not_ignored():
    from lmforge.config import load_config

    for layout in (["model.tensor_model_parallel_size=2"], ["model.pipeline_model_parallel_size=2"]):
        with pytest.raises(ConfigError, match=r"model.loss_chunk_size=1024 chunks the head"):
            load_config("tiny/llama", ["trainer.devices=2", "model.loss_chunk_size=1024", *layout])
    assert load_config("tiny/llama", ["trainer.devices=2", "model.tensor_model_parallel_size=2",
                                      "model.loss_chunk_size=0"]).model.loss_chunk_size == 0


def test_train_throughput_compile_mode_reaches_every_block(monkeypatch):
    """benchmarks/train_throughput.py --compile-mode: each block compiled with that inductor mode (the next GPU call
    times max-autotune's GEMM templates against training's own compile); without it, training's apply_compile."""
    from tests.conftest import load_benchmark

    bench = load_benchmark("train_throughput")
    assert bench.parse([]).compile_mode is None
    assert bench.parse(["--compile-mode", "max-autotune-no-cudagraphs", "--cases", "compiled"]).compile_mode == \
        "max-autotune-no-cudagraphs"
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                                    ffn_hidden_size=64, max_position_embeddings=32))
    modes = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: modes.append((type(self).__name__, kw.get("mode"))))
    bench.compile_blocks(model, "max-autotune-no-cudagraphs")
    assert [m for _, m in modes] == ["max-autotune-no-cudagraphs"] * 2 and len({n for n, _ in modes}) == 1
    modes.clear()
    bench.compile_blocks(model)
    assert [m for _, m in modes] == [None, None]


def test_train_throughput_inductor_settings_are_literals_of_real_keys():
    """benchmarks/train_throughput.py --inductor KEY=VALUE: parsed as Python literals (one message for a bad one)."""
    from tests.conftest import load_benchmark

    bench = load_benchmark("train_throughput")
    a = bench.parse(["--inductor", "coordinate_descent_tuning=True", "--inductor", "max_autotune_gemm_backends='ATEN'"])
    assert a.inductor_config == {"coordinate_descent_tuning": True, "max_autotune_gemm_backends": "ATEN"}
    for bad in ("coordinate_descent_tuning", "coordinate_descent_tuning=yes please"):
        with pytest.raises(SystemExit):
            bench.parse(["--inductor", bad])


@pytest.mark.parametrize("cap", [None, 30.0])
def test_loss_chunk_compiled_form_equals_the_eager_one(cap):
    """The chunk's cross-entropy gradient has two forms of the same values: under compile one elementwise expression
    (a column-index one-hot; inductor fuses it with the logsumexp), eagerly in place in one fp32 buffer (a scatter).
    Traced with aot_eager (the compiled branch, no C++ compiler needed) they agree to fp32 rounding, with ignored
    labels and with a soft cap."""
    from lmforge.train.objectives import IGNORE_INDEX, _ce_chunk

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 50, generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 50, (9,), generator=g)
    labels[[1, 6]] = IGNORE_INDEX
    loss, grad = _ce_chunk(logits, labels, cap, True)
    c_loss, c_grad = torch.compile(_ce_chunk, backend="aot_eager", fullgraph=True)(logits, labels, cap, True)
    assert torch.allclose(c_loss, loss, rtol=1e-6, atol=0)
    assert c_grad.dtype == grad.dtype == torch.bfloat16
    assert (c_grad.float() - grad.float()).abs().max() <= 2 ** -8 * grad.float().abs().max()
    assert c_grad[[1, 6]].abs().max() == 0 and grad[[1, 6]].abs().max() == 0
    if cap is None:  # softmax minus one-hot sums to 0 on every row (the cap's derivative reweights it)
        assert grad.float().sum(dim=1).abs().max() <= 0.05
