"""Parallelism applied to a plain model from outside: data parallel now, TP/PP/FSDP2 later."""
