"""The output processor: what a new token means for its request, and what the client is sent.

:meth:`OutputProcessor.append` adds a sampled token (a stop token, a stop string or the length limit end the
request; a stop string that is one special token, such as ``<|eot_id|>``, stops as that token, since the text is
decoded without special tokens), :meth:`OutputProcessor.detokenize` decodes only the newest few tokens, and
:meth:`OutputProcessor.output` builds the :class:`~lmforge.serve.request.RequestOutput` of the text and tokens
not sent yet (holding back text that could still become a stop string, or an incomplete UTF-8 character).
"""

from __future__ import annotations

import time
from typing import Optional

from lmforge.serve.request import RequestOutput, Sequence

__all__ = ["OutputProcessor"]


class OutputProcessor:
    """Stop rules, incremental detokenization and outputs of the engine's requests.

    Args:
        tokenizer: an lmforge tokenizer (``decode``); None gives token ids only (no text, no stop strings).
        eos_id: the end-of-sequence token (None: none).
        max_seq_len: positions a sequence may reach (virtual tokens, prompt and output).
    """

    def __init__(self, tokenizer, eos_id: Optional[int], max_seq_len: int):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.max_seq_len = max_seq_len
        self._special: dict[str, Optional[int]] = {}  # stop string -> its special token's id or None (bounded)

    def special_token_id(self, text: str) -> Optional[int]:
        """The id of the special token spelled ``text`` (``<|eot_id|>``, ``<|im_end|>``), else None.

        The output text is decoded without special tokens, so such a stop string would never be found in it; the
        engine stops on the token instead."""
        if text not in self._special:
            if len(self._special) >= 4096:  # clients send any strings: the memo stays bounded
                self._special.clear()
            to_id = getattr(self.tokenizer, "token_to_id", None)
            tid = to_id(text) if to_id is not None else None
            special = isinstance(tid, int) and self.tokenizer.decode([tid]) == text \
                and self.tokenizer.decode([tid], skip_special_tokens=True) == ""
            self._special[text] = tid if special else None
        return self._special[text]

    def prepare(self, seq: Sequence) -> None:
        """Split the request's stop strings into special tokens (``seq.stop_ids``, with its ``stop_token_ids``)
        and strings searched in the text (``seq.stop_texts``)."""
        p = seq.params
        seq.stop_ids = set(p.stop_token_ids)
        seq.stop_texts = []
        for text in p.stop:
            tid = self.special_token_id(text) if self.tokenizer is not None else None
            if tid is None:
                seq.stop_texts.append(text)
            else:
                seq.stop_ids.add(tid)

    def append(self, seq: Sequence, token: int) -> None:
        p = seq.params
        seq.num_generated += 1
        if (token == self.eos_id and not p.ignore_eos) or token in seq.stop_ids:
            # The stop token is not part of the text or token ids, but its logprob stays (as vLLM's and
            # OpenAI's do): clients such as lm-evaluation-harness expect one entry per generated token.
            seq.finish_reason = "stop"
            return
        seq.output_ids.append(token)
        if self.tokenizer is not None:
            self.detokenize(seq)
            if seq.stop_texts:
                search_from = max(0, seq.sent_chars - max(len(s) for s in seq.stop_texts))
                hits = [i for i in (seq.text.find(s, search_from) for s in seq.stop_texts) if i >= 0]
                if hits:
                    seq.text = seq.text[: min(hits)]
                    seq.finish_reason = "stop"
                    return
        if seq.num_generated >= seq.max_new or seq.length >= self.max_seq_len:
            seq.finish_reason = "length"

    def detokenize(self, seq: Sequence) -> None:
        """Update ``seq.text`` for its newest token, decoding only a few tokens (not the whole output).

        The new tokens are decoded together with the previous few (``output_ids[prefix_offset:]``) and the text
        of those previous ones is cut off, so tokenizers whose decoding depends on the left neighbour (a
        SentencePiece word-start space, byte-level pieces of one character) give the text a whole decode would.
        Text is confirmed once it does not end in an incomplete UTF-8 character.
        """
        ids = seq.output_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset: seq.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
        new = full[len(prefix):]
        if new and not new.endswith("\ufffd"):
            seq.confirmed += new
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            new = ""
        seq.text = seq.confirmed + new

    def output(self, seq: Sequence) -> RequestOutput:
        done = seq.finish_reason is not None
        text = ""
        if self.tokenizer is not None:
            upto = len(seq.text)
            if not done:
                if seq.stop_texts:
                    upto -= max(len(s) for s in seq.stop_texts) - 1  # could still become a stop string
                while upto > seq.sent_chars and seq.text[upto - 1] == "\ufffd":
                    upto -= 1  # an incomplete UTF-8 character
            upto = max(upto, seq.sent_chars)
            text = seq.text[seq.sent_chars: upto]
            seq.sent_chars = upto
        new_ids = seq.output_ids[seq.sent_tokens:]
        seq.sent_tokens = len(seq.output_ids)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None  # sent with the first output
        return RequestOutput(seq.request_id, new_ids, text, logprobs, done, seq.finish_reason, len(seq.prompt_ids),
                             seq.num_generated, prompt_logprobs, seq.error,
                             seq.metrics(time.monotonic()) if done else None)
