"""``lmforge config ... --estimate``: per-GPU memory of a config, computed on the meta device."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_config, model_config_from
from lmforge.config.estimate import GiB, estimate_memory, parse_memory_size
from lmforge.errors import ConfigError
from lmforge.models.transformer import Transformer
from tests.conftest import load_benchmark

README = Path(__file__).resolve().parents[2] / "README.md"


def _meta_count(cfg, vocab):
    with torch.device("meta"):
        model = Transformer(model_config_from(cfg, vocab))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("recipe", ["tiny/llama", "gpt3/126m"])
def test_parameter_count_is_the_meta_models(recipe):
    cfg = load_config(recipe)
    assert estimate_memory(cfg).num_params == _meta_count(cfg, 32000)
    assert estimate_memory(cfg, vocab_size=50257).num_params == _meta_count(cfg, 50257)


def test_llama2_7b_full_state_on_one_gpu():
    est = estimate_memory(load_config("llama2/7b", ["trainer.devices=1"]))
    assert abs(est.num_params - 6.74e9) / 6.74e9 < 0.01  # Llama-2-7B's published count, 32000 tokens
    assert est.state == 16 * est.num_params  # fp32 weights + fp32 gradients + two fp32 Adam moments
    assert abs(est.state - 16 * 6.74e9) / (16 * 6.74e9) < 0.03  # ~108 GB
    assert est.vocab_assumed and est.vocab_size == 32000


def test_fsdp_on_four_gpus_shards_the_state():
    one = estimate_memory(load_config("llama2/7b", ["trainer.devices=1"]))
    cfg = load_config("llama2/7b", ["trainer.devices=4"])
    cfg.model.fsdp = True  # read with getattr: works whether or not the schema has the key
    four = estimate_memory(cfg)
    assert four.layout.fsdp == "full" and four.layout.shard_group == 4
    assert abs(four.state - one.state / 4) <= 3
    assert four.compute_copy < one.compute_copy  # two gathered blocks instead of every weight


def test_zero2_and_distributed_optimizer_layouts():
    cfg = load_config("llama2/7b", ["trainer.devices=4"])
    cfg.model.fsdp, cfg.model.fsdp_sharding_strategy = True, "grad"
    grad = estimate_memory(cfg)
    cfg.model.fsdp_sharding_strategy = "full"
    full = estimate_memory(cfg)
    assert grad.compute_copy > full.compute_copy  # gathered parameters kept from forward to backward
    cfg = load_config("llama2/7b", ["trainer.devices=4"])
    cfg.model.optim.name = "distributed_fused_adam"
    if hasattr(cfg.model, "fsdp"):
        cfg.model.fsdp = False
    dist = estimate_memory(cfg)
    assert dist.optimizer * 4 == pytest.approx(full.optimizer * 4, abs=4) and dist.weights == 4 * dist.params_per_gpu


def test_full_checkpointing_keeps_fewer_activations():
    none = estimate_memory(load_config("llama2/7b", ["trainer.devices=1"]))
    full = estimate_memory(load_config("llama2/7b", ["trainer.devices=1",
                                                     "model.activations_checkpoint_granularity=full"]))
    assert full.activations_per_sample < none.activations_per_sample / 4
    assert full.state == none.state


def test_tensor_parallel_divides_and_is_noted():
    one = estimate_memory(load_config("llama2/7b", ["trainer.devices=8"]))
    cfg = load_config("llama2/7b", ["trainer.devices=8"])
    cfg.model.tensor_model_parallel_size = 2
    tp = estimate_memory(cfg)
    assert tp.state == pytest.approx(one.state / 2, rel=0.001)
    assert tp.activations_per_sample < one.activations_per_sample
    assert not any("refuses" in n for n in tp.notes)  # tensor parallelism trains now
    cfg.model.pipeline_model_parallel_size = 2
    assert not any("refuses" in n for n in estimate_memory(cfg).notes)  # pipeline beside tensor parallelism too


def test_pick_is_the_largest_micro_batch_under_80_percent():
    cfg = load_config("gpt3/126m", ["trainer.devices=1"])
    base = estimate_memory(cfg)
    card = int((base.total(4) + base.activations_per_sample // 2) / 0.79)  # mbs 4 at ~79%, 8 above 80%
    est = estimate_memory(cfg, gpu_memory_bytes=card)
    assert est.pick == 4
    assert est.total(4) <= 0.8 * card < est.total(8)
    assert est.pick_in_band
    assert [r.micro_batch_size for r in est.table][:4] == [1, 2, 4, 8]
    assert est.table[-1].total_bytes > card or est.table[-1].micro_batch_size == 1024
    assert est.max_micro_batch >= 4


def test_nothing_fits_names_the_overrides():
    est = estimate_memory(load_config("llama2/7b", ["trainer.devices=1"]), gpu_memory_bytes=80 * GiB)
    assert est.pick is None
    text = est.render()
    assert "nothing fits" in text
    overrides = [s.overrides for s in est.suggestions]
    assert "trainer.devices=8 model.fsdp=true" in overrides
    assert "model.activations_checkpoint_granularity=full" in overrides
    assert [s.total_bytes for s in est.suggestions] == sorted(s.total_bytes for s in est.suggestions)
    fp32 = estimate_memory(load_config("llama2/7b", ["trainer.devices=1", "trainer.precision=32"]),
                           gpu_memory_bytes=80 * GiB)
    assert "trainer.precision=bf16-mixed" in [s.overrides for s in fp32.suggestions]


def test_to_dict_and_render():
    est = estimate_memory(load_config("tiny/llama"), gpu_memory_bytes=16 * GiB)
    d = est.to_dict()
    assert d["num_params"] == est.num_params and d["layout"]["world_size"] == 1 and d["table"]
    assert "no tokenizer given" in est.render()


@pytest.mark.parametrize("text,expected", [("80GB", 80 * GiB), ("80GiB", 80 * GiB), ("80G", 80 * GiB),
                                           ("40000MB", 40000 << 20), ("1.5TB", int(1.5 * (1 << 40))),
                                           (85899345920, 80 * GiB), ("81559MiB", 81559 << 20)])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["abc", "", "80XB", "-5GB", "0GB", "80", True])
def test_parse_memory_size_refuses(bad):
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory_size(bad)


def test_cli_prints_the_table(capsys):
    assert main(["config", "gpt3/126m", "trainer.devices=1", "--estimate", "--gpu-memory", "40GB"]) == 0
    out = capsys.readouterr().out
    assert "micro batch" in out and "% of a 40.00 GiB card" in out and "<- largest at <= 80%" in out
    assert "weights (fp32)" in out and "activations per micro batch" in out


def test_cli_bad_gpu_memory_is_one_line(capsys):
    assert main(["config", "tiny/llama", "--estimate", "--gpu-memory", "abc"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "--gpu-memory" in err[0] and "abc" in err[0]


def test_cli_gpu_memory_needs_estimate(capsys):
    assert main(["config", "tiny/llama", "--gpu-memory", "80GB"]) == 2
    assert "--estimate" in capsys.readouterr().err


def test_cli_fsdp_override(capsys):
    assert main(["config", "llama2/7b", "trainer.devices=4", "model.fsdp=true", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "FSDP full (sharded over 4)" in out and "fits: model.micro_batch_size=" in out


def _doc_estimate_commands():
    lines = README.read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines
            if line.startswith("lmforge config") and "--estimate" in line]


def test_readme_estimate_commands_run_verbatim(capsys):
    commands = _doc_estimate_commands()
    assert commands, "README.md shows no `lmforge config ... --estimate` command"
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "lmforge"
        assert main(argv[1:]) == 0, command
        assert re.search(r"micro batch +total GiB", capsys.readouterr().out)


# -- the loss: whole or chunked, as training resolves model.loss_chunk_size ---------------------------------------

LLAMA3_VOCAB = 128256


def test_large_vocabulary_counts_one_chunk_of_logits():
    """128k vocabulary, automatic chunking: the logits term is one 2048-token chunk's and stops growing with the
    micro batch or the sequence; model.loss_chunk_size=0 counts every token's logits (fp32 + gradient pair)."""
    cfg = load_config("llama2/7b", ["trainer.devices=1"])
    est = estimate_memory(cfg, vocab_size=LLAMA3_VOCAB)
    V, C, seq = est.vocab_size, cfg.model.hidden_size, est.layout.seq_length
    assert est.layout.loss_chunk_size == 2048  # training's rule: fp32 logits of a chunk ~1 GiB at 128k
    # one chunk: bf16 logits + fp32 copy + z - lse + its exp (softmax gradient; then its masked copy), and the
    # previous chunk's bf16 gradient, alive while this chunk's logits are made
    chunk = 2048 * V * (2 + 4 + 8 + 2)
    assert est.logits_per_sample == est.logits(1) == est.logits(8) == chunk
    assert est.terms.loss_forward == 4 * V * C  # the fp32 head-weight gradient accumulator: not logits
    longer = estimate_memory(load_config("llama2/7b", ["trainer.devices=1", "model.encoder_seq_length=8192",
                                                       "model.max_position_embeddings=8192"]),
                             vocab_size=LLAMA3_VOCAB)
    assert longer.logits(1) == chunk
    assert "loss         chunked, 2048 tokens a chunk (model.loss_chunk_size: automatic)" in est.render()

    whole = estimate_memory(load_config("llama2/7b", ["trainer.devices=1", "model.loss_chunk_size=0"]),
                            vocab_size=LLAMA3_VOCAB)
    assert whole.layout.loss_chunk_size == 0
    assert whole.logits(1) == 12 * V * seq and whole.logits(4) == 4 * whole.logits(1)
    assert whole.compute_copy == est.compute_copy  # the head's bf16 copy: autocast's, or the chunked loss's own
    assert est.total(4) < whole.total(4)
    assert "loss         whole: the micro batch's logits at once (model.loss_chunk_size: 0)" in whole.render()


def test_chunked_logits_scale_with_the_chunk_not_the_micro_batch():
    """A chunked loss's logits are one chunk's: a quarter the chunk, a quarter the logits, at any micro batch; a
    micro batch within one chunk has no previous chunk's gradient beside them and grows with its tokens."""
    def est(*overrides):
        return estimate_memory(load_config("llama2/7b", ["trainer.devices=1", *overrides]), vocab_size=LLAMA3_VOCAB)

    big, small = est("model.loss_chunk_size=2048"), est("model.loss_chunk_size=512")
    for mbs in (1, 2, 8):
        assert small.logits(mbs) * 4 == big.logits(mbs) == big.logits(1)
    V = big.vocab_size
    short = est("model.loss_chunk_size=2048", "model.encoder_seq_length=1024")  # one chunk at micro batch 1 and 2
    assert short.logits(1) == 1024 * V * 14 and short.logits(2) == 2 * short.logits(1)
    assert short.logits(4) == big.logits(1)  # two chunks: the previous one's gradient counts from here
    # the whole loss grows with every token instead
    whole = est("model.loss_chunk_size=0")
    assert whole.logits(8) == 8 * whole.logits(1) > big.logits(8)


def _one_step(*overrides, vocab=LLAMA3_VOCAB):
    """Llama-3-8B's shape cut to 2 blocks at sequence 4096 on one GPU."""
    return estimate_memory(load_config("llama3/8b", ["trainer.devices=1", "model.num_layers=2",
                                                     "model.encoder_seq_length=4096", *overrides]), vocab_size=vocab)


def test_gradients_are_resident_at_the_peak_only_when_they_accumulate():
    """One micro batch a step (zero_grad sets the gradients to None): a chunked 128k loss peaks in its forward,
    before any gradient exists. Accumulating over micro batches, every gradient is resident from the second one."""
    one = _one_step("model.micro_batch_size=1", "model.global_batch_size=1")
    peak = one.peak(1)
    assert peak.name == "the loss's forward" and peak.gradients == 0
    assert peak.compute_copy == one.compute_copy  # autocast's cache holds every cast until the forward ends
    assert one.total(1) == one.fixed + peak.total and one.fixed == one.weights + one.optimizer + one.cuda_context
    acc = _one_step("model.micro_batch_size=1", "model.global_batch_size=4")
    assert acc.peak(1).gradients == acc.gradients > 0
    assert acc.total(1) == one.total(1) + acc.gradients
    assert acc.terms.accumulating(2) and not acc.terms.accumulating(4)  # global batch 4 = 4 x 1 rank


def test_checkpointing_peaks_in_the_first_blocks_backward():
    """Full checkpointing with a 32k vocabulary: the peak is the first block's backward, the last to run, with
    every later gradient made, the block recomputed (its compute copy cast again: autocast's cache of the forward
    is gone) and its backward's gradients; the chunked and the whole loss peak there alike."""
    chunked = _one_step("model.micro_batch_size=1", "model.global_batch_size=1",
                        "model.activations_checkpoint_granularity=full", vocab=32000)
    whole = _one_step("model.micro_batch_size=1", "model.global_batch_size=1", "model.loss_chunk_size=0",
                      "model.activations_checkpoint_granularity=full", vocab=32000)
    t = chunked.terms
    peak = chunked.peak(1)
    assert peak.name == "the first block's backward" and whole.peak(1).total == peak.total
    block_copy = peak.compute_copy
    assert 0 < 2 * block_copy < chunked.compute_copy  # one of two blocks' copies, beside the head's
    assert t.copy_loss_backward == 0 and whole.terms.copy_loss_backward > 0  # only the whole head's linear saves it
    assert 0 < peak.gradients < chunked.gradients  # the first block's and the embedding's come after
    assert peak.activations == t.first_chunk + t.backward_temps
    plain = _one_step("model.micro_batch_size=1", "model.global_batch_size=1", vocab=32000)
    assert plain.terms.layers == 2 * (t.first_chunk - t.layers // 2)  # no checkpointing: every block's kept


def _recorded_estimate_checks():
    """The one-GPU measurements of benchmarks/estimate_loss_check.py kept in benchmarks/results."""
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    records = []
    for path in sorted(results.glob("*estimate_loss_check*.json")):
        records += [(path.name, r) for r in json.loads(path.read_text()) if r.get("measured_gib")]
    return records


RECORDED = _recorded_estimate_checks()


def test_recorded_checks_are_there():
    # the H100 session 11 run: 128k chunked at micro batch 1 and 2, 32k checkpointed chunked and whole at 1 and 2
    assert len(RECORDED) >= 6


@pytest.fixture(scope="module")
def loss_check():
    return load_benchmark("estimate_loss_check")


@pytest.mark.parametrize("name,rec", RECORDED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(RECORDED)])
def test_estimate_is_within_15_percent_of_the_measured_peak(loss_check, name, rec):
    """Each recorded GPU measurement's config, rebuilt as the benchmark builds it: the estimated step peak is
    within 15% of torch.cuda.max_memory_allocated's."""
    check = loss_check
    mbs = rec["micro_batch_size"]
    cfg = check.case_config(rec["recipe"], rec["layers"], rec["seq"], mbs, rec["loss_chunk_size"],
                            rec["checkpointing"], rec.get("hidden", 0))
    est = estimate_memory(cfg, vocab_size=rec["vocab"])
    assert est.layout.loss_chunk_size == rec["loss_chunk_size"]
    measured = rec["measured_gib"] * GiB
    assert abs(est.step(mbs) - measured) <= 0.15 * measured, (name, est.peak(mbs), rec)


def test_checkpointing_chunks_a_32k_vocabulary_by_default():
    plain = estimate_memory(load_config("llama2/7b", ["trainer.devices=1"]))
    assert plain.layout.loss_chunk_size == 0  # 32k vocabulary, no checkpointing: whole
    full = estimate_memory(load_config("llama2/7b", ["trainer.devices=1",
                                                     "model.activations_checkpoint_granularity=full"]))
    off = estimate_memory(load_config("llama2/7b", ["trainer.devices=1", "model.loss_chunk_size=0",
                                                    "model.activations_checkpoint_granularity=full"]))
    assert full.layout.loss_chunk_size == 2048 and off.layout.loss_chunk_size == 0
    assert full.logits(2) == full.logits(1) < off.logits(2) == 2 * off.logits(1)
    assert full.total(4) < off.total(4)
    set_ = estimate_memory(load_config("llama2/7b", ["trainer.devices=1", "model.loss_chunk_size=512",
                                                     "model.activations_checkpoint_granularity=full"]))
    assert set_.layout.loss_chunk_size == 512 and set_.logits(1) < full.logits(1)
    assert "512 tokens a chunk (model.loss_chunk_size: 512)" in set_.render()


def test_tensor_parallel_loss_is_whole():
    cfg = load_config("llama2/7b", ["trainer.devices=8"])
    cfg.model.tensor_model_parallel_size = 2
    est = estimate_memory(cfg, vocab_size=LLAMA3_VOCAB)  # vocabulary-sharded loss: no chunks
    assert est.layout.loss_chunk_size == 0
    assert est.logits(1) == 12 * est.vocab_size * est.layout.seq_length // 2


def test_max_micro_batch_with_a_chunked_loss():
    """The logits term does not grow with the micro batch: the largest micro batch is searched, not divided."""
    cfg = load_config("llama2/7b", ["trainer.devices=8", "model.fsdp=true",
                                    "model.activations_checkpoint_granularity=full"])
    est = estimate_memory(cfg, vocab_size=LLAMA3_VOCAB, gpu_memory_bytes=80 * GiB)
    assert est.layout.loss_chunk_size == 2048 and est.max_micro_batch is not None
    m = est.max_micro_batch
    assert est.total(m) <= 0.8 * 80 * GiB < est.total(m + 1)


@pytest.mark.parametrize("vocab,chunk,checkpointing,mbs,where", [
    (512, None, True, 1, "the first block's backward"),  # the later gradients, one block recomputed
    (512, 0, False, 1, "the last block's backward"),  # every kept activation and the head's gradients
    (512, 0, False, 4, "the loss's backward"),  # every token's logits and their gradients
    (65536, None, False, 1, "the loss's forward"),  # one chunk's logits and the head-weight accumulator
])
def test_estimate_follows_the_step_on_fake_tensors(loss_check, vocab, chunk, checkpointing, mbs, where):
    """Between GPU runs: the step run on fake CPU tensors (no memory, no arithmetic) under torch's MemTracker, a
    3-block Llama-3 shape at hidden 256 and sequence 256: each moment of the estimate's step, where it says the
    peak is, within 15% of the tracked peak."""
    cfg = loss_check.case_config("llama3/8b", 3, 256, mbs, chunk, checkpointing, 256)
    est = estimate_memory(cfg, vocab_size=vocab)
    args = argparse.Namespace(vocab=vocab, seq=256, checkpointing=checkpointing)
    simulated = loss_check.simulated_peak(cfg, args, est.layout.loss_chunk_size, mbs)
    assert est.peak(mbs).name == where
    assert abs(est.step(mbs) - simulated) <= 0.15 * simulated, (est.peak(mbs), simulated)
