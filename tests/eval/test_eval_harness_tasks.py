"""`lmforge evaluate` runs any lm-evaluation-harness task through lm_eval and the `lmforge` model adapter, next to
the built-in fast path, in one results document: here a task of lm_eval's own YAML format in a folder given as
--include_path, over a JSONL file this test writes (no network). Unknown names get the closest known ones; a
harness task whose dataset is on an unreachable Hub fails at once with the prefetch command."""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.eval import harness, run
from lmforge.eval.data import HubUnreachableError, prefetch, resolve_tasks
from lmforge.errors import UserError
from lmforge.eval.tasks import UnknownTaskError
from tests.eval.conftest import sentence, tiny_checkpoint, write_piqa

DOC = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"
HARNESS_YAML = """task: {name}
dataset_path: {path}
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""

OUR_YAML = """name: my_qa_fast_path
kind: multiple_choice
data: qa.jsonl
context: "Question: {question}\\nAnswer:"
choices: choices
answer: label
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness_tasks")
    ckpt = tiny_checkpoint(root, "ckpt")[0]
    rng = random.Random(3)
    records = [{"question": sentence(rng, rng.randint(3, 9)),
                "choices": [sentence(rng, rng.randint(1, 4)) for _ in range(3)], "label": i % 3} for i in range(8)]
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tasks / "my_qa.yaml").write_text(HARNESS_YAML.format(name="my_qa", path="json", data=tasks / "qa.jsonl"))
    (tasks / "ours.yaml").write_text(OUR_YAML)  # the docs' my_qa task for lmforge's own scorer
    hub = root / "hub_tasks"
    hub.mkdir()  # a task whose dataset lives on the Hub
    (hub / "hub_qa.yaml").write_text(HARNESS_YAML.format(name="hub_qa", path="lmforge-test/no-such-dataset",
                                                         data="qa.jsonl"))
    return root, ckpt, tasks, hub


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def only_included(monkeypatch):
    """lm_eval's index of the --include-path folder alone (its own ~15k task files take long to index)."""
    monkeypatch.setattr(harness, "_manager_for", lambda names, include_path: harness._task_manager(include_path, False))


def doc_section() -> str:
    return DOC.read_text(encoding="utf-8").split("## Any lm-evaluation-harness task", 1)[1].split("\n## ", 1)[0]


def test_the_docs_example_runs_a_harness_task_beside_a_built_in_one(setup, offline, tmp_path, monkeypatch, capsys):
    """docs/evaluation.md's command, verbatim, in a folder with CKPT/, the page's my_tasks/my_qa.yaml and data."""
    root, ckpt, tasks, _ = setup
    (yaml_text,) = re.findall(r"```yaml\n# my_tasks/my_qa.yaml\n(.*?)```", doc_section(), flags=re.S)
    (command,) = re.findall(r"```bash\n(.*?)\n```", doc_section(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ckpt, tmp_path / "CKPT")
    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "my_qa.yaml").write_text(yaml_text)
    shutil.copy(tasks / "qa.jsonl", tmp_path / "my_tasks" / "qa.jsonl")
    rng = random.Random(5)
    write_piqa(tmp_path / "piqa.jsonl", rng, 4)
    assert main(shlex.split(command)[1:]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert list(doc["results"]) == ["piqa", "my_qa"] and doc["config"]["include_path"] == "my_tasks"
    assert doc["config"]["n_samples"] == {"piqa": 4, "my_qa": 8}
    theirs = doc["results"]["my_qa"]
    assert set(theirs) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    shown = capsys.readouterr().out
    assert "my_qa" in shown and "piqa" in shown  # one results table

    # lm_eval's requests scored through lmforge's adapter == the same task on lmforge's own fast path
    ours = run(str(ckpt), [str(tasks / "ours.yaml")], device="cpu", progress=False)["results"]["my_qa_fast_path"]
    for metric in ("acc", "acc_norm", "acc_stderr"):
        assert theirs[metric] == pytest.approx(ours[metric], abs=1e-9)


def test_unknown_names_get_the_closest_known_ones(setup, monkeypatch):
    _, _, tasks, _ = setup
    only_included(monkeypatch)
    with pytest.raises(UnknownTaskError, match=r"unknown task 'my_qaa'.*did you mean my_qa\?"):
        resolve_tasks(["my_qaa"], include_path=str(tasks))
    with pytest.raises(UnknownTaskError, match=r"unknown task 'hellaswg'.*did you mean hellaswag"):
        resolve_tasks(["hellaswg"], include_path=str(tasks))
    with pytest.raises(UserError, match=r"--task-data my_qa=.*lm-evaluation-harness task"):
        resolve_tasks(["my_qa"], {"my_qa": "x.jsonl"}, include_path=str(tasks))
    assert resolve_tasks(["piqa", "my_qa"], include_path=str(tasks))[2] == ["my_qa"]


@pytest.mark.parametrize("env", [{"HF_DATASETS_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_a_harness_task_on_an_unreachable_hub_fails_at_once(setup, monkeypatch, tmp_path, env):
    _, _, _, hub = setup
    only_included(monkeypatch)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "https_proxy", "HTTPS_PROXY", "http_proxy",
                "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(HubUnreachableError) as e:
        harness.load_harness_tasks(["hub_qa"], str(hub), str(tmp_path / "cache"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("task hub_qa (lm-evaluation-harness) could not read its dataset")
    assert "OfflineModeIsEnabled" in message  # the datasets library ran offline: no retries against the endpoint
    assert f"run `lmforge prefetch --tasks hub_qa --include-path {hub} --cache {tmp_path / 'cache'}`" in message

    with pytest.raises(HubUnreachableError, match=r"^prefetch downloads from the Hugging Face Hub, which cannot be "
                                                  r"reached here .*: run `lmforge prefetch --tasks hub_qa "
                                                  rf"--include-path {hub} --cache {tmp_path / 'cache'}` on a machine"):
        prefetch(["hub_qa"], cache_dir=tmp_path / "cache", include_path=str(hub))
    assert not (tmp_path / "cache").exists()
