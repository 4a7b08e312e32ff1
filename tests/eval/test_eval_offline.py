"""Without a network, evaluating a Hub task and prefetching end at once in one line that says what to run
where: the Hub is found unreachable up front (offline variables, or no connection to HF_ENDPOINT), before any
model loads and before the datasets library's retries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.eval.data import HubUnreachableError, check_hub_access
from lmforge.eval.tasks import get_task

SRC = str(Path(__file__).resolve().parents[2] / "src")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
NO_NETWORK = {"offline variable": {"HF_DATASETS_OFFLINE": "1"},
              "unreachable endpoint": {"HF_ENDPOINT": "http://127.0.0.1:9"}}


def lmforge(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS + PROXY_VARS and k != "HF_ENDPOINT"}
    base["PYTHONPATH"] = SRC + os.pathsep + base.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "lmforge", *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("how", sorted(NO_NETWORK))
def test_evaluate_and_prefetch_without_network_end_in_one_line(tmp_path, how):
    cache = tmp_path / "cache"
    # MODEL does not exist: the Hub check comes first, so no model is ever read
    p = lmforge(["evaluate", "no_such_model", "--tasks", "hellaswag", "--cache", str(cache)], NO_NETWORK[how],
                tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task hellaswag needs Rowan/hellaswag from the Hugging "
                                                   "Face Hub, which cannot be reached here (")
    assert f"on a machine with a network run `lmforge prefetch --tasks hellaswag --cache {cache}`" in lines[0]
    # an lm-evaluation-harness name beside it: no wait for lm_eval's task index, and the prefetch command names both
    p = lmforge(["evaluate", "no_such_model", "--tasks", "hellaswag,arc_easy", "--cache", str(cache)],
                NO_NETWORK[how], tmp_path)
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: task hellaswag needs Rowan/hellaswag")
    assert f"run `lmforge prefetch --tasks hellaswag,arc_easy --cache {cache}`" in lines[0]

    p = lmforge(["prefetch", "--tasks", "hellaswag,piqa", "--cache", str(cache)], NO_NETWORK[how], tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prefetch downloads from the Hugging Face Hub, which "
                                                   "cannot be reached here (")
    assert f"run `lmforge prefetch --tasks hellaswag,piqa --cache {cache}` on a machine with a network" in lines[0]
    assert not cache.exists()


def test_local_prefetched_or_cached_data_needs_no_hub(tmp_path, monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = [get_task("hellaswag"), get_task("piqa")]
    with pytest.raises(HubUnreachableError, match=r"^tasks hellaswag,piqa need Rowan/hellaswag, baber/piqa "):
        check_hub_access(tasks, {}, tmp_path)
    (tmp_path / "tasks" / "hellaswag").mkdir(parents=True)  # what `lmforge prefetch` writes
    with pytest.raises(HubUnreachableError, match=r"^task piqa needs baber/piqa "):
        check_hub_access(tasks, {}, tmp_path)
    check_hub_access(tasks, {"piqa": "piqa.jsonl"}, tmp_path)  # --task-data
    (tmp_path / "hub" / "baber___piqa").mkdir(parents=True)  # the datasets library's own cache of an online run
    check_hub_access(tasks, {}, tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # datasets reads this before HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubUnreachableError, match=r"no connection to http://127.0.0.1:9 within 1 s"):
        check_hub_access([get_task("winogrande")], {}, tmp_path)
