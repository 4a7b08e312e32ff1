"""The quickstart with tiny settings: every artefact it promises, and a model that learned within its time budget."""

from __future__ import annotations

import json

import pytest

from lmforge import quickstart
from lmforge.config.schema import max_time_seconds
from lmforge.quickstart import MIN_STEPS, SIZES, plan_steps, run


def test_quickstart_tiny_within_a_time_budget(tmp_path):
    """A 60 s budget: the steps are sized from the measured speed (and a deadline stops training after saving),
    and perplexity still falls."""
    summary = run(out=tmp_path, size="tiny", device="cpu", time_budget=60)
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("val_loss_before", "val_loss_after", "val_ppl_before", "val_ppl_after", "tokens_trained",
                "seconds", "sample", "steps", "planned_steps", "time_budget", "time_limit_reached"):
        assert key in saved, key
    assert saved == json.loads(json.dumps(summary))
    assert saved["time_budget"] == 60
    assert MIN_STEPS <= saved["planned_steps"] <= SIZES["tiny"].steps
    # all planned steps ran, or the deadline stopped the run where it saved
    assert saved["steps"] == saved["planned_steps"] or (saved["time_limit_reached"] and saved["steps"] < saved["planned_steps"])
    assert saved["checkpoint"].endswith(f"step_{saved['steps']:07d}")
    # perplexity falls well below its start (about the vocabulary size) even in a few dozen tiny steps
    assert saved["val_ppl_after"] * 2 < saved["val_ppl_before"]
    assert saved["tokens_trained"] == saved["steps"] * 16 * 64
    assert saved["sample"].startswith("import os")
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / "data" / "stdlib_text_document.idx").exists()


def test_plan_steps_fits_the_time_left():
    # 100 s left at 0.5 s/step, 20% kept for validation and saving: 160 steps, capped by the size's own count
    assert plan_steps(400, 100.0, 0.5) == 160
    assert plan_steps(150, 100.0, 0.5) == 150
    assert plan_steps(400, 1.0, 0.5) == MIN_STEPS  # a very slow machine still trains enough to learn
    assert plan_steps(400, -5.0, 0.5) == MIN_STEPS


def test_max_steps_fixes_the_count_and_the_budget_becomes_the_deadline(tmp_path, monkeypatch):
    """--max-steps is not resized and nothing is measured; the time budget still gives trainer.max_time."""
    seen = {}

    def fake_pretrain(cfg, console_log=print):
        seen["max_steps"], seen["max_time"] = cfg.trainer.max_steps, cfg.trainer.max_time
        raise RuntimeError("stop here")

    monkeypatch.setattr("lmforge.train.pretrain.run", fake_pretrain)
    monkeypatch.setattr(quickstart, "measure_step_seconds", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(RuntimeError, match="stop here"):
        run(out=tmp_path, size="tiny", device="cpu", max_steps=7, max_bytes=50_000, time_budget=3600)
    assert seen["max_steps"] == 7
    # the hour less the data steps and the reserve for what follows training
    assert 0 < max_time_seconds(seen["max_time"]) <= 3600 - quickstart.RESERVE_S
