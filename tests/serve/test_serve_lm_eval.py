"""lm-evaluation-harness scoring a model through lmforge's server (its ``local-completions`` model: echo +
logprobs over the OpenAI completions API) gives the numbers it gives on the same model loaded with
transformers, for the loglikelihood tasks (multiple choice, LAMBADA's greedy check, rolling perplexity)."""

from tests.eval.test_eval_harness_parity import HARNESS, MAX_POS, assert_same, setup, task_manager  # noqa: F401
from tests.serve.test_serve_server import running_server


def test_lm_eval_local_completions_through_the_server(setup, monkeypatch, tmp_path):  # noqa: F811
    from lm_eval import simple_evaluate

    hf_dir, ckpt, data, yaml_dir = setup
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DISABLE_MULTIPROC"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    tasks = list(HARNESS)
    task_names = [f"lmf_{t}" for t in tasks]
    # The API model keeps one position for the token it asks for and scores windows one token shorter than
    # the hf model's, so hf with max_length L truncates exactly as the API model with L + 2 (the server's context).
    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32",
                                                     "max_length": MAX_POS - 2},
                             tasks=task_names, task_manager=task_manager(yaml_dir), batch_size=3,
                             device="cpu", bootstrap_iters=1000, log_samples=False)["results"]
    with running_server(ckpt, max_batch_size=8) as (url, engine):
        out = simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{url}/completions", "model": "tiny", "tokenizer": str(hf_dir),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": MAX_POS,
                        "num_concurrent": 4, "max_retries": 1},
            tasks=task_names, task_manager=task_manager(yaml_dir),
            batch_size=4, bootstrap_iters=1000, log_samples=False)
    ours = {t: {k.split(",")[0]: (None if v == "N/A" else v) for k, v in out["results"][f"lmf_{t}"].items()
                if k.endswith(",none")} for t in tasks}
    assert_same(theirs, ours, tasks)
