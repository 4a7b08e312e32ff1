"""Online RL: GRPO, REINFORCE (leave-one-out baseline) and PPO with rollouts from lmforge's serving engine.

:class:`RolloutLoss` is the objective; it runs each step of the one training loop itself
(:meth:`RolloutLoss.train_step`):

1. Rollout. For every prompt of the step's global batch, ``align.num_generations`` completions are sampled by an
   :class:`~lmforge.serve.engine.Engine` built once on the policy module itself (``live_weights``): it reads the
   weights the optimizer updates, so every step samples from the current policy with no copy (and no disk). On a
   GPU (``align.rollout_compile``, :func:`rollout_compile`) its decode step is compiled and captured as CUDA graphs
   once, at the first rollout; the graphs read the policy's parameters (nothing is fused or frozen) and are
   replayed by every later rollout. Its prefix cache is off: keys computed with older weights would be stale
   after the next step. Rollouts sample in ``align.rollout_dtype`` (:func:`rollout_dtype`; ``auto``: the
   trainer's compute dtype under mixed precision): when the policy's weights are wider (fp32 master weights under
   bf16-mixed) the engine is built on a copy of the policy in that dtype instead, whose trained weights are cast
   into it in place once per rollout (:meth:`RolloutLoss.refresh_copy`; the decode graphs read them there).
2. Rewards: the user's reward function (``align.reward_fn``, ``module:function``),
   ``fn(prompts, completions, **fields) -> list[float]`` (one value per completion; ``prompts`` repeats each prompt
   ``num_generations`` times and ``fields`` holds the records' other fields, repeated alike), or a reward model
   (``align.reward_model``) scoring prompt + completion at its last token.
3. Advantages. GRPO/REINFORCE: normalised within each prompt's group
   (:func:`lmforge.align.losses.group_advantages`). PPO: per-token rewards (minus ``beta`` x the log-ratio to
   the reference on each token, the score on the last, :func:`~lmforge.align.losses.token_rewards`), values from
   the critic, GAE (:func:`~lmforge.align.losses.gae`), whitened over the rollout.
4. Optimisation: ``align.ppo_epochs`` passes over the rollout, each in ``align.num_mini_batches`` shuffled mini
   batches, one optimizer step per mini batch. The clipped policy loss (ratio to the policy that sampled, clipped
   to ``1 +- align.cliprange``) acts from the second optimizer step of a rollout on; with one step per rollout
   (the defaults) the ratio is 1 and the gradient is the policy gradient. GRPO/REINFORCE add the k3 KL penalty
   to the loss (:func:`~lmforge.align.losses.policy_losses`); PPO adds ``align.vf_coef`` x the critic's clipped
   value loss (:func:`~lmforge.align.losses.value_losses`), the policy's and the critic's gradients clipped
   together (``trainer.gradient_clip_val``), each stepped by its own AdamW (``align.critic_lr``).

The reference is the model with its adapters switched off (PEFT) or a frozen copy of the starting weights. The
critic (:func:`build_critic`) is the policy's architecture with a scalar ``score`` head on every position, always
all weights (also when the policy trains a PEFT method); each checkpoint holds it in ``critic/``.

Several processes (data parallel, DDP or FSDP): each rank runs the four steps on its share of the step's prompts
(every group whole on one rank), with seeds that depend on a prompt's place in the global batch, not on the rank
(:func:`draw_seed`); the loss goes through the loop's wrapped objective (:meth:`RolloutLoss.forward`), so the
policy's gradients are averaged as every method's are, and N ranks make one process's update on N times the
prompts (:meth:`RolloutLoss.train_step`). Under FSDP the engine samples from a whole copy of the policy (in the
rollout dtype) refreshed once per rollout, and the frozen reference is sharded as the policy is. Gradient checkpointing (the assembly's, on
the policy's blocks; the stage's, on the critic's) acts in the loss's forward only: without autograd (rollouts,
reference, sampling log-probabilities, values) the blocks run plainly
(:func:`lmforge.parallel.transforms.apply_activation_checkpointing`).
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
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.models.transformer import separate_projections
from lmforge.parallel.fsdp import whole_tensor


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


def token_logps(net: nn.Module, rows: torch.Tensor, entropy: bool = False, chunk: Optional[int] = None):
    """(N, T-1) fp32 log-probability of each token of ``rows`` (N, T) given the tokens before it; with ``entropy``
    also the (N, T-1) entropy of each position's next-token distribution (detached: a logged metric).

    The head's part is the preference methods' :func:`lmforge.align.objective.token_logps` (one implementation):
    ``chunk`` (tokens; 0: off; None: automatic, as the training loss and
    :func:`~lmforge.align.objective.sequence_logps`) tokens at a time, so the (tokens x vocabulary) fp32 logits
    never exist whole, and the entropy from the same chunks' logits. Without chunking a trained head keeps its
    logit gradients from the forward pass (as autograd would keep the logits: no recomputation), and the entropy's
    positions still go in chunks of the automatic size for a 1 GiB vocabulary-wide slice: besides the logits the
    log-probs need, no other (tokens x vocabulary) tensor is built.
    """
    from lmforge.align.objective import token_logps as head_token_logps
    from lmforge.train.assembly import resolve_loss_chunk_size

    hidden = net.hidden_states(rows[:, :-1])  # (N, T-1, C)
    weight, labels = net.output_weight(), rows[:, 1:]
    chunk = resolve_loss_chunk_size(chunk, net.cfg)
    unchunked = not 0 < chunk < labels.numel()  # one chunk holds every position
    if not chunk and entropy:
        chunk = max(256, (2**28 // int(weight.shape[0])) // 256 * 256)
    out = head_token_logps(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                           getattr(net.cfg, "final_logit_softcapping", None), chunk, entropy=entropy,
                           save_logit_grads=unchunked)
    if not entropy:
        return out.view(labels.shape)
    return out[0].view(labels.shape), out[1].view(labels.shape)


def token_values(critic: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(N, T-1) fp32 values of the critic: position ``t`` is the state after ``rows[:, :t+1]``, before the token
    ``rows[:, t+1]`` that :func:`token_logps` scores at the same position."""
    hidden = critic.hidden_states(rows[:, :-1])
    return F.linear(hidden.float(), critic.score.weight.float()).squeeze(-1)


# -- the critic -----------------------------------------------------------------------------------------------

CRITIC_DIR = "critic"


def build_critic(policy: nn.Module, start: Optional[nn.Module], start_path: Optional[str],
                 reward_model: Optional[nn.Module], device) -> nn.Module:
    """PPO's critic: a Transformer with a ``score`` head (hidden size -> 1, no bias) read at every position, fp32,
    every weight trained. Its start (NeMo-Aligner's and TRL's choice): ``start`` when given (loaded by
    :func:`load_critic` from ``start_path``: a reward model or an earlier PPO run's critic), else a copy of the
    reward model, else a copy of the policy (``policy``, before any PEFT) with a zero head (every value 0)."""
    import copy

    if start is not None:
        critic = start
        if critic.score.weight.shape[0] != 1:
            raise ConfigError(f"align.critic_model={start_path} has {critic.score.weight.shape[0]} outputs (a SteerLM "
                              f"attribute model); the critic has one value head: start it from a `--method rm` model")
        if critic.cfg.vocab_size != policy.cfg.vocab_size:
            raise ConfigError(f"align.critic_model={start_path}: its vocabulary ({critic.cfg.vocab_size} tokens) is "
                              f"not the policy's ({policy.cfg.vocab_size}); the critic reads the policy's tokens, so "
                              f"start it from a model with the policy's tokenizer")
    elif reward_model is not None:
        critic = copy.deepcopy(reward_model)
    else:
        critic = copy.deepcopy(policy)
        critic.score = nn.Linear(critic.cfg.hidden_size, 1, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(critic.score.weight)
    critic = critic.float().to(device).train()
    for p in critic.parameters():
        p.requires_grad_(True)
    if not critic.cfg.share_embeddings_and_output_weights:  # the critic never reads its LM head: frozen
        critic.lm_head.weight.requires_grad_(False)
    return critic


def load_critic(path, device) -> nn.Module:
    """A critic from ``path``: a reward model (``lmforge align --method rm`` run, its ``reward_model/``, any Hugging
    Face sequence-classification folder) or an lmforge folder whose weights hold ``score.weight`` (a PPO run's
    ``critic/``). One CheckpointError line otherwise."""
    from pathlib import Path

    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"align.critic_model={path} does not exist: give a reward model (the run folder of "
                              f"`lmforge align --method rm` or its reward_model/) or a PPO run's critic/ folder")
    if (folder / CRITIC_DIR / "config.json").is_file():
        folder = folder / CRITIC_DIR
    try:
        from lmforge.align.reward import load_reward_model, reward_folder

        reward_folder(folder)
        return load_reward_model(folder, device=device)[0]
    except CheckpointError:
        pass
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import Transformer
    from lmforge.train.checkpoint import load_model

    try:
        weights, config = load_model(folder, device="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable folder is one line
        raise CheckpointError(f"align.critic_model={path} is neither a reward model nor a critic folder ({e})") \
            from None
    if "score.weight" not in weights:
        raise CheckpointError(f"align.critic_model={path} holds no score head (score.weight): give a reward model "
                              f"or a PPO run's critic/ folder")
    model = Transformer(ModelConfig.from_dict(config["model"]))
    model.score = nn.Linear(model.cfg.hidden_size, 1, bias=False)
    from lmforge.open import load_weights

    load_weights(model, weights, folder)
    return model.to(device)


def save_critic(folder, critic: nn.Module, optimizer, runtime) -> None:
    """``folder/critic/``: the critic's weights (``model.safetensors``, with ``score.weight``), ``config.json`` and
    its optimizer state (``training_state/``, safetensors + JSON)."""
    from pathlib import Path

    from lmforge.train.assembly import saved_state_dict
    from lmforge.train.checkpoint import save_model, save_training_state

    out = Path(folder) / CRITIC_DIR
    save_model(out, saved_state_dict(critic), critic.cfg.to_dict())
    save_training_state(out, optimizer, {"what": "ppo critic"}, runtime, rng=False)


def resume_critic(folder, critic: nn.Module, optimizer) -> None:
    """Load ``folder/critic/`` (weights and optimizer state) into the live critic; one line when it is missing."""
    from pathlib import Path

    from lmforge.open import load_weights
    from lmforge.train.checkpoint import load_model, read_optimizer_state

    src = Path(folder) / CRITIC_DIR
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{folder} has no {CRITIC_DIR}/ folder, so this PPO run cannot resume its critic from "
                              f"it; start a new run folder (--out) or resume=false")
    weights, _ = load_model(src, device=next(critic.parameters()).device)
    load_weights(critic, weights, src)
    try:
        optimizer.load_state_dict(read_optimizer_state(src))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"the critic's optimizer state in {src} does not fit this critic ({e})") from None


def rollout_compile(setting, device: torch.device) -> tuple[bool, str]:
    """Whether rollouts run the compiled decode step (CUDA graphs on the live policy), from
    ``align.rollout_compile`` (``auto``: on a CUDA device; ``true``; ``false``) and the training device, with the
    line that says so. ``true`` off CUDA is one ConfigError: the decode graphs are CUDA graphs, and the engine
    runs eagerly everywhere else."""
    device = torch.device(device)
    if setting is True and device.type != "cuda":
        raise ConfigError(f"align.rollout_compile=true needs a CUDA GPU (the rollout engine's decode graphs are CUDA "
                          f"graphs) but this run trains on {device.type}; use align.rollout_compile=auto or false")
    on = device.type == "cuda" if setting == "auto" else bool(setting)
    if on:
        return True, (f"rollouts: compiled decode step (CUDA graphs captured at the first rollout, reading the "
                      f"policy's live weights; align.rollout_compile={_spelled(setting)})")
    why = "off" if setting is False else f"no CUDA device ({device.type})"
    return False, f"rollouts: eager decode step (align.rollout_compile={_spelled(setting)}: {why})"


def _spelled(setting) -> str:
    return {True: "true", False: "false"}.get(setting, str(setting))


#: ``align.rollout_dtype``'s explicit values (``auto`` besides)
ROLLOUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rollout_dtype(setting, amp_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype rollouts sample in, from ``align.rollout_dtype``: ``auto`` gives the trainer's compute dtype under
    mixed precision (``amp_dtype``: bf16-mixed's bfloat16, 16-mixed's float16) and None (the weights' own dtype)
    without; ``float32``, ``bfloat16`` or ``float16`` gives that dtype. Anything else is one ConfigError line.
    The engine runs each of them on CPU too (slowly: CPU matmuls in half precision are not fast)."""
    if setting == "auto":
        return amp_dtype
    if setting not in ROLLOUT_DTYPES:
        raise ConfigError(f"align.rollout_dtype={setting!r}; use auto (the trainer's compute dtype under mixed "
                          f"precision), float32, bfloat16 or float16")
    return ROLLOUT_DTYPES[setting]


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of ``model``'s floating-point parameter elements have: the weights' own dtype (a PEFT
    model's frozen base, not its few adapter weights, which are fp32 whatever the base's dtype and cast to the
    input's dtype at use)."""
    counts: dict = defaultdict(int)
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of ``model`` (eval mode) with every floating-point parameter and buffer in ``dtype``, as
    ``copy.deepcopy(model).to(dtype)`` makes it (rotary tables cast from the model's own, tied weights tied), but
    without a whole copy in the model's own dtype first: each tensor is cast straight into the copy (deepcopy's
    memo), so a bf16 copy of an fp32 policy costs 2 bytes per parameter and nothing more at its peak."""
    import copy

    memo = {}
    for p in model.parameters():
        if p.is_floating_point():
            memo[id(p)] = nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
    for b in model.buffers():
        if b.is_floating_point():
            memo[id(b)] = b.detach().to(dtype, copy=True)
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (each tensor once)."""
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _sharded(model: nn.Module) -> bool:
    """Whether the policy's parameters are sharded (FSDP, DTensors): the decode graphs need whole weights."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters())


def rollout_decode_batches(max_rows: int) -> list[int]:
    """The decode batch sizes a compiled rollout engine captures: its whole batch (rounded up to a power of two)
    and an eighth of it, for the end of a rollout, when few completions are left. A rollout admits every
    completion at once and its batch only shrinks: steps of 9 to 64 rows (of 64) run padded to 64, which costs
    a 1B-parameter decode step little (it reads the weights once either way; padding rows read no cache), and
    start-up captures two graph sets instead of seven."""
    from lmforge.serve.cache import bucket

    whole = bucket(max_rows, 0)
    return sorted({max(1, whole // 8), whole})


def draw_seed(seed: int, rollout: int, position: int, g: int) -> int:
    """The sampling seed of completion ``g`` of the prompt at ``position`` in rollout ``rollout``'s global batch
    (the run's ``seed`` first): a function of the prompt's place, not of the rank or micro batch that samples it."""
    return (((int(seed) * 1_000_003 + int(rollout)) * 1_000_033 + int(position)) * 1_009 + int(g)) % (2 ** 31)


def _all_ranks_sum():
    """A function summing a tensor in place over every process (None on one process): the statistics of a
    rollout spread over data-parallel ranks (online RL trains with data parallelism only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.all_reduce


def clip_together(groups: list, max_norm: float) -> torch.Tensor:
    """Scale the gradients of every parameter list of ``groups`` (the policy's, possibly sharded DTensors, and the
    critic's, whole) by one factor so that their joint 2-norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does for one list; a sharded list's norm is that of its whole gradients.
    Returns the joint norm before clipping."""
    norms = []
    for params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if not norms:
        return torch.zeros(())
    total = torch.stack([n.float() for n in norms]).norm() if len(norms) > 1 else norms[0]
    coef = min(1.0, float(max_norm) / (float(total) + 1e-6))
    if coef < 1.0:
        for params in groups:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total


class ReferenceLogps(nn.Module):
    """The frozen reference model (full-weight runs: a copy of the starting weights) as a module whose forward
    gives the per-token log-probabilities of rows (:func:`token_logps`, ``chunk`` tokens of the head at a time):
    under FSDP it is sharded as the policy is, with itself as the root (:meth:`RolloutLoss._shard_reference`)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.chunk, self.sharded = net, None, False

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return token_logps(self.net, rows, chunk=self.chunk)


class RolloutLoss(nn.Module):
    """GRPO, REINFORCE-with-RLOO or PPO on the prompts of :class:`PromptSet` (see the module doc).

    Args:
        model: what is trained (a Transformer, with LoRA/IA3/adapter modules under PEFT).
        method: ``grpo``, ``reinforce`` or ``ppo``.
        settings: the ``align`` section.
        prompts: the training :class:`PromptSet` (records for the reward function's fields).
        tokenizer: decodes completions for the reward function; its EOS ends them.
        reference: ``adapters_off`` or a frozen copy of the starting model (an ``nn.Module``).
        max_seq_len: prompt + completion positions.
        seed: seeds each completion's draw (with the step), so a run (and a resumed one) samples the same way.
        max_rows: completions in one forward (a micro batch's prompts x ``num_generations``).
        reward_model: a model with a ``score`` head scoring completions instead of ``settings.reward_fn``.
        critic, critic_optimizer, critic_lr_scale: PPO's critic, its AdamW, and its learning rate over the policy's.
        compile_decode: sample with the compiled decode step (CUDA graphs captured once on the live policy; see
            :func:`rollout_compile`); ignored off CUDA and, with a line in ``log``, for a sharded policy.
        log: where the rollout engine's start-up lines go (default: standard error).
        rollout_copy: the policy is about to be sharded (FSDP on several ranks): the rollout engine samples from
            a whole copy of it (taken here, before sharding, not trained), whose trained weights are gathered
            from the shards once per rollout (:meth:`refresh_copy`). An engine on the sharded policy itself
            would all-gather every block at each of its forwards, and the ranks' rollouts take different
            numbers of forwards (their completions end at different steps): the collectives would not pair up.
        rollout_dtype: the dtype rollouts sample in (:func:`rollout_dtype`; None: the weights' own,
            :func:`weights_dtype`). When it is not the weights' dtype (an fp32 policy trained under bf16-mixed:
            fp32 master weights, bf16 autocast) the engine samples from a copy of the policy in it
            (:func:`cast_copy`, 2 bytes per parameter in bf16), built once, its trained weights cast into it in
            place once per rollout (:meth:`refresh_copy`): the decode steps read half the bytes and run on bf16
            tensor cores, and a compiled engine's decode graphs, captured on the copy's tensors, stay valid.
            Under FSDP the one copy is both whole and in this dtype.
    """

    def __init__(self, model: nn.Module, method: str, settings, prompts: PromptSet, tokenizer, reference,
                 max_seq_len: int, seed: int, max_rows: int, reward_model: Optional[nn.Module] = None,
                 critic: Optional[nn.Module] = None, critic_optimizer=None, critic_lr_scale: float = 1.0,
                 compile_decode: bool = False, log=None, rollout_copy: bool = False,
                 rollout_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model, self.method, self.s, self.prompts, self.tok = model, method, settings, prompts, tokenizer
        self.reference = reference if isinstance(reference, str) else None
        # lists: not submodules (the optimizer and the checkpoints hold the policy alone)
        self._frozen = [ReferenceLogps(reference)] if isinstance(reference, nn.Module) else []
        own = weights_dtype(model)
        self.rollout_dtype = rollout_dtype or own
        whole = rollout_copy or self.rollout_dtype != own  # else the engine samples from the policy itself
        self._copy = [cast_copy(model, self.rollout_dtype)] if whole else []
        self._trained_names = [n for n, p in model.named_parameters() if p.requires_grad]  # refreshed in the copy
        self._net = None  # what runs the policy's forwards (train_step sets it: the loop's DDP/FSDP-wrapped self)
        self._exp: Optional[dict] = None  # the rollout train_step's forwards read (not an argument: see forward)
        self._reward_model = [reward_model] if reward_model is not None else []
        self._critic = [critic] if critic is not None else []
        self.critic_optimizer, self.critic_lr_scale = critic_optimizer, float(critic_lr_scale)
        self.G = int(settings.num_generations)
        self.max_seq_len, self.seed, self.max_rows = max_seq_len, seed, max_rows
        self.reward_fn = load_reward_fn(settings.reward_fn) if reward_model is None else None
        self._engine = None
        self.compile_decode, self.log = bool(compile_decode), log
        self.sums = defaultdict(float)
        self.loss_chunk_size: Optional[int] = None  # tokens per head chunk (see token_logps); the assembly sets it

    @property
    def critic(self) -> Optional[nn.Module]:
        return self._critic[0] if self._critic else None

    #: ``torch.compile`` mode of the compiled decode step (:class:`~lmforge.serve.engine.Engine`'s ``compile_mode``):
    #: None, inductor's default kernels (cuBLAS for the matrix products). Not a config key: benchmarks set it
    #: (benchmarks/grpo_rollout.py --compile-mode max-autotune-no-cudagraphs measures inductor's autotuned
    #: products in a real rollout) before the first :meth:`engine` call; the eager decode step ignores it.
    compile_mode: Optional[str] = None

    # -- what the loop asks ---------------------------------------------------------------------
    unit = "completions"  # what count() counts: the loop logs completions_per_s
    token_nll = False  # a policy-gradient loss: no perplexity, no val_ppl

    def count(self, batch: dict) -> int:
        return int(batch["tokens"].shape[0]) * self.G  # completions

    def pop_metrics(self, mode: str) -> dict:
        out, self.sums = dict(self.sums), defaultdict(float)
        out.setdefault("n", 0.0)
        return out

    # -- rollouts -------------------------------------------------------------------------------
    def engine(self):
        """The rollout engine, built at the first call on the policy itself (``live_weights``: nothing fused or
        frozen), or under FSDP on its whole copy (:meth:`_rollout_policy`); compiled, its decode graphs are
        captured then (:attr:`Engine.startup_seconds`).

        Rollouts need token ids only: no detokenization and one output per completion, when it ends
        (``detokenize=False, stream_outputs=False``: no host time per token on text or output objects).
        Compiled, two batch sizes are captured (:func:`rollout_decode_batches`), not every power of two: a
        rollout's batch only shrinks as its completions end. No prefix caching: a cached block would hold keys
        and values of the weights before the last optimizer step (and a rollout's prompts are all admitted in
        one step, before any block is cached)."""
        if self._engine is None:
            from lmforge.serve.engine import Engine

            compiled, policy = self.compile_decode, self._rollout_policy()
            if compiled and _sharded(policy):
                compiled = False
                (self.log or (lambda m: print(m, file=sys.stderr, flush=True)))(
                    "rollouts: eager decode step: the policy's weights are sharded (FSDP/DTensor) and the decode "
                    "graphs need whole weights")
            blocks = -(-self.max_seq_len // 16)  # a KV cache for every completion of a micro batch at once
            with separate_projections(policy):  # the decode graphs captured here record the separate matmuls
                self._engine = Engine(policy, self.tok, max_batch_size=self.max_rows, max_seq_len=self.max_seq_len,
                                      block_size=16, num_kv_blocks=self.max_rows * blocks,
                                      enable_prefix_caching=False, compile_decode=compiled, live_weights=True,
                                      compile_mode=self.compile_mode if compiled else None,
                                      log=self.log, detokenize=False, stream_outputs=False,
                                      decode_batches=rollout_decode_batches(self.max_rows))
        return self._engine

    def _rollout_policy(self) -> nn.Module:
        """What the rollout engine samples from: the policy itself, or its copy (whole under FSDP, in
        ``rollout_dtype``)."""
        return self._copy[0] if self._copy else self.model

    def describe_rollouts(self) -> str:
        """Which dtype rollouts sample in, and from what (for the run's ``rollouts:`` line)."""
        what = str(self.rollout_dtype).removeprefix("torch.")
        if not self._copy:
            return f"sampling in {what}, the policy's own weights (no copy)"
        gib = tensor_bytes(self._copy[0]) / 2 ** 30
        return (f"sampling in {what} from a copy of the policy ({gib:.2f} GiB, its trained weights copied in "
                f"place once per rollout)")

    @torch.no_grad()
    def refresh_copy(self) -> None:
        """The policy's trained weights into the rollout engine's copy, in place (a compiled engine's graphs read
        them where they are), cast to the copy's dtype; under FSDP gathered whole from the shards: every rank
        gathers the same weights in the same order, one all-gather per trained weight. Once per rollout
        (:meth:`collect`), after the optimizer steps; nothing without a copy. Only the trained weights change
        (LoRA: the adapters'; a full-weight run: every parameter); buffers (rotary tables) are constants, cast
        once when the copy was made."""
        if not self._copy:
            return
        live, mine = dict(self.model.named_parameters()), dict(self._copy[0].named_parameters())
        for name in self._trained_names:
            mine[name].copy_(whole_tensor(live[name]))

    def sample(self, prompts: list[list[int]], rollout: int = 0,
               positions: Optional[list[int]] = None) -> list[list[int]]:
        """``G`` completions of each prompt (prompt-major), each ending with EOS when EOS ended it. Completion ``g``
        of prompt ``p`` is drawn with the seed :func:`draw_seed` of ``rollout`` (the step), the prompt's place in
        the step's global batch (``positions[p]``; default ``p``) and ``g``: the same whichever rank samples it."""
        from lmforge.serve.engine import SamplingParams

        policy = self._rollout_policy()
        was = policy.training
        policy.eval()
        device_type = next(policy.parameters()).device.type
        try:
            # Joint projections (training's) off: the engine's forwards, and the decode graphs captured in
            # engine(), read each weight in place instead of concatenating them at every step.
            with separate_projections(policy):
                with torch.autocast(device_type, enabled=False):  # the engine runs in its model's dtype
                    engine = self.engine()
                    engine.sync_weights()  # compiled: captures again if a weight was replaced, not updated in place
                eos = self.tok.eod_id
                ids, out = [], {}
                for p, prompt in enumerate(prompts):
                    for g in range(self.G):
                        rid = f"r{rollout}-{p}-{g}"
                        seed = draw_seed(self.seed, rollout, positions[p] if positions is not None else p, g)
                        params = SamplingParams(max_tokens=int(self.s.max_completion_length),
                                                temperature=float(self.s.temperature), seed=seed)
                        engine.add_request(rid, prompt, params)
                        ids.append(rid)
                        out[rid] = ([], None)
                with torch.autocast(device_type, enabled=False):  # the engine runs in its model's dtype
                    while engine.has_work():
                        for o in engine.step():
                            if o.finish_reason == "error":
                                raise RuntimeError(f"sampling a completion failed: {o.error}")
                            toks, _ = out[o.request_id]
                            toks.extend(o.token_ids)
                            out[o.request_id] = (toks, o.finish_reason)
        finally:  # the training forwards join again (separate_projections put the flags back)
            policy.train(was)
        return [toks + ([eos] if reason == "stop" and eos is not None else []) for toks, reason in
                (out[r] for r in ids)]

    def rewards(self, index: list[int], completions: list[list[int]], prompts: Optional[list] = None) -> torch.Tensor:
        """The reward of each completion: the reward model's score, or the reward function's values (one DataError
        line naming the function and the record on anything but a finite number per completion)."""
        if self._reward_model:
            return self._model_rewards(prompts or [self.prompts.ids[i] for i in index], completions)
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

    @torch.no_grad()
    def _model_rewards(self, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        """The reward model's score of each prompt + completion (an ending EOS left out: reward models are trained
        on completions without one), read at its last token."""
        from lmforge.align.objective import score_rows

        rm = self._reward_model[0]
        eos = self.tok.eod_id
        seqs = [prompts[j // self.G] + (c[:-1] if c and c[-1] == eos else c) for j, c in enumerate(completions)]
        device = next(rm.parameters()).device
        out = []
        for start in range(0, len(seqs), self.max_rows):
            chunk = seqs[start:start + self.max_rows]
            rows = torch.zeros(len(chunk), max(len(x) for x in chunk), dtype=torch.long, device=device)
            for r, x in enumerate(chunk):
                rows[r, :len(x)] = torch.tensor(x, device=device)
            last = torch.tensor([len(x) - 1 for x in chunk], device=device)
            out.append(score_rows(rm, rows, last).float().cpu())
        return torch.cat(out)

    def _reference_logps(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self._frozen:
                self._frozen[0].chunk = self.loss_chunk_size
                return self._frozen[0](rows)
            return self._policy("reference", rows)

    def _policy(self, what: str, rows: torch.Tensor) -> torch.Tensor:
        """A no-grad forward of the policy (``forward(what=...)``) through the loop's wrapper when train_step set
        it: under FSDP the root's forward gathers the weights outside the blocks (embedding, norm, head)."""
        return (self._net or self)(rows, what=what)

    # -- one step -------------------------------------------------------------------------------
    @property
    def updates_per_rollout(self) -> int:
        return int(self.s.ppo_epochs) * int(self.s.num_mini_batches)

    @torch.no_grad()
    def collect(self, micro: list, step: int, autocast, positions: Optional[list] = None) -> dict:
        """The step's rollout on this rank: completions of every prompt of ``micro`` (this rank's micro batches of
        the step), their rewards, and what the loss compares with (reference and sampling log-probabilities, PPO's
        values, advantages and returns), as (N, ...) tensors over the rank's N completions, padded to its longest
        row. ``positions`` (one list per micro batch) place each prompt in the step's global batch (its seeds);
        default: one process's order. Each GRPO group is one prompt's, on one rank: its baseline is exact. PPO's
        advantages are whitened over the tokens of every rank's rollout (:func:`_all_ranks_sum`)."""
        G = self.G
        device = micro[0]["tokens"].device
        self.refresh_copy()
        prompts, completions, rewards = [], [], []
        start = 0
        for k, b in enumerate(micro):
            tokens, lengths, index = b["tokens"], b["lengths"], b["index"]
            ps = [tokens[i, :int(lengths[i])].tolist() for i in range(tokens.shape[0])]
            where = positions[k] if positions is not None else list(range(start, start + len(ps)))
            start += len(ps)
            cs = self.sample(ps, rollout=step, positions=where)
            rewards.append(self.rewards(index.tolist(), cs, ps))
            prompts += ps
            completions += cs
        rewards = torch.cat(rewards).to(device)
        N = len(completions)
        full = [prompts[j // G] + completions[j] for j in range(N)]
        T = max(2, max(len(f) for f in full))
        rows = torch.zeros(N, T, dtype=torch.long, device=device)
        mask = torch.zeros(N, T, dtype=torch.bool, device=device)
        for j, f in enumerate(full):
            rows[j, :len(f)] = torch.tensor(f, device=device)
            mask[j, len(prompts[j // G]):len(f)] = True
        exp = {"rows": rows, "mask": mask[:, 1:], "lengths": torch.tensor([len(f) for f in full], device=device),
               "rewards": rewards}
        ppo = self.method == "ppo"
        self.model.eval()
        if self.critic is not None:
            self.critic.eval()
        try:
            parts = {"ref": [], "old": [], "values": []}
            for start in range(0, N, self.max_rows):
                r = rows[start:start + self.max_rows]
                with autocast():
                    if float(self.s.beta) > 0:
                        parts["ref"].append(self._reference_logps(r))
                    if ppo or self.updates_per_rollout > 1:  # else the trained policy is the sampling one
                        parts["old"].append(self._policy("logps", r))
                    if ppo:
                        parts["values"].append(token_values(self.critic, r))
        finally:
            self.model.train()
            if self.critic is not None:
                self.critic.train()
        for key, values in parts.items():
            if values:
                exp[key] = torch.cat(values).float()
        s, m = self.sums, exp["mask"].float()
        s["n"] += N
        s["reward"] += float(rewards.sum())
        s["completion_length"] += float(m.sum())
        if G > 1:
            s["reward_std"] += float(rewards.view(-1, G).std(1).sum()) * G  # the mean within-group spread
        if ppo:
            ref = exp.get("ref", exp["old"])
            per_token = L.token_rewards(exp["old"], ref, rewards, exp["mask"], float(self.s.beta),
                                        bool(self.s.absolute_kl))
            adv, returns = L.gae(per_token, exp["values"], exp["mask"], float(self.s.gamma), float(self.s.lam))
            if self.s.normalize_advantages:
                adv = L.whiten(adv, exp["mask"], reduce=_all_ranks_sum())
            exp["advantages"], exp["returns"] = adv, returns
            n_tok = m.sum(-1).clamp(min=1)
            s["kl"] += float((((exp["old"] - ref) * m).sum(-1) / n_tok).sum())  # k1 per token, as the penalty
            s["value"] += float(((exp["values"] * m).sum(-1) / n_tok).sum())
            s["return"] += float(((returns * m).sum(-1) / n_tok).sum())
        else:
            exp["advantages"] = L.group_advantages(rewards.view(-1, G), self.method).reshape(-1)
        return exp

    def forward(self, idx: torch.Tensor, what: str = "loss") -> torch.Tensor:
        """What :meth:`train_step` calls through the loop's model (DDP around this objective averages the policy's
        gradients in the backward pass; under FSDP the root's forward gathers its weights): ``loss``, the summed
        loss of completions ``idx`` of the rollout being trained on (:meth:`loss`); ``logps``, the per-token
        log-probabilities of rows ``idx`` (N, T); ``reference``, the same with the adapters off (PEFT). The rollout
        is an attribute, not an argument: FSDP would cast its float tensors to the compute dtype."""
        if what == "loss":
            return self.loss(self._exp, idx)
        if what == "reference":
            from lmforge.peft import adapters_disabled

            with adapters_disabled(self.model):
                return token_logps(self.model, idx, chunk=self.loss_chunk_size)
        return token_logps(self.model, idx, chunk=self.loss_chunk_size)

    def loss(self, exp: dict, idx: torch.Tensor) -> torch.Tensor:
        """The summed loss of the completions ``idx`` of the rollout ``exp`` (with their statistics)."""
        T = int(exp["lengths"][idx].max())
        rows, m = exp["rows"][idx, :T], exp["mask"][idx, :T - 1]
        logps, entropy = token_logps(self.model, rows, entropy=True, chunk=self.loss_chunk_size)
        old = exp["old"][idx, :T - 1] if "old" in exp else logps.detach()
        s, mf = self.sums, m.float()
        n_tok = float(mf.sum())
        if self.method == "ppo":
            surrogate, clipped = L.clipped_surrogate(logps, old, exp["advantages"][idx, :T - 1],
                                                     float(self.s.cliprange))
            pg = (surrogate * mf).sum(-1) / mf.sum(-1).clamp(min=1.0)
            values = token_values(self.critic, rows)
            vl, vclipped = L.value_losses(values, exp["values"][idx, :T - 1], exp["returns"][idx, :T - 1], m,
                                          float(self.s.cliprange_value))
            losses = pg + float(self.s.vf_coef) * vl
            s["policy_loss"] += float(pg.detach().sum())
            s["policy_loss#n"] += len(idx)
            s["value_loss"] += float(vl.detach().sum())
            s["value_loss#n"] += len(idx)
            s["vf_clipfrac"] += float((vclipped & m).sum())
            s["vf_clipfrac#n"] += n_tok
        else:
            ref = exp["ref"][idx, :T - 1] if "ref" in exp else logps.detach()  # beta 0: no KL term
            losses, kl = L.policy_losses(logps, old, ref, exp["advantages"][idx], m, float(self.s.beta),
                                         float(self.s.cliprange))
            _, clipped = L.clipped_surrogate(logps.detach(), old, exp["advantages"][idx], float(self.s.cliprange))
            s["kl"] += float(kl.sum())
            s["kl#n"] += len(idx)
        d = (logps.detach() - old) * mf
        s["clipfrac"] += float((clipped & m).sum())  # tokens whose clipped term was taken
        s["clipfrac#n"] += n_tok
        s["approx_kl"] += float(0.5 * (d ** 2).sum())  # to the sampling policy, per token
        s["approx_kl#n"] += n_tok
        s["entropy"] += float((entropy * mf).sum())
        s["entropy#n"] += n_tok
        return losses.sum()

    def train_step(self, trainer, batches, step: int):
        """One step of the loop: a rollout of the step's prompts, then ``ppo_epochs`` x ``num_mini_batches``
        optimizer steps over it. Returns (the mean loss over the optimizer steps, the last gradient norm).

        Data parallel (``trainer.dims.dp`` ranks): each rank samples, scores and trains on its own share of the
        step's prompts (:class:`~lmforge.train.loop.MicroBatches`), and each of its mini batches is its share of
        the global one (``num_mini_batches`` per pass on every rank). The losses are means over completions, so
        the policy's gradients averaged by DDP over equal shares are those of one process over the global batch;
        the critic's (not wrapped by DDP) are averaged here. With one optimizer step per rollout (the defaults),
        N ranks x B prompts give one process's update on N x B prompts; with more, each rank shuffles its own
        completions into its shares of the mini batches."""
        import torch.distributed as dist

        from lmforge.train.optim import set_lr

        self.model.train()
        dims, mbs = trainer.dims, int(trainer.s.micro_batch_size)
        micro = list(batches.for_step(step))
        positions = []  # each prompt's place in the step's global batch (MicroBatches' order): its seeds
        for k, b in enumerate(micro):
            first = (k * dims.dp + dims.dp_rank) * mbs
            positions.append(list(range(first, first + int(b["tokens"].shape[0]))))
        self._net = trainer.model
        self._shard_reference(trainer)
        exp = self.collect(micro, step, trainer.autocast, positions)
        self._exp = exp
        N = int(exp["rows"].shape[0])
        trainer.last_step_samples = sum(int(b["tokens"].shape[0]) for b in micro) * dims.dp  # equal shares
        trainer.last_step_tokens = N * dims.dp  # what count() counts: completions
        # tokens_trained: the sampled completion tokens (those the policy loss reads), over all ranks
        trainer.last_step_trained_tokens = int(trainer._all_reduce([float(exp["mask"].sum())])[0])
        trainer.last_step_counts = None  # known on the host
        lr = trainer.schedule.lr_at(step)
        set_lr(trainer.opt, lr)
        if self.critic_optimizer is not None:
            set_lr(self.critic_optimizer, lr * self.critic_lr_scale)
        K = int(self.s.num_mini_batches)
        size = N // K
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        losses, grad_norm = [], None
        for _ in range(int(self.s.ppo_epochs)):
            order = torch.randperm(N, generator=g) if self.updates_per_rollout > 1 else torch.arange(N)
            for k in range(K):
                mini = order[k * size:(k + 1) * size].to(exp["rows"].device)
                total = torch.zeros((), dtype=torch.float64, device=exp["rows"].device)
                starts = list(range(0, size, self.max_rows))
                for start in starts:
                    with trainer._gradient_sync(start == starts[-1]):  # DDP reduces after the last chunk (FSDP: every chunk)
                        with trainer.autocast():
                            loss_sum = trainer.model(mini[start:start + self.max_rows])
                        loss = loss_sum / size
                        if trainer.scaler is not None:
                            trainer.scaler.scale(loss).backward()
                        else:
                            loss.backward()
                    total += loss_sum.detach().double()
                if self.critic is not None and dims.dp > 1:
                    from lmforge.parallel.ddp import average_gradients

                    average_gradients([p for p in self.critic.parameters() if p.requires_grad], None, dims.dp)
                grad_norm = self._optimizer_step(trainer)
                losses.append(total / size)
        self._exp = None
        loss = torch.stack(losses).mean()
        if trainer.rt.distributed:  # the mean over the ranks' equal shares
            dist.all_reduce(loss)
            loss = loss / dims.dp
        return loss, grad_norm

    def _shard_reference(self, trainer) -> None:
        """Under FSDP, shard the frozen reference as the policy is (its blocks, then the whole as the root, over the
        policy's mesh, computing in the run's precision), once, at the first step: each rank then holds its share of
        the starting weights. Every rank runs the same number of reference forwards (equal shares of the rollout,
        in chunks of ``max_rows``), so the gathers pair up."""
        if not self._frozen or getattr(self._frozen[0], "sharded", False) or not _sharded(self.model):
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from lmforge.parallel.tensor import blocks_of

        ref = self._frozen[0]
        mesh = next(p for p in self.model.parameters() if hasattr(p, "device_mesh")).device_mesh
        mp = MixedPrecisionPolicy(param_dtype=trainer.amp_dtype)
        for block in blocks_of(ref.net):  # nothing comes back through them: freed after each forward
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(ref, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        ref.sharded = True

    def _optimizer_step(self, trainer):
        """Clip the policy's and the critic's gradients together (one norm) and step both optimizers."""
        optimizers = [trainer.opt] + ([self.critic_optimizer] if self.critic_optimizer is not None else [])
        scaler = trainer.scaler
        if scaler is not None:
            for opt in optimizers:
                scaler.unscale_(opt)
        grad_norm = None
        clip = trainer.s.gradient_clip_val
        if clip and clip > 0:
            groups = [[p for p in trainer.raw_model.parameters() if p.requires_grad]]
            if self.critic is not None:
                groups.append([p for p in self.critic.parameters() if p.requires_grad])
            grad_norm = clip_together(groups, clip)
        for opt in optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return grad_norm
