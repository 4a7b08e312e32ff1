"""The online methods' rollout engine on the live policy (:meth:`lmforge.align.rl.RolloutLoss.sample`).

The engine is built once, on the policy module itself, and used for every rollout while the optimizer updates
the policy in place. Each test takes optimizer steps between two rollouts and compares the second rollout with
the one a freshly built engine draws from the updated weights (same seeds): an engine that read a stale copy of
any weight (a fused projection, a cached output head) gives the first rollout's tokens again, not the fresh
engine's. CPU: the eager decode step (the compiled one is CUDA graphs; benchmarks/grpo_rollout.py --check runs
the same comparison on a GPU).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.align.rl import RolloutLoss, rollout_compile, token_logps
from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from tests.conftest import load_benchmark

V = 48


class _Ids:
    """No end-of-sequence token: every completion runs its full length."""

    eod_id = None

    def decode(self, ids, *args, **kwargs) -> str:
        return ""


def _model(**extra) -> Transformer:
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=32, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=False,
                      **extra)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model


def _rollout(model) -> RolloutLoss:
    settings = SimpleNamespace(num_generations=3, max_completion_length=6, temperature=1.0, reward_fn="json:loads",
                               prompt_key="prompt", beta=0.0)
    return RolloutLoss(model, "grpo", settings, None, _Ids(), None, 16, 7, 6)


PROMPTS = [[3, 9, 4, 17], [21, 5]]


def _train(model, steps: int = 2) -> None:
    """Optimizer steps that raise the log-probability of token 1 everywhere (a large, in-place change)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    rows = torch.tensor([[3, 9, 4, 17, 1, 1, 1, 1]])
    model.train()
    for _ in range(steps):
        loss = -token_logps(model, rows).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _check_rollouts_follow_the_updates(model) -> None:
    rl = _rollout(model)
    before = rl.sample(PROMPTS, rollout=1)
    names = [n for n, _ in model.named_parameters()]
    _train(model)
    after = rl.sample(PROMPTS, rollout=1)
    fresh = _rollout(model).sample(PROMPTS, rollout=1)
    assert after == fresh
    assert after != before  # the updates changed the draws: a stale engine would repeat `before`
    assert [n for n, _ in model.named_parameters()] == names  # nothing fused or swapped in the trained model
    engine = rl.engine()
    assert engine.cache.allocator.num_used == 0 and not engine.has_work()  # every block given back


@pytest.mark.parametrize("extra", [{}, {"normalize_output_head": True}], ids=["plain", "normalized_head"])
def test_rollouts_after_optimizer_steps_equal_a_fresh_engine(extra):
    """Full fine-tuning; with a normalised output head (Baichuan) too, computed from the trained weight: an
    engine that computed the head once would sample from the starting head after the updates."""
    _check_rollouts_follow_the_updates(_model(**extra))


def test_lora_rollouts_read_the_adapter_weights_live():
    from lmforge.peft import apply_peft
    from lmforge.peft.lora import LoRAConfig

    model = apply_peft(_model(), "lora", LoRAConfig(r=4, target_modules=["all-linear"]))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)  # the updates reach the policy through the adapter only
    _check_rollouts_follow_the_updates(model)


class _WeightCats(TorchDispatchMode):
    """Counts ``aten::cat`` calls that read a parameter of ``model`` (a joint projection's weight concatenation)."""

    def __init__(self, model):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.cat.default and any(t.untyped_storage().data_ptr() in self.storages for t in args[0]):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _joint_flags(model) -> list[bool]:
    from lmforge.models.transformer import Attention, GatedMLP

    return [m.joint_qkv if isinstance(m, Attention) else m.joint_gate_up for m in model.modules()
            if isinstance(m, (Attention, GatedMLP))]


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "lora"])
def test_rollouts_run_joint_projections_apart(peft, monkeypatch):
    """Training joins q/k/v and gate/up (set_joint_projections: the weights concatenated at every forward, which a
    training step amortises); the rollout engine's forwards, eager and its decode graphs' capture (start-up and a
    recapture after a weight moved), run them apart: no weight is concatenated per decode step, the draws are the
    same as with joint projections off, and the training forward after the rollout joins again."""
    from lmforge.models.transformer import separate_projections, set_joint_projections
    from lmforge.serve.runner import ModelRunner

    def policy(joint: bool):
        model = _model()
        if peft:
            from lmforge.peft import apply_peft
            from lmforge.peft.lora import LoRAConfig

            model = apply_peft(model, "lora", LoRAConfig(r=4, target_modules=["all-linear"]))
        assert set_joint_projections(model, joint) == (4 if joint else 0)
        return model

    captured = []  # the joint flags whenever the engine captures its decode graphs (CPU: nothing to capture)
    monkeypatch.setattr(ModelRunner, "capture_all", lambda self, log=None, prefill=True:
                        captured.append((self.model, _joint_flags(self.model))) or 0.0)

    def recapture(self, log=None):
        captured.append((self.model, _joint_flags(self.model)))
        self.graphs = None  # the stand-in graphs go: the steps after it run eagerly (CPU)
        return 0.0

    monkeypatch.setattr(ModelRunner, "recapture", recapture)
    model = policy(joint=True)
    rl = _rollout(model)
    engine = rl.engine()
    steps = engine.metrics.decode_steps
    with _WeightCats(model) as cats:
        joined = rl.sample(PROMPTS, rollout=1)
    assert engine.metrics.decode_steps - steps >= 5 and cats.n == 0  # was 2 per block per step (4 with LoRA)
    assert joined == _rollout(policy(joint=False)).sample(PROMPTS, rollout=1)
    assert _joint_flags(model) == [True] * 4  # put back for training
    with _WeightCats(model) as cats:
        _train(model, steps=1)
    assert cats.n > 0  # the training forward (and backward) joined

    engine.runner.graphs = SimpleNamespace(graphs={})  # as if captured: a replaced weight makes sync_weights recapture
    engine.runner._pointers = engine.runner.parameter_pointers()
    weight = model.layers[0].mlp.down_proj.weight
    weight.data = weight.data.clone()
    rl.sample(PROMPTS, rollout=2)
    assert [flags for m, flags in captured if m is model] == [[False] * 4] * 2  # start-up, recapture: apart

    with pytest.raises(RuntimeError, match="boom"), separate_projections(model):
        assert _joint_flags(model) == [False] * 4
        raise RuntimeError("boom")
    assert _joint_flags(model) == [True] * 4


def test_rollout_compile_setting():
    assert rollout_compile("auto", torch.device("cpu"))[0] is False
    assert "eager decode step" in rollout_compile("auto", torch.device("cpu"))[1]
    assert rollout_compile(False, torch.device("cpu"))[0] is False
    with pytest.raises(ConfigError, match="align.rollout_compile=true needs a CUDA GPU"):
        rollout_compile(True, torch.device("cpu"))
    assert rollout_compile("auto", torch.device("cuda"))[0] is True
    assert rollout_compile(False, torch.device("cuda"))[0] is False


def test_a_live_model_is_not_prepared_for_serving():
    """A compiled engine fuses q/k/v and gate/up into new tensors and freezes the model; on a live (trained)
    model it must do neither: the graphs then read the parameters the optimizer updates."""
    from lmforge.serve.runner import prepare_model

    model = _model()
    names = [n for n, _ in model.named_parameters()]
    prepare_model(model, compiled=True, decode_kernels=True, live=True)
    assert [n for n, _ in model.named_parameters()] == names and all(p.requires_grad for p in model.parameters())
    prepare_model(model, compiled=True, decode_kernels=False)  # a serving engine's model: fused and frozen
    assert any("qkv_proj" in n for n, _ in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_moved_parameters_are_found():
    """A weight replaced rather than updated in place is not where captured graphs read it: the runner names it
    (Engine.sync_weights then captures again). Updated in place, nothing moved."""
    rl = _rollout(_model())
    runner = rl.engine().runner
    runner.graphs = SimpleNamespace(graphs={})  # as if captured (CPU has no CUDA graphs)
    runner._pointers = runner.parameter_pointers()
    _train(rl.model, steps=1)
    assert runner.moved_parameters() == []
    layer = rl.model.layers[0].mlp
    weight = next(p for n, p in layer.named_parameters() if n.endswith("weight"))
    weight.data = weight.data.clone()
    assert len(runner.moved_parameters()) == 1


def test_a_sharded_policy_falls_back_to_eager_with_a_line(monkeypatch):
    """The decode graphs need whole weights: a sharded (FSDP/DTensor) policy samples eagerly, and says so."""
    import lmforge.align.rl as rl_mod

    monkeypatch.setattr(rl_mod, "_sharded", lambda model: True)
    lines = []
    rl = _rollout(_model())
    rl.compile_decode, rl.log = True, lines.append
    assert rl.engine().compiled is False
    assert any("eager decode step: the policy's weights are sharded" in line for line in lines), lines


def test_rollouts_decode_no_text_and_capture_two_batch_sizes():
    """Rollouts need token ids only: the engine never decodes text (a tokenizer's decode is host time per token
    per completion) and, compiled, captures the whole batch and an eighth of it, not every power of two."""
    from lmforge.align.rl import rollout_decode_batches

    class Counting(_Ids):
        decodes = 0

        def decode(self, ids, *args, **kwargs) -> str:
            Counting.decodes += 1
            return "x"

    rl = _rollout(_model())
    rl.tok = Counting()
    assert [len(c) for c in rl.sample(PROMPTS)] == [6] * 6 and Counting.decodes == 0
    assert [rollout_decode_batches(n) for n in (64, 48, 6, 1)] == [[8, 64], [8, 64], [1, 8], [1]]


def test_rollout_benchmarks_run(tmp_path, monkeypatch):
    """benchmarks/grpo_rollout.py --trace writes a profiler trace of a rollout after the timed one; rollout_host_overhead.py
    reports the host time of the steps by part (every generated token counted) and puts the engine's methods back."""
    from lmforge.serve.engine import Engine

    monkeypatch.delenv("OUT", raising=False)
    small = ["--prompts", "2", "--generations", "2", "--prompt-len", "4", "--new-tokens", "3"]
    rows = load_benchmark("grpo_rollout").main(["--shape", "tiny", "--dtype", "float32", "--skip-hf", *small,
                                            "--trace", str(tmp_path / "trace.json")])
    assert rows[0]["generated_tokens"] == 12 and rows[0]["traced_run_seconds"] > 0
    assert rows[0]["joint_projections"] is True and rows[0]["joint_rollouts"] is False  # the policy as align trains it
    assert rows[0]["draw_kernel"] is False  # the CPU: no Triton draw (a CUDA device runs it with --draw-kernel)
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    step = Engine.step
    out = load_benchmark("rollout_host_overhead").main(["--tokenizer", "ids", "--repeats", "1", *small,
                                                    "--json", str(tmp_path / "host.json")])
    assert out == json.loads((tmp_path / "host.json").read_text())
    assert out["steps"] >= 3 and out["host_ms_per_step"] > 0 and out["parts_ms_per_step"]["Engine.step"] > 0
    assert Engine.step is step


def test_rollout_benchmark_measures_the_joint_path_on_request(monkeypatch):
    """benchmarks/grpo_rollout.py --joint-rollouts keeps the joint projections in the rollouts (the weights
    concatenated at every forward, as before issue 18's fix): the same work with weight concatenations, which the
    default run (joint projections in training, apart in rollouts) has none of."""

    class ParameterCats(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.cat.default and any(isinstance(t, torch.nn.Parameter) for t in args[0]):
                self.n += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.delenv("OUT", raising=False)
    small = ["--shape", "tiny", "--dtype", "float32", "--skip-hf", "--prompts", "1", "--generations", "2",
             "--prompt-len", "4", "--new-tokens", "3"]
    bench = load_benchmark("grpo_rollout")
    counts, rows = [], []
    for extra in ([], ["--joint-rollouts"]):
        with ParameterCats() as cats:
            rows.append(bench.main(small + extra)[0])
        counts.append(cats.n)
    assert [r["joint_rollouts"] for r in rows] == [False, True] and rows[0]["joint_projections"] is True
    assert rows[0]["generated_tokens"] == rows[1]["generated_tokens"] == 6
    assert counts[0] == 0 and counts[1] > 0, counts  # joined: 2 per block per forward
    assert bench.rl_module.separate_projections.__name__ == "separate_projections"  # put back after the run


# -- rollouts in the training compute dtype (align.rollout_dtype) --------------------------------------------------

def _bf16_policy(peft: str):
    """The policy as align builds it: fp32 weights ("full", "lora": an fp32 base) or a bf16 frozen base under LoRA
    ("lora_bf16", LoRA weights fp32 whatever the base's dtype)."""
    model = _model()
    if peft == "lora_bf16":
        model = model.to(torch.bfloat16)
    if peft != "full":
        from lmforge.peft import apply_peft
        from lmforge.peft.lora import LoRAConfig

        model = apply_peft(model, "lora", LoRAConfig(r=4, target_modules=["all-linear"]))
    return model


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_bf16_rollouts_of_an_fp32_policy_sample_from_a_copy_refreshed_in_place(peft):
    """Under bf16-mixed the policy's weights are fp32 (master weights): the engine samples from a bf16 copy built
    once (the policy itself stays fp32 and untouched) whose trained weights (every parameter; LoRA: the adapters')
    are cast into it in place once per rollout. After optimizer steps the long-lived engine's rollout equals that
    of a fresh engine built on a fresh bf16 cast of the updated policy (same seeds), every weight of the copy
    equals that cast, and the engine's tensors are the same tensors as before (data_ptr): a compiled engine's
    decode graphs, captured on them, stay valid."""
    import copy

    model = _bf16_policy(peft)
    rl = RolloutLoss(model, "grpo", _rollout(model).s, None, _Ids(), None, 16, 7, 6, rollout_dtype=torch.bfloat16)
    policy = rl._rollout_policy()
    assert policy is not model and rl.rollout_dtype == torch.bfloat16
    assert {t.dtype for t in (*policy.parameters(), *policy.buffers())} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy keeps its fp32 weights
    assert torch.equal(policy.rope_cos, model.rope_cos.to(torch.bfloat16))  # rotary tables cast from the policy's
    assert "sampling in bfloat16 from a copy of the policy (0.00 GiB" in rl.describe_rollouts()
    want_trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert rl._trained_names == want_trained and (peft == "full") == (len(want_trained) == len(list(
        model.parameters())))
    before = rl.sample(PROMPTS, rollout=1)
    engine = rl.engine()
    assert engine.model is policy and engine.dtype == torch.bfloat16 and engine.cache.k[0].dtype == torch.bfloat16
    pointers = {n: p.data_ptr() for n, p in policy.named_parameters()}
    _train(model)
    rl.refresh_copy()  # what collect() does before each rollout
    after = rl.sample(PROMPTS, rollout=1)
    cast = copy.deepcopy(model).to(torch.bfloat16)  # a fresh bf16 cast of the updated policy
    for (name, mine), (_, theirs) in zip(policy.named_parameters(), cast.named_parameters()):
        assert torch.equal(mine, theirs), name
    fresh = RolloutLoss(cast, "grpo", rl.s, None, _Ids(), None, 16, 7, 6)
    assert not fresh._copy  # already bf16: no copy
    assert after == fresh.sample(PROMPTS, rollout=1)
    assert after != before  # a copy left at the starting weights would draw `before` again
    assert rl.engine() is engine and {n: p.data_ptr() for n, p in policy.named_parameters()} == pointers


def test_a_bf16_lora_base_needs_no_copy():
    """LoRA on a bf16 frozen base: the weights are bf16 already (the few fp32 LoRA weights are cast to the
    input's dtype at use), so bf16 rollouts sample from the policy itself; float32 asked for explicitly, from an
    fp32 copy."""
    model = _bf16_policy("lora_bf16")
    rl = RolloutLoss(model, "grpo", _rollout(model).s, None, _Ids(), None, 16, 7, 6, rollout_dtype=torch.bfloat16)
    assert not rl._copy and rl._rollout_policy() is model
    assert rl.describe_rollouts() == "sampling in bfloat16, the policy's own weights (no copy)"
    assert rl.engine().dtype == torch.bfloat16
    wide = RolloutLoss(model, "grpo", rl.s, None, _Ids(), None, 16, 7, 6, rollout_dtype=torch.float32)
    assert {p.dtype for p in wide._rollout_policy().parameters()} == {torch.float32}


def test_rollout_dtype_setting():
    from lmforge.align.rl import rollout_dtype

    assert rollout_dtype("auto", torch.bfloat16) == torch.bfloat16  # bf16-mixed's compute dtype
    assert rollout_dtype("auto", None) is None  # precision 32: the weights' own
    assert rollout_dtype("float16", None) == torch.float16 and rollout_dtype("float32", torch.bfloat16) == torch.float32
    with pytest.raises(ConfigError, match="align.rollout_dtype='fp8'; use auto"):
        rollout_dtype("fp8", None)


def test_rollout_benchmark_repeats_and_measures_aligns_master_fp32_path(monkeypatch, tmp_path, capsys):
    """benchmarks/grpo_rollout.py --repeats times each engine (lmforge's and HF's) that many times after its warm-up
    and reports the best and the median, the speed-up of both; --master-fp32 builds an fp32 policy whose rollouts
    sample in bf16 from a copy, refreshed before each rollout, and --check then holds the copy to a fresh cast of
    the updated policy: a copy never refreshed fails it."""
    monkeypatch.delenv("OUT", raising=False)
    bench = load_benchmark("grpo_rollout")
    args = ["--shape", "tiny", "--prompts", "2", "--generations", "2", "--prompt-len", "4", "--new-tokens", "8",
            "--master-fp32", "--check", "--repeats", "2"]
    lm, hf, speed, check = bench.main(args + ["--trace", str(tmp_path / "trace.json")])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    # the traced rollout comes after every timing, HF's included (a profiler slows the host-bound work after it)
    assert [("engine" in r and r["engine"]) or next(iter(r)) for r in printed][:4] == [
        "lmforge RolloutLoss.sample", "transformers generate", "speedup", "traced_run_seconds"]
    assert lm["traced_run_seconds"] > 0
    for row in (lm, hf):
        assert row["repeats"] == 2 and len(row["seconds_all"]) == 2 and row["generated_tokens"] == 32
        assert row["seconds"] == min(row["seconds_all"]) and row["tokens_per_s"] >= row["tokens_per_s_median"]
    assert lm["path"] == "master-fp32" and lm["rollout_dtype"] == "bfloat16" and "refresh_copy_seconds" in lm
    assert set(speed) == {"speedup", "speedup_median"}
    assert check["rollout_copy"] and check["equal"] and check["copy_updated_in_place"], check
    monkeypatch.setattr(RolloutLoss, "refresh_copy", lambda self: None)  # a copy left at the starting weights
    with pytest.raises(SystemExit, match="check failed"):
        bench.main(args[:-2] + ["--skip-hf", "--repeats", "1"])


def test_rollout_compile_mode_reaches_the_compiled_engine(monkeypatch, capsys):
    """RolloutLoss.compile_mode (benchmarks/grpo_rollout.py --compile-mode sets it) is the compiled rollout engine's
    torch.compile mode, and no mode for an eager engine; the benchmark's --decode-batches patch gives the compiled
    engine those batch sizes alone, its --draw-kernel / --no-draw-kernel patch sets the Triton draw while the engine is built. Both flags are refused where no compiled step runs (here: the CPU), in one
    line, exit code 2, as are batch sizes the rollout cannot have."""
    import lmforge.serve.engine as engine_module

    built = []

    from lmforge.serve import kernels

    class Recorder:
        def __init__(self, model, tokenizer=None, **kw):
            built.append(dict(kw, draw_kernel=kernels.DRAW_KERNEL))

    monkeypatch.setattr(engine_module, "Engine", Recorder)
    bench = load_benchmark("grpo_rollout")
    for compiled in (True, False):
        rl = _rollout(_model())
        rl.compile_decode = compiled
        rl.compile_mode = "max-autotune-no-cudagraphs"
        with bench.patches(SimpleNamespace(joint_rollouts=False, decode_batches=[8], draw_kernel=compiled)):
            rl.engine()
    assert [(kw["compile_decode"], kw["compile_mode"], kw["decode_batches"], kw["draw_kernel"]) for kw in built] == [
        (True, "max-autotune-no-cudagraphs", [8], True), (False, None, [8], False)]  # --no-draw-kernel: off
    assert kernels.DRAW_KERNEL is True  # on since session 12's GPU timing; the patch put it back
    assert bench.parse(["--no-draw-kernel"]).draw_kernel is False and bench.parse(["--draw-kernel"]).draw_kernel
    assert bench.parse([]).draw_kernel is None  # the default: whatever kernels.DRAW_KERNEL says
    assert RolloutLoss.compile_mode is None  # align's rollouts: inductor's default kernels
    assert bench.rl_module.rollout_decode_batches(64) == [8, 64]  # put back after the patch
    base = ["--shape", "tiny", "--skip-hf", "--prompts", "2", "--generations", "4"]
    for extra, says in ((["--compile-mode", "max-autotune-no-cudagraphs"], "--compile-mode max-autotune-no-cudagraphs"),
                        (["--decode-batches", "8"], "--decode-batches 8: it sets the compiled decode step"),
                        (["--decode-batches", "4,16"], "--decode-batches 4,16: give batch sizes from 1 to 8")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and says in err[-1], err


def test_next_gpu_call_for_rollouts_parses_and_fits_one_call(monkeypatch):
    """docs/benchmarks.md's "Next GPU call for rollouts": every benchmark line parses as a CUDA machine would take it
    (each benchmark's own parse), writes under a folder the first line makes, and the timeouts fit one 600 s call."""
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    section = doc.split("**Next GPU call for rollouts", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    made = set(re.findall(r"\$OUT/(\w+)", lines[0])) if lines[0].startswith("mkdir -p ") else set()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seconds, parsed = 0, {}
    for line in lines[1:]:
        words = shlex.split(line)
        script = next(i for i, w in enumerate(words) if w.startswith("benchmarks/") and w.endswith(".py"))
        end = next((i for i, w in enumerate(words) if w.startswith(">") or w == "2>&1"), len(words))
        assert words[script - 3] == "timeout" and words[script - 1] == "python", line
        seconds += int(words[script - 2])
        assert any(w.startswith("OUT=$OUT/") and w[len("OUT=$OUT/"):] in made for w in words[:script]), line
        name = Path(words[script]).stem
        parsed.setdefault(name, []).append(load_benchmark(name).parse(words[script + 1:end]))
    assert seconds <= 570 and set(parsed) == {"decode_gemm", "paged_attention", "grpo_rollout"}, (seconds, parsed)
    default, tuned = parsed["grpo_rollout"]
    assert default.compile_mode is None and default.skip_hf
    assert tuned.compile_mode == "max-autotune-no-cudagraphs" and tuned.decode_batches == [64] and tuned.skip_hf
    gemm, = parsed["decode_gemm"]
    assert gemm["models"] == ["1b"] and gemm["ms"] == [64, 8] and gemm["device"].type == "cuda"
    cases, tiles, sweep, splits = parsed["paged_attention"][0]
    assert cases[:3] == ["1b_r64_l128", "1b_r64_l256", "1b_r64_l384"] and splits == [1, 2, 3, 4]
