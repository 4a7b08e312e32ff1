"""An lm-evaluation-harness model backed by lmforge: ``lm_eval --model lmforge --model_args pretrained=PATH``.

Importing this module registers :class:`LmforgeLM` under the name ``lmforge`` in lm_eval's model
registry. lm_eval (0.4.x) does not import plugins by itself, so run it through this module, which
registers the model and then hands the command line to lm_eval's own CLI::

    python -m lmforge.eval.harness --model lmforge --model_args pretrained=CKPT,batch_size=16 --tasks arc_easy

or, from Python, ``import lmforge.eval.harness`` before ``lm_eval.simple_evaluate(model="lmforge", ...)``.

model_args: ``pretrained`` (an lmforge checkpoint or results folder), ``device`` (default auto),
``dtype`` (auto/float32/bfloat16/float16), ``batch_size`` (int or auto), ``max_length`` (default: the
model's ``max_position_embeddings``), ``adapter`` (a fine-tuned adapter folder: LoRA/IA3 merged,
bottleneck adapters unmerged, as ``lmforge evaluate --adapter``). Token-level scoring is :class:`lmforge.eval.scorer.Scorer`.
"""

from __future__ import annotations

from typing import Optional, Union

import lm_eval.models  # noqa: F401  (lm_eval's own models first: registering ours earlier would hide them)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from lmforge.eval.scorer import Scorer

__all__ = ["LmforgeLM", "main"]


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """lm_eval's ``LM`` interface over an lmforge model (loglikelihood, rolling loglikelihood, generation)."""

    def __init__(self, pretrained: str, device: str = "auto", dtype: str = "auto",
                 batch_size: Union[int, str] = 16, max_length: Optional[int] = None,
                 adapter: Optional[str] = None, **kwargs):
        super().__init__()
        from lmforge.open import load_for_inference

        model, tokenizer = load_for_inference(pretrained, device=device, dtype=dtype, allow_ptuning=True)
        if adapter:
            from lmforge.eval.evaluate import with_adapter

            model = with_adapter(model, adapter)
        self.model = model
        self.tokenizer = tokenizer
        batch_size = batch_size if str(batch_size) == "auto" else int(batch_size)
        from lmforge.eval.evaluate import context_length

        self._max_length = int(max_length or context_length(model))
        self.scorer = Scorer(model, tokenizer, self._max_length, batch_size=batch_size)

    @property
    def eot_token_id(self) -> int:
        """End-of-text id (the tokenizer's end-of-document token)."""
        return self.tokenizer.eod_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: BOS, else EOS."""
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        """The model's context length."""
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Token ids; ``add_special_tokens=False`` drops what the tokenizer's post-processor would add."""
        if add_special_tokens is False:
            return self.scorer._encode_plain(string)
        return self.scorer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``[((context, continuation), context_ids, continuation_ids), ...]`` -> ``[(loglikelihood, is_greedy)]``."""
        return self.scorer.loglikelihood_tokens([(list(c), list(x)) for _, c, x in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document loglikelihoods in rolling windows of ``max_length`` tokens."""
        return self.scorer.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation up to the request's ``until`` strings and ``max_gen_toks``."""
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out.extend(self.scorer.generate_until([context], until, int(gen_kwargs.get("max_gen_toks", 256))))
        return out


def main() -> None:
    """lm_eval's command line, with the ``lmforge`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
