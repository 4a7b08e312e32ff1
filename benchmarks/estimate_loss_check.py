"""Check ``lmforge config --estimate``'s step peak, the loss whole or chunked, against the measured peak on one
GPU (run by hand; never by the test suite; tests/config/test_estimate.py checks the estimate against the records
kept in benchmarks/results).

A few blocks of a recipe's shape (default: Llama-3-8B, 2 layers) with a given vocabulary are trained for one
forward + backward under bf16 autocast, no FSDP, through lmforge's own ``CausalLMLoss`` with the chunk size the
estimate resolved (``resolve_loss_chunk_size``, as training does), the backward outside autocast as in the training
loop. Measured: ``torch.cuda.max_memory_allocated`` during the step, minus what was allocated before it (the fp32
weights and the tokens; no gradients yet, as after ``zero_grad(set_to_none=True)``). Estimated: the same step's
peak (``MemoryEstimate.step``) for a config of one micro batch a step (``model.global_batch_size`` = the micro
batch): the gradients, compute copy and activations held at the moment the estimate finds largest (the loss's
forward, its backward, the last or the first block's backward, the end of backward). Printed per case: both, in
GiB, where the peak is and the estimate's loss layout; records appended to ``$OUT/estimate_loss_check.json``.

    python benchmarks/estimate_loss_check.py                              # 128k vocabulary: auto chunk vs 0
    python benchmarks/estimate_loss_check.py --vocab 32000 --checkpointing  # checkpointing chunks 32k
    python benchmarks/estimate_loss_check.py --device cpu --layers 1 --seq 256 --hidden 64   # smoke run, no peak
    python benchmarks/estimate_loss_check.py --simulate --vocab 32000 --checkpointing --layers 6   # no GPU: fake tensors
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lmforge.config import load_config, model_config_from
from lmforge.config.estimate import GiB, estimate_memory
from lmforge.models.transformer import Transformer
from lmforge.train.objectives import CausalLMLoss


def case_config(recipe: str, layers: int, seq: int, mbs: int, chunk_setting, checkpointing: bool, hidden: int = 0):
    """The config of one case: the recipe cut to ``layers`` blocks at sequence ``seq``, one GPU, one micro batch of
    ``mbs`` a step (so no gradients before its backward), the loss chunked as ``chunk_setting`` says (None: the
    automatic rule), full checkpointing one block a chunk when ``checkpointing``. The test suite rebuilds the
    recorded cases with it."""
    overrides = ["trainer.devices=1", f"model.num_layers={layers}", f"model.encoder_seq_length={seq}",
                 f"model.max_position_embeddings={max(seq, 8192)}", f"model.micro_batch_size={mbs}",
                 f"model.global_batch_size={mbs}"]
    if hidden:
        overrides += [f"model.hidden_size={hidden}", f"model.ffn_hidden_size={4 * hidden}",
                      "model.num_attention_heads=4", "model.num_query_groups=2"]
    if chunk_setting is not None:
        overrides.append(f"model.loss_chunk_size={chunk_setting}")
    if checkpointing:
        overrides.append("model.activations_checkpoint_granularity=full")
    return load_config(recipe, overrides)


def _step(cfg, args, chunk: int, mbs: int, device: torch.device):
    """The case's model (checkpointed when asked), its CausalLMLoss and a micro batch of random tokens."""
    model = Transformer(model_config_from(cfg, args.vocab))
    if device.type != "cpu":  # (fake tensors cannot be moved)
        model = model.to(device)
    if args.checkpointing:
        from lmforge.parallel.transforms import apply_activation_checkpointing

        apply_activation_checkpointing(model, granularity="full", method="uniform", num_layers=1)
    objective = CausalLMLoss(model, loss_chunk_size=chunk)
    tokens = torch.randint(0, args.vocab, (mbs, args.seq + 1), device=device)
    return model, objective, tokens


def _run(objective, tokens, device_type: str) -> None:
    """One forward (under bf16 autocast) + backward (outside it), as the training loop runs a micro batch."""
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss, n = objective(tokens)
    (loss / n).backward()


def simulated_peak(cfg, args, chunk: int, mbs: int) -> int:
    """The step's peak bytes over what was allocated before it, on fake CPU tensors (no memory, no arithmetic),
    tracked by torch's MemTracker: a CPU-side cross-check of the estimate's arithmetic, not a measurement (CPU
    autocast and kernels; no allocator rounding). On session 11's cases it came within 0.07 GiB of the H100's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    cpu = torch.device("cpu")
    with FakeTensorMode():
        model, objective, tokens = _step(cfg, args, chunk, mbs, cpu)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            before = tracker.get_tracker_snapshot("current")[cpu]["Total"]
            _run(objective, tokens, "cpu")
            return tracker.get_tracker_snapshot("peak")[cpu]["Total"] - before


def one_case(args, chunk_setting, mbs: int) -> dict:
    cfg = case_config(args.recipe, args.layers, args.seq, mbs, chunk_setting, args.checkpointing, args.hidden)
    est = estimate_memory(cfg, vocab_size=args.vocab)
    chunk = est.layout.loss_chunk_size
    measured = simulated = None
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.simulate:
        simulated = simulated_peak(cfg, args, chunk, mbs)
    else:
        model, objective, tokens = _step(cfg, args, chunk, mbs, device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        _run(objective, tokens, device.type)
        measured = (torch.cuda.max_memory_allocated() - before) if cuda else None
        del model, objective, tokens
        if cuda:
            torch.cuda.empty_cache()
    peak = est.peak(mbs)
    return dict(recipe=args.recipe, layers=args.layers, seq=args.seq, hidden=args.hidden, vocab=args.vocab,
                micro_batch_size=mbs, checkpointing=args.checkpointing, loss=est.layout.describe_loss(),
                loss_chunk_size=chunk, logits_gib=est.logits(mbs) / GiB,
                estimated_gib=peak.total / GiB, estimated_at=peak.name, estimated_gradients_gib=peak.gradients / GiB,
                estimated_compute_copy_gib=peak.compute_copy / GiB, estimated_activations_gib=peak.activations / GiB,
                measured_gib=None if measured is None else measured / GiB,
                simulated_gib=None if simulated is None else simulated / GiB,
                device="fake (simulated)" if args.simulate else (torch.cuda.get_device_name() if cuda else "cpu"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="llama3/8b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=0, help="a smaller hidden size (smoke runs); 0: the recipe's")
    p.add_argument("--mbs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunks", nargs="+", default=["auto", "0"], help="model.loss_chunk_size values; auto: null")
    p.add_argument("--checkpointing", action="store_true", help="full activation checkpointing, one block a chunk")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--simulate", action="store_true",
                   help="no GPU: the peak of the step on fake CPU tensors (torch's MemTracker), not a measurement")
    args = p.parse_args()
    records = []
    for chunk in args.chunks:
        for mbs in args.mbs:
            rec = one_case(args, None if chunk == "auto" else int(chunk), mbs)
            records.append(rec)
            measured = "n/a" if rec["measured_gib"] is None else f"{rec['measured_gib']:.2f}"
            if rec["simulated_gib"] is not None:
                measured = f"n/a, simulated {rec['simulated_gib']:.2f}"
            print(f"mbs {mbs}  {rec['loss']}: logits {rec['logits_gib']:.2f} GiB; estimated "
                  f"{rec['estimated_gib']:.2f} GiB at {rec['estimated_at']} (gradients "
                  f"{rec['estimated_gradients_gib']:.2f} + compute copy {rec['estimated_compute_copy_gib']:.2f} + "
                  f"activations {rec['estimated_activations_gib']:.2f}), measured {measured} GiB", flush=True)
    out = Path(os.environ.get("OUT", ".")) / "estimate_loss_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + records, indent=1))


if __name__ == "__main__":
    main()
