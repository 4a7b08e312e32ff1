"""``lmforge --help`` / ``--version`` and every command's ``--help`` stay fast: building the parser imports no
torch, numpy, transformers or other heavy library (those load inside the command that needs them).

A test on what is imported, not on time: a fresh interpreter builds the parser, asks every command for its help,
and reports ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "numpy", "transformers", "safetensors", "tokenizers", "matplotlib", "tensorboard", "datasets",
         "lm_eval", "fastapi", "uvicorn", "rich", "triton", "sentencepiece", "tiktoken", "peft", "scipy", "pandas")

PROBE = r"""
import contextlib, io, json, sys
import lmforge.cli as cli

parser = cli.build_parser()
sub = next(a for a in parser._actions if a.dest == "command")
helped = []
for argv in [["--help"], ["--version"], *[[name, "--help"] for name in sub.choices]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert out.getvalue().strip(), argv
    helped.append(argv[0])
print(json.dumps({"helped": helped, "modules": sorted(sys.modules)}))
"""


def test_help_and_version_import_no_heavy_library():
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"finetune", "pretrain", "serve", "evaluate", "convert", "launch", "data"} <= set(report["helped"])
    loaded = {m.split(".")[0] for m in report["modules"]}
    assert not loaded & set(HEAVY), f"building the parser imported {sorted(loaded & set(HEAVY))}"


def test_lazy_package_names_still_resolve():
    """The packages made lazy still give their API on first use, and an unknown name is an AttributeError."""
    import pytest

    import lmforge.convert
    import lmforge.eval
    import lmforge.finetune
    import lmforge.models
    import lmforge.serve
    from lmforge.eval.evaluate import run as eval_run
    from lmforge.finetune.stage import run as finetune_run

    assert lmforge.finetune.run is finetune_run and lmforge.eval.run is eval_run
    assert lmforge.models.Transformer.__module__ == "lmforge.models.transformer"
    assert lmforge.serve.Engine.__module__ == "lmforge.serve.engine"
    assert callable(lmforge.convert.convert) and "convert" in dir(lmforge.convert)
    with pytest.raises(AttributeError):
        lmforge.finetune.no_such_name  # noqa: B018


META_PROBE = r"""
import json, sys
import torch
from lmforge.convert.plan import expected_shapes
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer, fuse_projections

cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=64, max_position_embeddings=32, normalization="rmsnorm", activation="swiglu",
                  position_embedding_type="rope")
shapes = expected_shapes(cfg)
fused = fuse_projections(Transformer(cfg).eval())  # its joint linears are built on meta, then filled
from lmforge.models.meta import meta_device, to_empty
from lmforge.serve.engine import Engine, SamplingParams  # generate / serve / evaluate's engine, eager

with meta_device():  # as lmforge.open.load_for_inference builds the model it reads a checkpoint into
    model = Transformer(cfg)
model = to_empty(model.to(torch.bfloat16), "cpu")
model.init_weights()
engine = Engine(model.eval(), max_batch_size=2, max_seq_len=16, block_size=4, num_kv_blocks=8)
out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
print(json.dumps({"tensors": len(shapes), "fused": fused, "generated": len(out[0]),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                  "dynamo": "torch._dynamo" in sys.modules, "sympy": "sympy" in sys.modules}))
"""


def test_planning_a_model_on_meta_imports_no_dynamo():
    """convert/evaluate/generate/serve plan their model on the meta device; the initializers that build would run
    there (``nn.init.normal_`` ... : torch's Python references on meta) imported torch._dynamo, ~1.5 s at every
    start. ``lmforge.models.meta.meta_device`` skips them on meta tensors, ``meta.to_empty`` allocates without
    ``empty_like`` of meta tensors (another reference: sympy's shape machinery), and the eager serving engine imports
    no dynamo either (only its compiled paths need it)."""
    p = subprocess.run([sys.executable, "-c", META_PROBE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["tensors"] > 10 and report["fused"] == 4 and report["generated"] == 2
    assert report["dtypes"] == ["torch.bfloat16"]
    assert report["dynamo"] is False and report["sympy"] is False  # to_empty: torch.empty, not empty_like on meta


def test_meta_device_builds_what_torch_device_meta_builds():
    """Same parameter names, shapes, dtypes and meta placement; tensors that are not meta are still initialised."""
    import torch
    from torch import nn

    from lmforge.models.config import ModelConfig
    from lmforge.models.meta import meta_device
    from lmforge.models.transformer import Transformer

    for position in ("learned_absolute", "rope"):  # rope: the rotary tables are meta placeholders too
        cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                          max_position_embeddings=32, position_embedding_type=position)
        with torch.device("meta"):
            plain = Transformer(cfg)
        with meta_device():
            skipped = Transformer(cfg)
            real = torch.empty(3, device="cpu")
            nn.init.ones_(real)
            real.normal_(mean=5.0, std=0.0)

        def describe(m):
            return [(n, t.shape, t.dtype, t.device.type) for n, t in [*m.named_parameters(), *m.named_buffers()]]

        assert describe(plain) == describe(skipped) and {d for *_, d in describe(skipped)} == {"meta"}
        assert len(describe(skipped)) == len(describe(plain)) > 10
        assert torch.equal(real, torch.full((3,), 5.0))
    # materialised from the placeholders, the rotary tables are the computed ones
    built = skipped.to_empty(device="cpu")
    built.init_weights()
    assert torch.equal(built.rope_cos, Transformer(cfg).rope_cos)
