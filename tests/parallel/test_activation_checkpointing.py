"""Activation checkpointing as NeMo names it (granularity full/selective, method uniform/block, num_layers).

Every setting gives the loss and gradients of the plain model, and each one acts: the bytes autograd keeps
for backward (a pack hook over the saved tensors, parameters and buffers left out, each storage counted
once) and the number of times blocks and core attentions run say which activations were kept and which
were recomputed. Tiny Llama and Mixtral-shaped models, fp32, CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.parallel.transforms import apply_activation_checkpointing
from lmforge.train.objectives import CausalLMLoss

B, T, L, C = 2, 32, 4, 32  # batch, tokens (the loss reads T + 1), layers, hidden size


def make_cfg(kind: str = "llama", **kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=C, num_layers=L, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=64, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu",
                bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=False,
                hidden_dropout=0.0, attention_dropout=0.0)
    if kind == "mixtral":  # experts, top-2 routing, the router's load-balancing loss in the objective
        base.update(num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.02)
    base.update(kw)
    return ModelConfig(**base)


def make_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (B, T + 1), generator=torch.Generator().manual_seed(1))


# (granularity, method, num_layers) as apply_activation_checkpointing takes them; None: no checkpointing
SETTINGS = {
    "full": ("full", None, None),
    "full/uniform/1": ("full", "uniform", 1),
    "full/uniform/2": ("full", "uniform", 2),
    "full/uniform/3": ("full", "uniform", 3),  # chunks of 3 and 1
    "full/uniform/4": ("full", "uniform", 4),
    "full/block/1": ("full", "block", 1),
    "full/block/2": ("full", "block", 2),
    "full/block/4": ("full", "block", 4),
    "selective": ("selective", None, None),
}


def transformed(base: Transformer, setting) -> Transformer:
    model = copy.deepcopy(base)
    if setting is not None:
        apply_activation_checkpointing(model, *setting)
    return model


def loss_and_grads(model: Transformer, seed: int = 2):
    torch.manual_seed(seed)  # dropout draws
    loss_sum, n = CausalLMLoss(model)(tokens())
    loss = loss_sum / n
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model: Transformer) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward (weights and buffers left
    out). Tensors saved inside a checkpointed region go to the checkpoint's own hooks, not to this one; the
    checkpoint's inputs are saved outside it and counted."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, _ = CausalLMLoss(model)(tokens())
    loss_sum.backward()
    return sum(kept.values())


# -- the same numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_loss_and_gradients(kind, name):
    base = make_model(make_cfg(kind))
    ref_loss, ref_grads = loss_and_grads(transformed(base, None))
    loss, grads = loss_and_grads(transformed(base, SETTINGS[name]))
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    if kind == "mixtral":
        assert grads["layers.0.mlp.router.weight"].abs().sum() > 0  # the aux loss reaches the router
    for key, ref in ref_grads.items():
        assert torch.allclose(grads[key], ref, rtol=1e-5, atol=1e-7), key


@pytest.mark.parametrize("name", ["full/uniform/2", "full/block/2", "selective"])
def test_dropout_is_recomputed_with_the_same_masks(name):
    base = make_model(make_cfg(hidden_dropout=0.1, attention_dropout=0.1))
    ref_loss, ref_grads = loss_and_grads(transformed(base, None))
    loss, grads = loss_and_grads(transformed(base, SETTINGS[name]))
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for key, ref in ref_grads.items():
        assert torch.allclose(grads[key], ref, rtol=1e-5, atol=1e-7), key


@pytest.mark.parametrize("name", ["full/uniform/2", "full/block/1", "selective"])
def test_lora_wrapped_blocks(name):
    from lmforge.peft import LoRAConfig, apply_peft

    base = make_model(make_cfg("mixtral"))
    apply_peft(base, "lora", LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # B starts at zero; make A's gradient non-zero too
        for key, p in base.named_parameters():
            if "lora_B" in key:
                p.normal_(0.0, 0.02)
    ref_loss, ref_grads = loss_and_grads(transformed(base, None))
    loss, grads = loss_and_grads(transformed(base, SETTINGS[name]))
    assert ref_grads and all("lora_" in k for k in ref_grads)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for key, ref in ref_grads.items():
        assert ref.abs().sum() > 0, key
        assert torch.allclose(grads[key], ref, rtol=1e-5, atol=1e-7), key


def test_names_unchanged_and_inference_with_a_cache():
    base = make_model(make_cfg())
    model = transformed(base, SETTINGS["full/uniform/3"])
    assert list(model.state_dict()) == list(base.state_dict())
    plain = Transformer(base.cfg)
    plain.load_state_dict(model.state_dict())
    x = tokens()[:, :9]
    with torch.no_grad():
        ref = base(x)
        assert torch.allclose(model(x), ref, atol=1e-6)
        from lmforge.models.transformer import KVCache

        cache = KVCache(base.cfg, B, 16)
        steps = [model(x[:, :5], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache, start_pos=t)
                                                     for t in range(5, 9)]
    assert torch.allclose(torch.cat(steps, dim=1), ref, atol=1e-5, rtol=1e-5)
    # a block of a chunk called on its own (not on the chunk's output) runs normally
    h = torch.randn(B, 4, C)
    rope = (base.rope_cos[:4], base.rope_sin[:4])
    assert torch.allclose(model.layers[1](h, rope), base.layers[1](h, rope), atol=1e-6)


# -- each setting acts ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_saved_bytes(kind):
    base = make_model(make_cfg(kind))
    saved = {name: saved_bytes(transformed(base, s)) for name, s in [("none", None), *SETTINGS.items()]}
    block_input = B * T * C * 4  # fp32 (B, T, C): what a chunk keeps
    # full: each chunk keeps its input, and nothing of what runs inside it
    assert saved["full"] == saved["full/uniform/1"] < saved["none"]
    assert saved["full/uniform/1"] - saved["full/uniform/2"] == 2 * block_input  # 4 chunk inputs -> 2
    assert saved["full/uniform/2"] - saved["full/uniform/4"] == 1 * block_input  # 2 -> 1
    assert saved["full/uniform/3"] == saved["full/uniform/2"]  # chunks of 3 + 1: two inputs
    # block: the first num_layers blocks checkpointed, the others keep everything
    assert saved["full/block/1"] > saved["full/block/2"] > saved["full/block/4"] == saved["full/uniform/1"]
    per_block = saved["none"] - saved["full/block/1"]  # one plain block's activations, less its kept input
    assert saved["full/block/2"] == saved["full/block/1"] - per_block
    # selective: only the core attention's own saved tensors go (here SDPA's log-sum-exp rows)
    assert saved["full"] < saved["selective"] < saved["none"]


@pytest.mark.parametrize("extra", [dict(attention_dropout=0.1), dict(attn_logit_softcapping=30.0)])
def test_selective_drops_the_attention_matrices(extra):
    """With attention dropout (SDPA's math path) or soft-capped scores (the eager path) the (B, nh, T, T)
    probabilities are what attention keeps; selective keeps none of them."""
    base = make_model(make_cfg(**extra))
    none, selective = saved_bytes(transformed(base, None)), saved_bytes(transformed(base, SETTINGS["selective"]))
    probs = B * base.cfg.num_attention_heads * T * T * 4
    assert none - selective >= L * probs


def count_calls(model: Transformer) -> dict[str, list[int]]:
    """Wrap each block's forward and each attention's core (``_sdpa``) with a call counter; install before
    checkpointing, so the counters sit inside what it wraps and count the forward runs and the recomputations."""
    counts = {"block": [0] * L, "core": [0] * L}

    def counting(fn, kind, i):
        def wrapper(*args, **kwargs):
            counts[kind][i] += 1
            return fn(*args, **kwargs)
        return wrapper

    for i, block in enumerate(model.layers):
        block.forward = counting(block.forward, "block", i)
        block.self_attn._sdpa = counting(block.self_attn._sdpa, "core", i)
    return counts


# block runs and core-attention runs per layer, in the forward and in the backward (recomputations)
EXPECTED_RUNS = {
    "none": ([0, 0, 0, 0], [0, 0, 0, 0]),
    "full": ([1, 1, 1, 1], [1, 1, 1, 1]),
    "full/uniform/2": ([1, 1, 1, 1], [1, 1, 1, 1]),
    "full/uniform/3": ([1, 1, 1, 1], [1, 1, 1, 1]),
    "full/uniform/4": ([1, 1, 1, 1], [1, 1, 1, 1]),
    "full/block/1": ([1, 0, 0, 0], [1, 0, 0, 0]),
    "full/block/2": ([1, 1, 0, 0], [1, 1, 0, 0]),
    "selective": ([0, 0, 0, 0], [1, 1, 1, 1]),
}


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
@pytest.mark.parametrize("name", list(EXPECTED_RUNS))
def test_recomputations(kind, name):
    model = make_model(make_cfg(kind))
    counts = count_calls(model)
    if name != "none":
        apply_activation_checkpointing(model, *SETTINGS[name])
    loss_sum, _ = CausalLMLoss(model)(tokens())
    assert counts == {"block": [1] * L, "core": [1] * L}  # the forward runs everything once
    loss_sum.backward()
    blocks, cores = EXPECTED_RUNS[name]
    assert counts["block"] == [1 + r for r in blocks]
    assert counts["core"] == [1 + r for r in cores]


@pytest.mark.parametrize("method", ["uniform", "block"])
def test_selective_takes_a_method_and_ignores_it_as_megatron_core_does(method):
    """Megatron-core (NeMo's mcore_gpt models) accepts a method beside ``selective`` and ignores it (NeMo Launcher's
    rlhf_ppo/gpt3/2b_ppo.yaml sets selective with uniform); it refuses a number of layers (test_invalid_settings)."""
    model = apply_activation_checkpointing(make_model(make_cfg()), "selective", method)
    assert model._activation_checkpointing == ("selective", None, None)
    m = load_config("tiny/llama", ["model.activations_checkpoint_granularity=selective",
                                   f"model.activations_checkpoint_method={method}"]).model
    assert (m.activations_checkpoint_granularity, m.activations_checkpoint_method) == ("selective", method)


@pytest.mark.parametrize("name", ["full/uniform/2", "full/uniform/3", "full/block/2", "selective"])
def test_without_autograd_every_block_runs_plainly_on_its_own(name, monkeypatch):
    """Rollouts and serving run a checkpointed model without autograd, at times in pieces that split a chunk (the
    compiled decode step runs its blocks in graph chunks and hands a copy of the hidden state on): every block runs
    its own forward once, outside torch.utils.checkpoint, and the result is the plain model's. (Before, a chunk's
    first block ran the whole chunk, and its other blocks, handed a copy, ran a second time.)"""
    from lmforge.parallel import transforms

    base = make_model(make_cfg())
    model = copy.deepcopy(base)
    counts = count_calls(model)
    apply_activation_checkpointing(model, *SETTINGS[name])
    calls = []
    real = transforms.checkpoint
    monkeypatch.setattr(transforms, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = ref = torch.randn(B, 8, C, generator=torch.Generator().manual_seed(3))
    rope = (base.rope_cos[:8], base.rope_sin[:8])
    with torch.no_grad():
        for mine, plain in zip(model.layers, base.layers):
            h, ref = mine(h.clone(), rope), plain(ref, rope)
    assert torch.allclose(h, ref, atol=1e-6)
    assert calls == [] and counts == {"block": [1] * L, "core": [1] * L}


def test_no_arguments_is_full_uniform_one():
    base = make_model(make_cfg())
    model = copy.deepcopy(base)
    apply_activation_checkpointing(model)
    assert model._activation_checkpointing == ("full", "uniform", 1)
    assert saved_bytes(model) == saved_bytes(transformed(base, SETTINGS["full/uniform/1"]))
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_checkpointing(model)
    unchanged = transformed(base, (None, None, None))
    assert not hasattr(unchanged, "_activation_checkpointing")


@pytest.mark.parametrize("kwargs, key, works", [
    (dict(num_layers=0), "activations_checkpoint_num_layers=0", "num_layers=1"),
    (dict(method="block", num_layers=5), "activations_checkpoint_num_layers=5", "num_layers=4"),
    (dict(method="unifrom"), "activations_checkpoint_method='unifrom'", "method=uniform"),
    (dict(granularity="partial"), "activations_checkpoint_granularity='partial'", "full"),
    (dict(granularity="selective", method="unifrom"), "activations_checkpoint_method='unifrom'", "method=uniform"),
    (dict(granularity="selective", num_layers=2), "activations_checkpoint_num_layers=2", "null"),
    (dict(granularity=None, method="block"), "activations_checkpoint_method=block", "full"),
])
def test_invalid_settings(kwargs, key, works):
    model = make_model(make_cfg())
    with pytest.raises(ConfigError) as err:
        apply_activation_checkpointing(model, **kwargs)
    assert key in str(err.value) and works in str(err.value)
    assert not hasattr(model, "_activation_checkpointing")


# -- config -------------------------------------------------------------------------------------------


def test_config_keys():
    cfg = load_config("tiny/llama", ["model.activations_checkpoint_granularity=full",
                                     "model.activations_checkpoint_method=block",
                                     "model.activations_checkpoint_num_layers=2"])
    m = cfg.model
    assert (m.activations_checkpoint_granularity, m.activations_checkpoint_method,
            m.activations_checkpoint_num_layers) == ("full", "block", 2)
    assert load_config("tiny/llama", []).model.activations_checkpoint_num_layers is None
    assert load_config("tiny/llama", ["model.activations_checkpoint_granularity=selective"])


@pytest.mark.parametrize("overrides, key", [
    (["model.activations_checkpoint_method=uniform"], "model.activations_checkpoint_method=uniform"),
    (["model.activations_checkpoint_num_layers=2"], "model.activations_checkpoint_num_layers=2"),
    (["model.activations_checkpoint_granularity=selective", "model.activations_checkpoint_num_layers=1"],
     "model.activations_checkpoint_num_layers=1"),
    (["model.activations_checkpoint_granularity=full", "model.activations_checkpoint_num_layers=0"],
     "model.activations_checkpoint_num_layers=0"),
    (["model.activations_checkpoint_granularity=full", "model.activations_checkpoint_method=block",
      "model.activations_checkpoint_num_layers=99"], "model.activations_checkpoint_num_layers=99"),
])
def test_config_invalid_combinations(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny/llama", overrides)
    text = str(err.value)
    assert text.startswith(key) and "problems" not in text  # one problem, naming the key


# -- lora: every block checkpointed, the attention outputs and the LoRA products x @ A.T kept ----------------------


LORA_L = 2  # layers of the LoRA checkpointing tests


def lora_base(joint: bool) -> Transformer:
    """The llama-shaped model (2 layers) with LoRA r=4 on every linear (random B, so A's gradient is not zero)."""
    from lmforge.models.transformer import set_joint_projections
    from lmforge.peft import LoRAConfig, apply_peft

    model = make_model(make_cfg(num_layers=LORA_L))
    apply_peft(model, "lora", LoRAConfig(r=4, lora_alpha=8, target_modules=["all-linear"]))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(key)))
    set_joint_projections(model, joint)
    return model


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Every storage an op creates while the mode is on, by weak reference: ``alive()`` is the bytes of those still
    held (after the forward: what is kept for backward, wherever it is kept). A pack hook cannot count this here:
    selective checkpointing keeps its tensors in its own cache, not through autograd's saved-tensor hooks.
    ``runs[op]`` counts each aten op."""

    def __init__(self):
        super().__init__()
        self.storages, self.runs = {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        self.runs[func] = self.runs.get(func, 0) + 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[id(storage)] = (weakref.ref(storage), storage.nbytes())
        return out

    def alive(self) -> int:
        import gc

        gc.collect()
        return sum(n for ref, n in self.storages.values() if ref() is not None)


def kept_and_attention_reruns(model: Transformer) -> tuple[int, int]:
    """(bytes the forward leaves alive for backward, attention kernels the backward runs again)."""
    from lmforge.parallel.transforms import ATTENTION_OPS

    with LiveBytes() as forward:
        loss_sum, _ = CausalLMLoss(model)(tokens())
    kept = forward.alive()
    with LiveBytes() as backward:
        loss_sum.backward()
    return kept, sum(n for op, n in backward.runs.items() if op in ATTENTION_OPS)


@pytest.mark.parametrize("joint", [False, True])
def test_lora_checkpointing_same_loss_and_gradients(joint):
    base = lora_base(joint)
    ref_loss, ref_grads = loss_and_grads(transformed(base, None))
    loss, grads = loss_and_grads(transformed(base, ("lora", None, None)))
    assert ref_grads.keys() == grads.keys() and ref_grads and all("lora_" in k for k in ref_grads)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    for key, ref in ref_grads.items():
        assert ref.abs().sum() > 0, key
        assert (grads[key] - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item()), key


def test_lora_checkpointing_keeps_attention_and_lora_products_only():
    """Less is kept than without checkpointing; more than ``full`` by the attention outputs and the x @ A.T
    products (and their log-sum-exp rows), which spares the backward every attention kernel ``full`` runs again."""
    base = lora_base(joint=True)
    kept = {name: kept_and_attention_reruns(transformed(base, s))
            for name, s in [("none", None), ("full", ("full", None, None)), ("lora", ("lora", None, None))]}
    assert [kept[name][1] for name in ("none", "full", "lora")] == [0, LORA_L, 0]
    none, full, lora = (kept[name][0] for name in ("none", "full", "lora"))
    attn_out = B * T * C * 4  # fp32 (B, nh, T, hd): one hidden state per block
    lora_products = B * T * (3 * 4 + 4 + 2 * 4 + 4) * 4  # [q;k;v], o, [gate;up], down: r = 4 columns each
    assert full < lora < none
    assert lora - full >= LORA_L * (attn_out + lora_products)
    assert lora - full <= LORA_L * (attn_out + lora_products + attn_out // 2)  # + log-sum-exp rows, nothing wide


def test_lora_checkpointing_needs_lora_layers_and_no_chunks():
    from lmforge.finetune.config import load_finetune_config
    from lmforge.finetune.stage import job_from_config
    from lmforge.parallel.dims import ParallelDims

    # fine-tuning's key reaches the transform (build_training calls apply_activation_checkpointing(unit, **ac))
    cfg = load_finetune_config(None, ["model=m", "data=d.jsonl", "activations_checkpoint_granularity=lora"])
    assert job_from_config(cfg, ParallelDims(1), 2, None).activations_checkpoint == \
        dict(granularity="lora", method=None, num_layers=None)

    with pytest.raises(ConfigError, match="has no LoRA layers; use full or selective"):
        apply_activation_checkpointing(make_model(make_cfg()), "lora")
    with pytest.raises(ConfigError, match="activations_checkpoint_num_layers=2 must be null with "
                                          "model.activations_checkpoint_granularity=lora"):
        apply_activation_checkpointing(lora_base(False), "lora", num_layers=2)
    with pytest.raises(ConfigError, match="activations_checkpoint_granularity=lora keeps the LoRA products of each "
                                          "block, but method=ia3"):
        load_finetune_config(None, ["model=m", "data=d.jsonl", "method=ia3", "activations_checkpoint_granularity=lora"])
    with pytest.raises(ConfigError, match="model.activations_checkpoint_granularity"):  # pretraining has no LoRA
        load_config("tiny/llama", ["model.activations_checkpoint_granularity=lora"])


def test_checkpointed_blocks_are_compiled():
    """``apply_compile`` after checkpointing traces each block's checkpointed region (torch.compile skips torch's own
    frames: a block whose forward was ``checkpoint`` itself ran eagerly, compiled in name only). Same values."""
    base = lora_base(joint=True)
    ref_loss, ref_grads = loss_and_grads(transformed(base, None))
    for granularity in ("full", "lora"):
        torch._dynamo.reset()
        graphs = []

        def backend(gm, example_inputs):  # what apply_compile's block.compile() hands to inductor, counted
            graphs.append(gm)
            return gm.forward

        model = transformed(base, (granularity, None, None))
        for block in model.layers:
            block.compile(backend=backend)
        loss, grads = loss_and_grads(model)
        assert graphs, granularity
        assert any("checkpoint" in str(n.target) for gm in graphs for n in gm.graph.nodes), granularity
        assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
        for key, ref in ref_grads.items():
            assert (grads[key] - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item()), key


def test_a_dropped_model_is_freed_at_once():
    """The wrappers hold no reference cycle (block -> its forward wrapper -> the bound method -> block): a model
    dropped after a step is freed by reference counting, not when the cyclic collector happens to run. With the
    cycle a benchmark's next case started with the previous 7B model's 13 GB still on the GPU."""
    import gc
    import weakref

    def one_step(granularity):
        model = transformed(lora_base(joint=True), (granularity, None, None))
        loss_sum, _ = CausalLMLoss(model)(tokens())
        loss_sum.backward()
        return [weakref.ref(m) for m in (model, model.layers[0], model.layers[0].self_attn)]

    one_step("full")  # torch's first checkpoint call imports lazily; that import's frames may hold its model until gc
    gc.collect()
    gc.disable()
    try:
        for granularity in ("full", "selective", "lora"):
            refs = one_step(granularity)
            assert [r() is None for r in refs] == [True, True, True], granularity
    finally:
        gc.enable()


def compiled_kept(model: Transformer) -> tuple[list, dict]:
    """One forward of ``model`` (blocks compiled): the tensors the compiled blocks keep for backward (their autograd
    nodes' saved tensors, parameters left out) as (shape, dtype) labels, one per storage, and the ``context_fn`` of
    every checkpoint call dynamo captured (by graph name)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    loss_sum, _ = CausalLMLoss(model)(tokens())
    kept, seen, stack = {}, set(), [loss_sum.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Compiled" in type(node).__name__:  # a compiled graph's autograd node
            for t in node.saved_tensors:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in own:
                    kept[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        stack.extend(next_node for next_node, _ in node.next_functions)
    loss_sum.backward()
    return sorted(kept.values(), key=str)


def compile_blocks(model: Transformer) -> list:
    """``apply_compile``'s per-block compile with the aot_eager backend (AOTAutograd's partitioner, as inductor
    uses, without inductor's code generation); returns the dynamo graphs handed to it."""
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    for block in model.layers:
        block.compile(backend=backend)
    return graphs


def checkpoint_policies(graphs: list) -> list:
    """The ``context_fn`` dynamo recorded for each checkpointed region of ``graphs`` (None: plain checkpointing)."""
    return [gm.get_submodule(node.args[0].target).meta.get("_checkpoint_context_fn")
            for gm in graphs for node in gm.graph.nodes if "checkpoint" in str(node.target)]


@pytest.fixture(scope="module")
def compiled_lora_runs():
    """Compiled ``full`` and ``lora`` checkpointing of the joint-projection LoRA model: kept tensors and policies."""
    base = lora_base(joint=True)
    runs = {}
    for granularity in ("full", "lora"):
        model = transformed(base, (granularity, None, None))
        graphs = compile_blocks(model)
        runs[granularity] = compiled_kept(model), checkpoint_policies(graphs)
    torch._dynamo.reset()
    return runs


def test_compiled_full_checkpointing_keeps_one_block_input_per_block(compiled_lora_runs):
    """Compiled ``full`` keeps what eager ``full`` keeps: each block's input (and checkpoint's RNG state, a byte
    tensor), nothing inside the block. The region carries a recompute-everything policy: without one, torch before
    2.12 left the ops of custom autograd Functions (the joint projections) untagged and kept their outputs (on an
    H100, torch 2.11: 31.6 GiB for a 7B LoRA step compiled against 15.6 GiB eager)."""
    from torch.utils.checkpoint import CheckpointPolicy

    from lmforge.parallel.transforms import ATTENTION_OPS

    kept, policies = compiled_lora_runs["full"]
    hidden = ((B, T, C), torch.float32)
    assert [k for k in kept if k[1] is not torch.uint8] == [hidden] * LORA_L
    assert policies and all(p is not None for p in policies)
    ctx = policies[0]()[0]  # the forward context: what its policy says of a matmul and an attention kernel
    for op in (torch.ops.aten.mm.default, ATTENTION_OPS[0]):
        assert ctx.policy_fn(None, op) is CheckpointPolicy.PREFER_RECOMPUTE


def test_compiled_lora_checkpointing_keeps_its_save_list_only(compiled_lora_runs):
    """Compiled ``lora`` keeps the block inputs, the attention outputs (and their log-sum-exp rows) and the x @ A.T
    products, nothing wider: the q/k/v, MLP and norm activations are recomputed as in eager."""
    kept, policies = compiled_lora_runs["lora"]
    hd, nh, r = C // 4, 4, 4
    allowed = {((B, T, C), torch.float32),  # block input
               ((B, nh, T, hd), torch.float32), ((B, nh, T), torch.float32),  # attention output, log-sum-exp
               ((B * T, 3 * r), torch.float32), ((B * T, 2 * r), torch.float32), ((B * T, r), torch.float32)}
    wide = [k for k in kept if k[1] is not torch.uint8 and k not in allowed]
    assert not wide
    assert sum(k == ((B, nh, T, hd), torch.float32) for k in kept) == LORA_L
    assert policies and all(p is not None for p in policies)
