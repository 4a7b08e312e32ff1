"""Host time of the serving engine's per-token text bookkeeping (detokenization, stop strings, outputs).

No model runs: 32 sequences each receive N random tokens through the engine's output processor
(``OutputProcessor.append`` and ``output``: what every decode step does per sequence), with a byte-level BPE tokenizer of 2,000 tokens
trained on the standard library, and a stop string set (so the stop check runs too). Prints the host
milliseconds per step of 32 sequences; run by hand, on any CPU.

    python benchmarks/engine_host_overhead.py
"""
import difflib
import inspect
import random
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from lmforge.data.tokenizers import train_bpe
from lmforge.serve.output import OutputProcessor
from lmforge.serve.request import SamplingParams, Sequence

root = Path(tempfile.mkdtemp())
(root / "c.txt").write_text(inspect.getsource(textwrap) + inspect.getsource(difflib))
tok = train_bpe([root / "c.txt"], 2000, root / "tok")
out = OutputProcessor(tok, None, 10**6)
rng = random.Random(0)
for n in (256, 1024, 2048):
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=n, temperature=0.0, stop=["\n\n\n\n"]), torch.device("cpu"), n) for i in range(32)]
    t = time.perf_counter()
    for step in range(n):
        for s in seqs:
            out.append(s, rng.randrange(5, tok.vocab_size))
            out.output(s)
    dt = time.perf_counter() - t
    print(f"{n} tokens x 32 seqs: {1000*dt/n:.3f} ms per step (append + output)")
