"""Tensor-parallel serving (lmforge.serve.tensor_parallel): `generate` and `serve` with --tensor-parallel-size 2 on
two CPU gloo ranks that the command starts itself, against one process."""

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.serve.engine import SamplingParams, engine_from_checkpoint
from tests.conftest import free_port
from tests.serve.test_serve_server import make_checkpoint

ROOT = Path(__file__).parents[2]
# prompts of 1 to ~40 tokens: within one KV block of 16 positions or over several; 64 new tokens cross more
PROMPTS = ["x", "def wrap(text, width=70", "import re\nclass Sequence:\n    def __init__(self, a, b):\n        return",
           "# comment", "    return self.value + other.value  # the sum of both values, as before"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT), OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1")


def _doc_commands() -> tuple[str, str]:
    """docs/serving.md, "Tensor parallelism": its generate and serve commands."""
    doc = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    section = doc.split("## Tensor parallelism", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    generate_cmd, serve_cmd = block.strip().splitlines()
    return generate_cmd, serve_cmd


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tp"), chat_template=False)


@pytest.fixture
def workdir(ckpt, tmp_path, monkeypatch):
    """A working folder holding CKPT, as the docs' commands name it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "CKPT").symlink_to(ckpt)
    return tmp_path


def _lines(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_generate_tp2_equals_one_process_greedy_and_seeded(workdir):
    """The docs' generate command, run verbatim: the command starts its two ranks itself (spawned processes);
    greedy lines and seeded sampled lines in one batch give one process's completions."""
    rows = [{"id": f"g{i}", "prompt": p, "temperature": 0} for i, p in enumerate(PROMPTS)]
    rows += [{"id": f"s{i}", "prompt": p, "temperature": 1.0, "top_k": 50, "seed": 7 + i}
             for i, p in enumerate(PROMPTS[1:3])]
    rows.append({"id": "r", "prompt": PROMPTS[2], "temperature": 1.0})  # no seed: rank 0 draws one for every rank
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate_cmd, _ = _doc_commands()
    assert " --tensor-parallel-size 2" in generate_cmd
    one_cmd = generate_cmd.replace(" --tensor-parallel-size 2", "").replace("out.jsonl", "one.jsonl")
    assert main(shlex.split(one_cmd)[1:]) == 0
    assert main(shlex.split(generate_cmd)[1:]) == 0
    one, tp = _lines(workdir / "one.jsonl"), _lines(workdir / "out.jsonl")
    assert set(one) == set(tp) == {r["id"] for r in rows}
    for rid in set(one) - {"r"}:
        assert tp[rid]["completion"] == one[rid]["completion"], rid
        assert tp[rid]["completion_tokens"] == one[rid]["completion_tokens"], rid
    assert max(r["completion_tokens"] for r in one.values()) > 16  # decoding went past a KV block
    assert one["s0"]["completion"] != one["g1"]["completion"]  # the sampled lines did sample


def test_serve_tp2_answers_completions_like_one_process(workdir, ckpt):
    """The docs' serve command (on a free port) answers /v1/completions as one process would: requests that
    arrive while others run, one streamed request cut short (an abort the ranks must share), then one more; and it
    stops on SIGTERM with exit code 0 (rank 0 finishes, then tells rank 1 to stop)."""
    from concurrent.futures import ThreadPoolExecutor

    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=2)
    expected = {p: engine.tokenizer.decode(engine.generate([engine.tokenizer.encode(p)],
                                                           SamplingParams(max_tokens=10, temperature=0))[0],
                                           skip_special_tokens=True) for p in PROMPTS[:4]}
    _, serve_cmd = _doc_commands()
    port = free_port()
    assert "--port 8000" in serve_cmd
    args = shlex.split(serve_cmd.replace("--port 8000", f"--port {port}"))[1:]
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def post(prompt: str, max_tokens: int = 10, stream: bool = False):
        body = json.dumps({"model": "ckpt", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "stream": stream}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        response = urllib.request.urlopen(request, timeout=60)
        return response if stream else json.loads(response.read())

    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None and time.time() < deadline, "the server did not start"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        with ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(post, p) for p in PROMPTS[:3]]
            cut = post(PROMPTS[4], max_tokens=60, stream=True)
            assert cut.readline().startswith(b"data: ")
            cut.close()  # the client goes away: the request is aborted on every rank
            answers = [a.result() for a in answers]
        answers.append(post(PROMPTS[3]))
        for prompt, answer in zip(PROMPTS[:4], answers):
            assert answer["choices"][0]["text"] == expected[prompt], prompt
            assert answer["usage"]["completion_tokens"] == 10
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        assert code == 0, server.stdout.read()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.parametrize("extra, message", [
    (["-tp", "3"], "--tensor-parallel-size 3 does not divide the model's 4 attention heads; use a size that "
                   "divides its 4 attention heads, 2 key/value heads and ffn_hidden_size 64: 1, 2"),
    (["-tp", "2", "--compile"], "--compile is not supported with --tensor-parallel-size yet"),
    (["-tp", "2", "--lora", "a=b"], "--lora is not supported with --tensor-parallel-size yet"),
    (["-tp", "0"], "--tensor-parallel-size must be >= 1, got 0"),
    (["-tp", "2", "--device", "cuda:1"], "--device cuda:1 with --tensor-parallel-size 2: rank r runs on cuda:r"),
])
def test_refusals_are_one_line(ckpt, tmp_path, capsys, extra, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    assert main(["generate", str(ckpt), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_under_torchrun_it_is_refused(ckpt, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process it starts
    assert main(["serve", str(ckpt), "-tp", "2", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("error: --tensor-parallel-size 2 starts its own 2 processes; run the command "
                                       "once, not under torchrun\n")


def test_a_rank_that_cannot_load_the_model_gives_one_error_line(ckpt, tmp_path, capfd):
    """An error the ranks meet (a damaged weights file passes the checks before they start) is one `error:` line,
    however many ranks met it, and exit code 2."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["generate", str(bad), "--prompt", "x", "--device", "cpu", "-tp", "2"]) == 2
    out, err = capfd.readouterr()
    assert err.startswith(f"error: checkpoint file {weights} is damaged") and len(err.strip().splitlines()) == 1, err


def test_adapters_not_merged_into_the_weights_are_refused_before_the_ranks_start(ckpt, tmp_path, capsys):
    adapter = tmp_path / "prompt_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LMFORGE_PTUNING"}))
    assert main(["generate", str(ckpt), "--prompt", "x", "--device", "cpu", "-tp", "2", "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {adapter}: p-tuning adapters are not supported with --tensor-parallel-size yet (LoRA/DoRA "
                   f"and IA3 are: they are merged before the split); serve it on one GPU\n")


def test_a_rank_that_disagrees_with_rank_0_stops_with_an_error(monkeypatch):
    """The lockstep guard: a follower whose state after a step differs from rank 0's (the digest rank 0 sends
    with the next step) raises instead of going on with other requests."""
    import torch

    from lmforge.models import ModelConfig, Transformer
    from lmforge.serve import tensor_parallel as tp
    from lmforge.serve.engine import Engine

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2, ffn_hidden_size=64,
                      max_position_embeddings=32, position_embedding_type="rope", normalization="rmsnorm",
                      activation="swiglu", bias=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    follower = tp.LockstepEngine(Engine(model, max_batch_size=2, log=lambda m: None), control=None, rank=1)
    params = dataclasses.asdict(SamplingParams(max_tokens=4, temperature=0))
    messages = iter([{"ops": [["add", "a", [1, 2, 3], params, None]], "digest": None, "step": 0},
                     {"ops": [], "digest": "not this rank's", "step": 1}])
    monkeypatch.setattr(tp, "_receive", lambda group: next(messages))
    with pytest.raises(RuntimeError, match="rank 1 disagrees with rank 0 after engine step 1"):
        follower.follow()
    assert follower.engine.running[0].num_generated == 1  # it had run the first step
    # rank 0's last word checks the last step too, unless rank 0 stops after a failed step (no digest then)
    monkeypatch.setattr(tp, "_receive", lambda group: {"stop": True, "step": 1, "digest": "not this rank's"})
    with pytest.raises(RuntimeError, match="after engine step 1"):
        follower.follow()
    monkeypatch.setattr(tp, "_receive", lambda group: {"stop": True, "step": 1})
    assert follower.follow() is None
