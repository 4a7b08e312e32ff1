"""transformers 5 keeps the chat template in chat_template.jinja: chat fine-tuning reads it, and every
checkpoint and adapter folder of the run carries it (sft.chat_template, when given, is the one carried)."""

import json

import pytest

from lmforge.cli import main
from lmforge.data.tokenizers import load_tokenizer

from tests.finetune.conftest import save_tiny_model, write_jsonl
from tests.finetune.test_prompt_ids import TEMPLATE, make_tokenizer


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chat_fine_tuning_reads_chat_template_jinja_and_carries_it(tmp_path, method):
    """transformers 5 keeps the template in chat_template.jinja: chat fine-tuning reads it, and every checkpoint,
    the adapter folder and the served run have it (sft.chat_template, when given, is the one carried)."""
    from lmforge.serve.chat import load_chat_template
    from lmforge.serve.engine import engine_from_checkpoint

    tok = load_tokenizer(make_tokenizer(tmp_path, "gpt2"))
    base = tmp_path / "base"
    save_tiny_model(base, tok)
    cfg_path = base / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text())
    config.pop("chat_template", None)
    cfg_path.write_text(json.dumps(config))
    (base / "chat_template.jinja").write_text(TEMPLATE)
    records = [{"messages": [{"role": "user", "content": "Which food is red?"},
                             {"role": "assistant", "content": "apple"}]}] * 8
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    common = ["--model", str(base), "--data", data, "seq_length=48", "micro_batch_size=4", "global_batch_size=4",
              "trainer.max_steps=1", "trainer.accelerator=cpu"]
    out = tmp_path / "run"
    assert main(["finetune", "--method", method, "--out", str(out), *common]) == 0
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert checkpoints
    for ckpt in checkpoints:
        assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE, ckpt
    served = [out] if method == "lora" else checkpoints
    if method == "lora":
        assert load_tokenizer(out / "adapter").config["chat_template"] == TEMPLATE
    for path in served:
        engine = engine_from_checkpoint(path, device="cpu", dtype="float32", max_batch_size=1)
        assert load_chat_template(engine.tokenizer).template == TEMPLATE, path

    # a template given in the fine-tuning config is the one trained on, so it is the one carried
    mine = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
    out2 = tmp_path / "run2"
    assert main(["finetune", "--method", method, "--out", str(out2), *common,
                 f"sft.chat_template={json.dumps(mine)}"]) == 0
    step = sorted((out2 / "checkpoints").glob("step_*"))[-1]
    assert json.loads((step / "tokenizer_config.json").read_text())["chat_template"] == mine
    if method == "lora":
        engine = engine_from_checkpoint(out2, device="cpu", dtype="float32", max_batch_size=1)
        assert load_chat_template(engine.tokenizer).template == mine
