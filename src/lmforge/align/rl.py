"""Online RL: GRPO and REINFORCE (leave-one-out baseline) with rollouts from lmforge's serving engine.

Each micro batch of prompts goes through :class:`RolloutLoss` (the objective the one training loop calls):

1. ``align.num_generations`` completions per prompt are sampled by an :class:`~lmforge.serve.engine.Engine` built
   once on the policy module itself: it reads the weights the optimizer updates, so every step samples from the
   current policy with no copy (and no disk). Its prefix cache is off: keys computed with older weights would be
   stale after the next step.
2. The user's reward function (``align.reward_fn``, ``module:function``) scores them:
   ``fn(prompts, completions, **fields) -> list[float]``, one value per completion, where ``prompts`` repeats each
   prompt ``num_generations`` times and ``fields`` holds the records' other fields, repeated alike.
3. Advantages are normalised within each prompt's group (:func:`lmforge.align.losses.group_advantages`) and the
   clipped policy-gradient loss with the k3 KL penalty to the reference
   (:func:`lmforge.align.losses.policy_losses`) is taken over the completion tokens (an EOS that ended a
   completion is one of them). lmforge takes one optimizer step per rollout, so the policy that sampled equals the
   one trained (ratio 1, the clip inactive; the gradient is the policy gradient).

The reference is the model with its adapters switched off (PEFT) or a frozen copy of the starting weights.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.align import losses as L
from lmforge.errors import ConfigError, DataError
from lmforge.models.transformer import softcap


def load_reward_fn(spec: Optional[str]) -> Callable:
    """Import ``module:function`` (the working folder first on ``sys.path``); one ConfigError line otherwise."""
    if not spec or ":" not in str(spec):
        raise ConfigError(f"align.reward_fn={spec!r}: give the reward function as module:function "
                          f"(--reward-fn rewards:exact_match)")
    module_name, _, name = str(spec).partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import
        raise ConfigError(f"--reward-fn {spec}: module {module_name!r} does not import ({type(e).__name__}: {e})") \
            from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec}: module {module_name!r} has no function {name!r}")
    return fn


class PromptSet:
    """Prompts of a JSONL file as ids (the one prompt rule, or the chat template), with their records."""

    def __init__(self, path, tokenizer, settings, max_length: int):
        from lmforge.align.data import AlignStats, Encoder
        from lmforge.data.sft import read_jsonl

        enc = Encoder(tokenizer, settings.chat_template, add_eos=False, max_length=max_length)
        key = settings.prompt_key
        self.where, self.records, self.ids = [], [], []
        for where, rec in read_jsonl(path):
            if not isinstance(rec, dict) or key not in rec:
                raise DataError(f"{where}: the record has no {key!r} field; set align.prompt_key to the field that "
                                f"holds the prompt")
            if not isinstance(rec[key], (str, list)):
                raise DataError(f"{where}: field {key!r} must be text or a list of chat messages")
            ids, _ = enc.prompt_ids(rec[key], where)
            if not ids:
                raise DataError(f"{where}: the prompt is empty")
            if len(ids) >= max_length:
                raise DataError(f"{where}: the prompt has {len(ids)} tokens, which leaves no room for a completion "
                                f"within seq_length={max_length}; shorten it or raise seq_length")
            self.where.append(where)
            self.records.append(rec)
            self.ids.append(ids)
        self.stats = AlignStats(records=len(self.ids), examples=len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.ids[i], "index": i}

    def collate(self, items: list) -> dict:
        longest = max(len(x["tokens"]) for x in items)
        tokens = torch.zeros(len(items), longest, dtype=torch.long)
        for r, x in enumerate(items):
            tokens[r, :len(x["tokens"])] = torch.tensor(x["tokens"])
        return {"tokens": tokens, "lengths": torch.tensor([len(x["tokens"]) for x in items]),
                "index": torch.tensor([x["index"] for x in items])}


def token_logps(net: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(N, T-1) fp32 log-probability of each token of ``rows`` (N, T) given the tokens before it."""
    hidden = net.hidden_states(rows[:, :-1])
    logits = F.linear(hidden, net.output_weight()).float()
    cap = getattr(net.cfg, "final_logit_softcapping", None)
    if cap is not None:
        logits = softcap(logits, cap)
    return torch.gather(logits.log_softmax(-1), 2, rows[:, 1:].unsqueeze(-1)).squeeze(-1)


class RolloutLoss(nn.Module):
    """GRPO or REINFORCE-with-RLOO on micro batches of :class:`PromptSet` (see the module doc).

    Args:
        model: what is trained (a Transformer, with LoRA/IA3/adapter modules under PEFT).
        method: ``grpo`` or ``reinforce``.
        settings: the ``align`` section (beta, num_generations, max_completion_length, temperature, reward_fn).
        prompts: the training :class:`PromptSet` (records for the reward function's fields).
        tokenizer: decodes completions for the reward function; its EOS ends them.
        reference: ``adapters_off`` or a frozen copy of the starting model (an ``nn.Module``).
        max_seq_len: prompt + completion positions.
        max_rows: completions sampled together (a micro batch's prompts x ``num_generations``).
        seed: seeds each completion's draw (with the rollout's number), so a run samples the same way again.
    """

    def __init__(self, model: nn.Module, method: str, settings, prompts: PromptSet, tokenizer, reference,
                 max_seq_len: int, seed: int, max_rows: int):
        super().__init__()
        self.model, self.method, self.s, self.prompts, self.tok = model, method, settings, prompts, tokenizer
        self.reference = reference if isinstance(reference, str) else None
        self._frozen = [reference] if isinstance(reference, nn.Module) else []  # a list: not a submodule
        self.G = int(settings.num_generations)
        self.max_seq_len, self.seed, self.max_rows = max_seq_len, seed, max_rows
        self.reward_fn = load_reward_fn(settings.reward_fn)
        self._engine = None
        self._rollouts = 0
        self.sums = defaultdict(float)

    # -- what the loop asks ---------------------------------------------------------------------
    unit = "completions"  # what count() counts: the loop logs completions_per_s

    def count(self, batch: dict) -> int:
        return int(batch["tokens"].shape[0]) * self.G  # completions

    def pop_metrics(self, mode: str) -> dict:
        out, self.sums = dict(self.sums), defaultdict(float)
        out.setdefault("n", 0.0)
        return out

    # -- rollouts -------------------------------------------------------------------------------
    def engine(self):
        if self._engine is None:
            from lmforge.serve.engine import Engine

            blocks = -(-self.max_seq_len // 16)  # a KV cache for every completion of a micro batch at once
            self._engine = Engine(self.model, self.tok, max_batch_size=self.max_rows, max_seq_len=self.max_seq_len,
                                  block_size=16, num_kv_blocks=self.max_rows * blocks, enable_prefix_caching=False,
                                  compile_decode=False)
        return self._engine

    def sample(self, prompts: list[list[int]]) -> list[list[int]]:
        """``G`` completions of each prompt (prompt-major), each ending with EOS when EOS ended it."""
        from lmforge.serve.engine import SamplingParams

        was = self.model.training
        self.model.eval()
        device_type = next(self.model.parameters()).device.type
        try:
            engine = self.engine()
            eos = self.tok.eod_id
            ids, out = [], {}
            for p, prompt in enumerate(prompts):
                for g in range(self.G):
                    rid = f"r{self._rollouts}-{p}-{g}"
                    seed = (self.seed * 1_000_003 + self._rollouts * 7919 + p * 131 + g) % (2 ** 31)
                    params = SamplingParams(max_tokens=int(self.s.max_completion_length),
                                            temperature=float(self.s.temperature), seed=seed)
                    engine.add_request(rid, prompt, params)
                    ids.append(rid)
                    out[rid] = ([], None)
            while engine.has_work():
                with torch.autocast(device_type, enabled=False):  # the engine runs in the weights' own dtype
                    outputs = engine.step()
                for o in outputs:
                    if o.finish_reason == "error":
                        raise RuntimeError(f"sampling a completion failed: {o.error}")
                    toks, _ = out[o.request_id]
                    toks.extend(o.token_ids)
                    out[o.request_id] = (toks, o.finish_reason)
            self._rollouts += 1
        finally:
            self.model.train(was)
        return [toks + ([eos] if reason == "stop" and eos is not None else []) for toks, reason in
                (out[r] for r in ids)]

    def rewards(self, index: list[int], completions: list[list[int]]) -> torch.Tensor:
        """The reward function's values for the completions; one DataError line naming the function and the
        record on anything but a finite number per completion."""
        spec, G, key = self.s.reward_fn, self.G, self.s.prompt_key
        records = [self.prompts.records[i] for i in index]
        where = [self.prompts.where[i] for i in index]
        eos = self.tok.eod_id
        texts = [self.tok.decode([t for t in c if t != eos]) for c in completions]
        prompts = [r[key] for r in records for _ in range(G)]
        names = sorted({k for r in records for k in r if k != key})
        fields = {k: [r.get(k) for r in records for _ in range(G)] for k in names}
        lines = ", ".join(where)
        try:
            values = self.reward_fn(prompts, texts, **fields)
        except Exception as e:  # noqa: BLE001 - whatever the user's function raises
            raise DataError(f"reward function {spec} raised {type(e).__name__}: {e} (scoring the completions of "
                            f"{lines})") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise DataError(f"reward function {spec} must return a list of numbers, one per completion; it returned "
                            f"{type(values).__name__} {str(values)[:80]} (for {lines})") from None
        if len(values) != len(texts):
            raise DataError(f"reward function {spec} returned {len(values)} values for {len(texts)} completions "
                            f"({len(records)} prompts x align.num_generations={G}) of {lines}; return one per "
                            f"completion")
        for j, v in enumerate(values):
            if not math.isfinite(v):
                raise DataError(f"reward function {spec} returned {v} for completion {j % G} of the prompt of "
                                f"{where[j // G]} (completion {texts[j]!r}); return finite numbers")
        return torch.tensor(values, dtype=torch.float32)

    # -- the loss -------------------------------------------------------------------------------
    def _reference_logps(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self._frozen:
                return token_logps(self._frozen[0], rows)
            from lmforge.peft import adapters_disabled

            with adapters_disabled(self.model):
                return token_logps(self.model, rows)

    def forward(self, tokens, lengths, index):
        B, G, device = tokens.shape[0], self.G, tokens.device
        prompts = [tokens[i, :int(lengths[i])].tolist() for i in range(B)]
        completions = self.sample(prompts)
        rewards = self.rewards(index.tolist(), completions).to(device)
        adv = L.group_advantages(rewards.view(B, G), self.method).reshape(-1)

        full = [prompts[j // G] + completions[j] for j in range(B * G)]
        T = max(2, max(len(f) for f in full))
        rows = torch.zeros(B * G, T, dtype=torch.long, device=device)
        mask = torch.zeros(B * G, T, dtype=torch.bool, device=device)
        for j, f in enumerate(full):
            rows[j, :len(f)] = torch.tensor(f, device=device)
            mask[j, len(prompts[j // G]):len(f)] = True
        logps = token_logps(self.model, rows)
        ref = self._reference_logps(rows) if float(self.s.beta) > 0 else logps.detach()  # beta 0: no KL term
        losses, kl = L.policy_losses(logps, logps.detach(), ref, adv, mask[:, 1:], float(self.s.beta))

        s = self.sums
        s["n"] += B * G
        s["reward"] += float(rewards.sum())
        s["reward_std"] += float(rewards.view(B, G).std(1).sum()) * G  # the mean within-group spread
        s["kl"] += float(kl.sum())
        s["completion_length"] += float(mask.sum())
        return losses.sum(), B * G
