"""lmforge's evaluation against lm-evaluation-harness itself: same model, same local data, same numbers.

A small random Llama (transformers) and a BPE tokenizer trained here are saved as a Hugging Face folder;
the same weights, copied into an lmforge Transformer, are saved as an lmforge checkpoint. lm_eval runs its
own task configs (included from its installed package) with only the dataset pointed at JSONL files this
test writes in each dataset's real field layout; lmforge runs its tasks on the same files. The context
length is 64 tokens, so long requests are truncated from the left and wikitext documents span several
rolling windows.
"""

import json
import os
import random
from pathlib import Path

import pytest
import torch

import lm_eval
import transformers
from lmforge.data.tokenizers import train_bpe
from lmforge.eval import run
from lmforge.models import ModelConfig, Transformer
from lmforge.train.checkpoint import save_model

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
MAX_POS = 64

WORDS = ("the cat dog river stone house light water green small quick brown jumps over lazy old new red "
         "mountain city people walk run sing happy quiet loud morning night bread apple garden window "
         "teacher student book paper write read think because when where which after before").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_records(rng: random.Random) -> dict[str, list[dict]]:
    """A few records per task, in the field layout of the Hugging Face dataset the harness reads."""
    recs: dict[str, list[dict]] = {}
    recs["lambada_openai"] = [{"text": sentence(rng, rng.randint(6, 40))} for _ in range(6)]
    recs["boolq"] = [{"question": sentence(rng, 6), "passage": sentence(rng, rng.randint(10, 60)), "idx": i,
                      "label": i % 2} for i in range(6)]
    recs["race"] = []
    for i in range(4):
        problems = []
        for j in range(3):
            q = sentence(rng, 5) + ("  _  ." if j == 1 else "?")
            problems.append({"answer": "ABCD"[(i + j) % 4], "options": [sentence(rng, rng.randint(1, 4)) for _ in range(4)],
                             "question": q})
        recs["race"].append({"example_id": f"high{i}.txt", "article": sentence(rng, rng.randint(20, 70)),
                             "problems": repr(problems)})
    recs["piqa"] = [{"goal": sentence(rng, 8), "sol1": sentence(rng, rng.randint(2, 9)),
                     "sol2": sentence(rng, rng.randint(2, 9)), "label": i % 2} for i in range(6)]
    recs["hellaswag"] = [{"ind": i, "activity_label": sentence(rng, 2).title(),
                          "ctx_a": sentence(rng, 10) + " [title] " + sentence(rng, 3) + ".",
                          "ctx_b": sentence(rng, 3), "ctx": "", "endings": [sentence(rng, rng.randint(2, 12)) + " [step]"
                                                                             for _ in range(4)],
                          "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)}
                         for i in range(6)]
    recs["winogrande"] = [{"sentence": sentence(rng, 6) + " _ " + sentence(rng, rng.randint(3, 8)) + ".",
                           "option1": sentence(rng, 1), "option2": sentence(rng, 2), "answer": "12"[i % 2]}
                          for i in range(6)]
    page = lambda: (" = " + sentence(rng, 2) + " = \n " + sentence(rng, rng.randint(40, 160)) + " @-@ "  # noqa: E731
                    + sentence(rng, 5) + " , " + sentence(rng, 10) + " . \n")
    recs["wikitext2"] = [{"page": page()} for _ in range(3)]
    recs["wikitext103"] = [{"page": page()} for _ in range(2)]
    return recs


# The harness task each lmforge task is compared with, the split it reads, and the harness's YAML.
HARNESS = {
    "lambada_openai": ("lambada/lambada_openai.yaml", "test"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "race": ("race/race.yaml", "test"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "wikitext2": ("wikitext/wikitext.yaml", "test"),
    "wikitext103": ("wikitext/wikitext.yaml", "test"),
}


def randomize_(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)


def llama_key_map(num_layers: int) -> dict:
    m = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
         "lm_head.weight": "lm_head.weight"}
    for i in range(num_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            m[f"layers.{i}.{name}.weight"] = f"model.layers.{i}.{name}.weight"
    return m


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF model folder, lmforge checkpoint folder, {task: data file}, folder of harness task YAMLs)."""
    root = tmp_path_factory.mktemp("parity")
    recs = make_records(random.Random(0))
    data = {}
    for task, rows in recs.items():
        data[task] = root / "data" / f"{task}.jsonl"
        data[task].parent.mkdir(parents=True, exist_ok=True)
        data[task].write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = root / "corpus.jsonl"
    rng = random.Random(1)
    corpus.write_text("".join(json.dumps({"text": sentence(rng, 30) + " [title] ? , . @-@ \n"}) + "\n"
                              for _ in range(200)))
    hf_dir = root / "hf"
    tok = train_bpe([corpus], vocab_size=300, out_dir=hf_dir)

    layers = 2
    hf_cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eod_id,
        pad_token_id=None)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    randomize_(hf_model)
    hf_model.save_pretrained(hf_dir)

    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=layers, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=MAX_POS,
                      normalization="rmsnorm", layernorm_epsilon=1e-5, activation="swiglu", bias=False,
                      position_embedding_type="rope", rotary_base=10000.0,
                      share_embeddings_and_output_weights=False)
    ours = Transformer(cfg)
    hf_state = hf_model.state_dict()
    ours.load_state_dict({k: hf_state[v].clone() for k, v in llama_key_map(layers).items()}, strict=True)
    ckpt = root / "lmforge_ckpt"
    save_model(ckpt, ours.state_dict(), cfg.to_dict(), tokenizer=tok)

    yaml_dir = root / "harness_tasks"
    yaml_dir.mkdir()
    for task, (yaml_rel, split) in HARNESS.items():
        lines = [f"include: {LM_EVAL_TASKS / yaml_rel}", f"task: lmf_{task}", "tag: []", "dataset_path: json",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {split}: {data[task]}",
                 "training_split: null", "fewshot_split: null"]
        lines += ["validation_split: null", "test_split: test"] if split == "test" else \
                 ["validation_split: validation", "test_split: null"]
        (yaml_dir / f"lmf_{task}.yaml").write_text("\n".join(lines) + "\n")
    return hf_dir, ckpt, data, yaml_dir


def task_manager(yaml_dir: Path):
    """lm_eval's task index of the test's YAMLs alone (they include lm_eval's own task files by path): its
    default index reads all of lm_eval's ~15k task files, seconds each time."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(yaml_dir), include_defaults=False)


def harness_results(model: str, path: Path, yaml_dir: Path, tasks: list[str], bootstrap_iters: int) -> dict:
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=model, model_args={"pretrained": str(path), "dtype": "float32"},
                          tasks=[f"lmf_{t}" for t in tasks], task_manager=task_manager(yaml_dir),
                          batch_size=3, device="cpu", bootstrap_iters=bootstrap_iters, log_samples=False)
    return out["results"]


ITERS = 2000  # bootstrap resamples: two of lm_eval's chunks of 1000


def offline(monkeypatch, tmp_path: Path) -> None:
    """lm_eval and datasets without the network, their cache in ``tmp_path``, bootstraps in this process."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DISABLE_MULTIPROC"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


@pytest.fixture(scope="module")
def hf_results(setup, tmp_path_factory):
    """lm_eval's results for every task on the transformers model (both tests below compare with them)."""
    hf_dir, _, _, yaml_dir = setup
    with pytest.MonkeyPatch.context() as monkeypatch:
        offline(monkeypatch, tmp_path_factory.mktemp("hf_results"))
        return harness_results("hf", hf_dir, yaml_dir, list(HARNESS), ITERS)


def test_eval_matches_lm_evaluation_harness(setup, hf_results, monkeypatch, tmp_path):
    hf_dir, ckpt, data, yaml_dir = setup
    offline(monkeypatch, tmp_path)
    tasks = list(HARNESS)
    iters = ITERS
    theirs = hf_results
    ours = run(str(ckpt), tasks, {t: str(data[t]) for t in tasks}, batch_size=5, device="cpu", dtype="float32",
               output=str(tmp_path / "results.json"), bootstrap_iters=iters, progress=False)
    assert json.loads((tmp_path / "results.json").read_text())["results"] == ours["results"]
    assert sum(ours["config"]["truncated_requests"].values()) > 0  # the 64-token context is exceeded somewhere
    assert_same(theirs, ours["results"], tasks)


def assert_same(theirs: dict, ours: dict, tasks: list[str]) -> None:
    """lm_eval's results (``metric,none`` keys) equal lmforge's (``metric``) to 1e-4, stderr included."""
    compared = 0
    for task in tasks:
        expected = theirs[f"lmf_{task}"]
        got = ours[task]
        names = {k.split(",")[0] for k in expected if k.endswith(",none") and "stderr" not in k}
        assert names == {k for k in got if not k.endswith("_stderr")}, task
        for name in names:
            assert got[name] == pytest.approx(expected[f"{name},none"], rel=1e-4, abs=1e-4), (task, name)
            err = expected[f"{name}_stderr,none"]
            if err == "N/A":
                assert got[f"{name}_stderr"] is None, (task, name)
            else:
                assert got[f"{name}_stderr"] == pytest.approx(err, rel=1e-4, abs=1e-4), (task, name)
            compared += 1
    assert compared == 15


def test_eval_lm_eval_runs_lmforge_models_through_the_adapter(setup, hf_results, monkeypatch, tmp_path):
    """``lm_eval --model lmforge``: the harness's own request building over lmforge's scorer gives the
    numbers the harness gives on the same model loaded with transformers."""
    import lmforge.eval.harness  # noqa: F401  (registers the "lmforge" model)

    hf_dir, ckpt, data, yaml_dir = setup
    offline(monkeypatch, tmp_path)
    tasks = list(HARNESS)
    theirs = hf_results
    via_adapter = harness_results("lmforge", ckpt, yaml_dir, tasks, ITERS)
    ours = {t: {k.split(",")[0]: (None if v == "N/A" else v) for k, v in via_adapter[f"lmf_{t}"].items()
                if k.endswith(",none")} for t in tasks}
    assert_same(theirs, ours, tasks)
