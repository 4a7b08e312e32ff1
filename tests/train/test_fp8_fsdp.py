"""Float8 all-gather under FSDP (``model.fp8_fsdp_all_gather``): on two gloo ranks with torchao's emulated float8,
FSDP gathering the float8 weights trains exactly as gathering them in fp32 (same losses, same weights) and within
float8 rounding of the bf16 all-gather; which runs it applies to, the refusals of ``true``, the scale hook after
each optimizer step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError
from tests.conftest import run_cases, tiny_overrides
from tests.train.test_pretrain import _losses

WORKER = Path(__file__).with_name("fp8_fsdp_worker.py")


def _pretrain_args(corpus, out, all_gather: str) -> list[str]:
    """The 2-rank FSDP float8 pretraining run: 6 steps, checkpoints at 3 and 6."""
    overrides = {"trainer.precision": "fp8", "trainer.max_steps": 6, "trainer.val_check_interval": 3,
                 "exp_manager.checkpoint_callback_params.every_n_train_steps": 3,
                 "exp_manager.checkpoint_callback_params.save_top_k": -1}
    return ["pretrain", "tiny/llama", *tiny_overrides(corpus, out, **overrides), "trainer.devices=2", "model.fsdp=true",
            f"model.fp8_fsdp_all_gather={all_gather}"]


@pytest.fixture(scope="module")
def two_ranks(tiny_corpus, tmp_path_factory) -> dict:
    """The worker's own comparison (OUT.json) and, in the same launch, three ``lmforge pretrain`` runs with emulated
    float8 (plain all-gather, float8 all-gather, float8 all-gather killed after step 4); then, in a second launch, the
    killed run resumed from its step-3 checkpoint, and a run that asks for float8 all-gather with rowwise scaling."""
    root = tmp_path_factory.mktemp("fp8_fsdp")
    out = root / "out.json"
    cases = [{"name": "plain", "args": _pretrain_args(tiny_corpus, root / "plain", "false")},
             {"name": "float8", "args": _pretrain_args(tiny_corpus, root / "float8", "true")},
             {"name": "killed", "args": _pretrain_args(tiny_corpus, root / "resumed", "true"),
              "env": {"LMFORGE_TEST_KILL_AT_STEP": "4"}}]
    runs = run_cases(cases, 2, root / "launch", script=WORKER, script_args=(str(out),))
    refused = [*_pretrain_args(tiny_corpus, root / "refused", "true"), "model.fp8_recipe=rowwise"]
    resumed = run_cases([{"name": "resumed", "args": _pretrain_args(tiny_corpus, root / "resumed", "true")},
                         {"name": "refused", "args": refused}], 2, root / "resume", script=WORKER, script_args=("-",))
    return dict(json.loads(out.read_text()), runs={**runs, **resumed}, root=root)


def test_float8_all_gather_trains_as_the_plain_all_gather(two_ranks):
    for precision in ("32", "bf16-mixed"):
        run = two_ranks[precision]
        assert run["weight_types"] == ["Tensor", "WeightWithDynamicFloat8CastTensor"]
        plain, ag = run["gathers"]
        # 3 steps x (14 projections gathered for forward + the first block's 7 again for backward: the last block
        # keeps its weights); the scales precomputed after steps 1 and 2 serve the later steps' gathers
        assert plain["calls"] == 0 and ag == {"calls": 63, "precomputed": 42, "dtypes": ["torch.float8_e4m3fn"]}
        assert run["max_weight_change"] > 1e-3  # the weights did train
    fp32 = two_ranks["32"]
    # fp32: the shards cast to float8 with the all-reduced amax are the gathered weight's float8 cast, bit for bit
    assert fp32["all_gather"] == fp32["plain"] and fp32["max_weight_diff"] == 0.0
    # bf16-mixed: the float8 weight comes from the fp32 shard (one rounding) instead of its bf16 copy (two)
    bf16 = two_ranks["bf16-mixed"]
    assert bf16["all_gather"] == pytest.approx(bf16["plain"], rel=1e-3) and bf16["all_gather"] != bf16["plain"]


def test_pretraining_with_float8_all_gather_saves_and_resumes(two_ranks):
    runs, root = two_ranks["runs"], two_ranks["root"]
    assert "FSDP all-gathers their weights in float8" not in runs["plain"].ok()
    assert "fp8: 14 block projections in float8 (tensorwise scaling), the rest in bf16; FSDP all-gathers their " \
           "weights in float8" in runs["float8"].ok()
    plain, float8 = _losses(root / "plain"), _losses(root / "float8")
    assert sorted(float8) == list(range(1, 7)) and float8 != plain
    for step in plain:  # bf16-mixed: float8 rounding of the weight from fp32 (not from its bf16 copy) apart
        assert float8[step] == pytest.approx(plain[step], rel=1e-3), step
    assert (root / "float8" / "checkpoints" / "step_0000006" / "model" / "shards.json").is_file()
    # the killed run's step-3 checkpoint, resumed: the same steps 4-6 as the run never stopped, bit for bit
    assert runs["killed"].ran and "step_0000003 at step 3" in runs["resumed"].ok()
    assert _losses(root / "resumed") == float8


def test_fsdp_all_gather_applies_to_tensorwise_sharded_runs_without_joint_projections(monkeypatch):
    from lmforge.train import fp8
    from lmforge.train.fp8 import fsdp_all_gather

    assert fsdp_all_gather("true", "tensorwise", 2, False) is True
    assert fsdp_all_gather("True", "tensorwise", 8, False) is True  # YAML's true, as the config holds it
    assert fsdp_all_gather("false", "tensorwise", 2, False) is False
    assert fsdp_all_gather("auto", "tensorwise", 2, False) is fp8.FSDP_ALL_GATHER_AUTO
    monkeypatch.setattr(fp8, "FSDP_ALL_GATHER_AUTO", True)
    assert fsdp_all_gather("auto", "tensorwise", 2, False) is True
    for where in (("rowwise", 2, False), ("tensorwise", 1, False), ("tensorwise", 2, True)):
        assert fsdp_all_gather("auto", *where) is False
        assert fsdp_all_gather("false", *where) is False
    with pytest.raises(ConfigError, match=r"^model.fp8_fsdp_all_gather=true needs model.fp8_recipe=tensorwise"):
        fsdp_all_gather("true", "rowwise_with_gw_hp", 2, False)
    with pytest.raises(ConfigError, match=r"^model.fp8_fsdp_all_gather=true needs FSDP sharding over more than one"):
        fsdp_all_gather("true", "tensorwise", 1, False)
    with pytest.raises(ConfigError, match=r"^model.fp8_fsdp_all_gather=true does not mix with joint projections"):
        fsdp_all_gather("true", "tensorwise", 4, True)
    with pytest.raises(ConfigError, match="model.fp8_fsdp_all_gather='on' is not one of: auto, true, false"):
        fsdp_all_gather("on", "tensorwise", 2, False)


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.devices=2", "model.fsdp=true", "model.fp8_fsdp_all_gather=true"], True),
    (["trainer.devices=2", "model.fsdp=true", "model.fp8_fsdp_all_gather=false"], False),
    (["trainer.devices=2", "model.fsdp=true"], False),  # auto: off until a GPU has timed it (FSDP_ALL_GATHER_AUTO)
    (["trainer.devices=2", "model.fp8_fsdp_all_gather=true"], "needs FSDP sharding"),  # DDP
    (["trainer.devices=1", "model.fsdp=true", "model.fp8_fsdp_all_gather=true"], "needs FSDP sharding"),
    (["trainer.devices=2", "trainer.num_nodes=2", "model.fsdp=true", "model.fsdp_sharding_strategy=hybrid",
      "model.fp8_fsdp_all_gather=true"], True),
    (["trainer.devices=2", "model.fsdp=true", "model.fp8_recipe=rowwise", "model.fp8_fsdp_all_gather=true"],
     "needs model.fp8_recipe=tensorwise"),
    (["trainer.devices=2", "model.fsdp=true", "model.fused_projections=true", "model.fp8_fsdp_all_gather=true"],
     "does not mix with joint projections"),
])
def test_the_pretraining_job_gets_the_setting(overrides, expected):
    from lmforge.config import load_config
    from lmforge.config.loader import parallel_dims
    from lmforge.train.assembly import fp8_all_gather_on
    from lmforge.train.pretrain import job_from_config

    cfg = load_config("tiny/llama", ["trainer.precision=fp8", "model.global_batch_size=32", *overrides])
    job = job_from_config(cfg, parallel_dims(cfg), 10)
    if isinstance(expected, bool):
        assert fp8_all_gather_on(job) is expected
    else:
        with pytest.raises(ConfigError, match=f"^model.fp8_fsdp_all_gather=true {expected}"):
            fp8_all_gather_on(job)


def test_config_refuses_unknown_values_and_the_key_without_fp8():
    from lmforge.config import load_config

    with pytest.raises(ConfigError, match="model.fp8_fsdp_all_gather='sometimes' is not one of: auto, true, false"):
        load_config("tiny/llama", ["trainer.precision=fp8", "model.fp8_fsdp_all_gather=sometimes"])
    with pytest.raises(ConfigError, match="model.fp8_fsdp_all_gather=true gathers the float8 projections' weights, "
                                          "but model.fp8 is off"):
        load_config("tiny/llama", ["model.fp8_fsdp_all_gather=true"])


def test_all_gather_weights_stay_apart_and_the_scales_follow_each_step(monkeypatch):
    import torchao.float8
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from lmforge.models.transformer import set_joint_projections
    from lmforge.train.fp8 import apply_fp8, precompute_scales_after_steps
    from tests.train.test_speed_paths import tiny

    model = tiny(hidden_size=64, ffn_hidden_size=128, share_embeddings_and_output_weights=False)
    apply_fp8(model, "tensorwise", emulate=True, fsdp_all_gather=True)
    q = model.layers[0].self_attn.q_proj
    assert q.config.enable_fsdp_float8_all_gather and q.config.emulate
    assert isinstance(q.weight.data, WeightWithDynamicFloat8CastTensor) and q.weight.requires_grad
    assert set_joint_projections(model) == 0  # each gathered weight has its own scale: no joint float8 matmul
    with pytest.raises(ConfigError, match="needs model.fp8_recipe=tensorwise"):
        apply_fp8(tiny(hidden_size=64, ffn_hidden_size=128), "rowwise", emulate=True, fsdp_all_gather=True)

    seen = []
    monkeypatch.setattr(torchao.float8, "precompute_float8_dynamic_scale_for_fsdp", seen.append)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precompute_scales_after_steps(optimizer, model)
    assert seen == []
    for step in (1, 2):
        optimizer.step()
        assert seen == [model] * step


def test_scaling_benchmarks_float8_layouts_turn_the_all_gather_off_and_on():
    """benchmarks/scaling.py's GPU-only float8 layouts (the lead's 2-GPU command): their config keys reach the job."""
    from lmforge.config import load_config
    from lmforge.config.loader import parallel_dims
    from lmforge.train.assembly import fp8_all_gather_on
    from lmforge.train.pretrain import job_from_config
    from tests.conftest import load_benchmark

    scaling = load_benchmark("scaling")
    # docs/benchmarks.md's command for 2 GPUs
    a = scaling.parse_args("8b --nproc 2 --layers 16 --layouts fsdp_compile,fsdp_compile_fp8,fsdp_compile_fp8_ag".split())
    assert "fsdp_compile_fp8" not in scaling.parse_args(["8b"]).layouts  # not in the CPU test's default run
    found = []
    for case in scaling.plan_8b(a):
        cfg = load_config(case["recipe"], case["overrides"])
        job = job_from_config(cfg, parallel_dims(cfg), 10)
        found.append((case["name"], job.fp8, job.compile, bool(job.fp8) and fp8_all_gather_on(job)))
    assert found == [("fsdp_compile", None, True, False), ("fsdp_compile_fp8", "tensorwise", True, False),
                     ("fsdp_compile_fp8_ag", "tensorwise", True, True)]
    assert set(scaling.TITAN_LAYOUTS) == set(scaling.LAYOUTS)


def test_true_where_it_cannot_apply_is_refused_before_any_work(two_ranks):
    refused = two_ranks["runs"]["refused"]
    assert refused.codes == {0: 2, 1: 2}
    assert "error: model.fp8_fsdp_all_gather=true needs model.fp8_recipe=tensorwise (one scale per weight), not " \
           "rowwise" in refused.output and "Traceback" not in refused.output
    assert not (two_ranks["root"] / "refused").exists()
