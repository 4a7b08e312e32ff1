"""The quickstart with tiny settings: every artefact it promises, and a model that learned."""

from __future__ import annotations

import json

from lmforge.quickstart import run


def test_quickstart_tiny(tmp_path):
    summary = run(out=tmp_path, size="tiny", max_steps=150, device="cpu")
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("val_loss_before", "val_loss_after", "val_ppl_before", "val_ppl_after", "tokens_trained",
                "seconds", "sample"):
        assert key in saved, key
    assert saved == json.loads(json.dumps(summary))
    # perplexity falls several-fold even in 150 tiny steps (from about the vocabulary size)
    assert saved["val_ppl_after"] * 3 < saved["val_ppl_before"]
    assert saved["tokens_trained"] == 150 * 16 * 64
    assert saved["sample"].startswith("import os")
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / "data" / "stdlib_text_document.idx").exists()
