"""A p-tuning adapter served: the engine puts its virtual tokens in front of every prompt (in the cache, not
in the request's tokens), computed once; greedy outputs and prompt logprobs equal the p-tuned model's own
full forwards, with continuous batching."""

import pytest
import torch

from lmforge.cli import main
from lmforge.open import load_for_inference
from lmforge.peft import PTuningConfig, apply_adapter, apply_peft, save_adapter
from lmforge.serve.engine import PromptTooLongError, SamplingParams, engine_from_checkpoint
from tests.serve.test_serve_server import make_checkpoint

N_VIRTUAL = 5


@pytest.fixture(scope="module", params=["mlp", "lstm"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ptuning_{request.param}")
    ckpt = make_checkpoint(root, chat_template=False)
    model, _ = load_for_inference(ckpt, device="cpu", dtype="float32")
    cfg = PTuningConfig(num_virtual_tokens=N_VIRTUAL, encoder_type=request.param, encoder_hidden_size=16)
    tuned = apply_peft(model, "ptuning", cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a prompt encoder far from its init, so the virtual tokens change the outputs
        for p in tuned.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return ckpt, save_adapter(tuned, "ptuning", cfg, root / "adapter")


def reference(ckpt, adapter):
    model, _ = load_for_inference(ckpt, device="cpu", dtype="float32")
    return apply_adapter(model, adapter).eval()  # a PromptTunedModel: virtual tokens in front of every input


def greedy_full_forwards(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_engine_prepends_the_virtual_tokens(setup):
    ckpt, adapter = setup
    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", adapter=adapter, max_batch_size=3,
                                    max_seq_len=64)
    assert engine.context_len == 64 - N_VIRTUAL
    tok, ref = engine.tokenizer, reference(ckpt, adapter)
    prompts = [tok.encode(t) for t in ("def wrap(text", "import re", "x", "class Sequence:", "    return")]
    got = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert got == [greedy_full_forwards(ref, p, 8) for p in prompts]
    plain, _ = load_for_inference(ckpt, device="cpu", dtype="float32")
    assert got[0] != greedy_full_forwards(plain, prompts[0], 8)  # the virtual tokens matter
    # prompt logprobs (echo) are those of the request's own tokens, given the virtual tokens before them
    engine.add_request("e", prompts[3], SamplingParams(max_tokens=0, prompt_logprobs=1))
    out = engine.step()[0]
    with torch.no_grad():
        full = ref(torch.tensor([prompts[3]]))[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompts[3])
    for i in range(1, len(prompts[3])):
        assert out.prompt_logprobs[i].logprob == pytest.approx(float(full[i - 1, prompts[3][i]]), abs=1e-5)
    with pytest.raises(PromptTooLongError, match=f"holds {64 - N_VIRTUAL} positions"):
        engine.add_request("long", [1] * (64 - N_VIRTUAL), SamplingParams(max_tokens=1))


def test_generate_cli_with_a_ptuning_adapter(setup, capsys):
    ckpt, adapter = setup
    args = ["--prompt", "def wrap(text", "--max-new-tokens", "5", "--greedy", "--device", "cpu", "--dtype", "float32"]
    assert main(["generate", str(ckpt), "--adapter", str(adapter), *args]) == 0
    out = capsys.readouterr().out
    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=1)
    tok = engine.tokenizer
    ids = tok.encode("def wrap(text")
    want = greedy_full_forwards(reference(ckpt, adapter), ids, 5)
    if tok.eod_id in want:
        want = want[: want.index(tok.eod_id)]
    assert out == "def wrap(text" + tok.decode(want, skip_special_tokens=True) + "\n"
