"""How the processes of a run are arranged: the one source of the data-parallel size and rank.

    world_size = pipeline x data_parallel x context x tensor   (tensor fastest, as in Megatron and torchtitan)
    data_parallel = dp_replicate x dp_shard                      (HSDP: replicate across nodes, shard inside one)
    expert parallel: the experts of a MoE layer spread over ``ep`` data-parallel ranks (ep divides dp)

:class:`ParallelDims` is built from the config (``trainer.devices``, ``trainer.num_nodes``,
``model.tensor_model_parallel_size``, ``model.pipeline_model_parallel_size``, ``model.context_parallel_size``,
``model.expert_model_parallel_size``, ``model.fsdp``, ``model.fsdp_sharding_strategy``) and, at run time, checked against the world torchrun launched. The batch
plan, the sampler, the loss scaling, the metrics and the checkpoint all read ``dp`` and ``dp_rank`` from it;
nothing else divides by the world size.

Tensor (:mod:`lmforge.parallel.tensor`), pipeline (:mod:`lmforge.parallel.pipeline`) and data parallelism
(replicated, or sharded with FSDP) compose in any product that divides the world; context parallelism
(:mod:`lmforge.parallel.context`) runs alone or beside data parallelism (DDP, FSDP full/grad); expert
parallelism (:mod:`lmforge.parallel.expert`) beside data parallelism (DDP, FSDP full/grad) only for now;
:meth:`ParallelDims.check_supported` refuses what is not built yet before a stage does any work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from lmforge.errors import ConfigError

# model.fsdp_sharding_strategy values (NeMo's names) and what each shards.
FSDP_STRATEGIES = {
    "full": "parameters, gradients and optimizer state sharded over all data-parallel ranks (ZeRO-3)",
    "grad": "gradients and optimizer state sharded; parameters stay gathered from forward to backward (ZeRO-2)",
    "hybrid": "fully sharded inside a node (trainer.devices ranks), replicated across nodes (HSDP)",
}


@dataclass(frozen=True)
class ParallelDims:
    """The layout of one run.

    Args:
        world_size: processes in the run (``trainer.devices x trainer.num_nodes``).
        rank: this process's global rank (0 when only planning).
        tp, pp: tensor- and pipeline-parallel sizes.
        cp: context-parallel size (each rank of a group holds a part of every sequence).
        ep: expert-parallel size (the experts of a MoE layer spread over ``ep`` data-parallel ranks).
        fsdp: None (replicated data parallelism, DDP) or one of :data:`FSDP_STRATEGIES`.
        devices_per_node: ``trainer.devices``; the shard group of ``fsdp="hybrid"``.
    """

    world_size: int
    rank: int = 0
    tp: int = 1
    pp: int = 1
    fsdp: Optional[str] = None
    devices_per_node: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self):
        for key, value in (("world size", self.world_size), ("model.tensor_model_parallel_size", self.tp),
                           ("model.pipeline_model_parallel_size", self.pp),
                           ("model.context_parallel_size", self.cp), ("model.expert_model_parallel_size", self.ep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if self.world_size % (self.tp * self.pp * self.cp):
            raise ConfigError(
                f"{self.world_size} processes cannot be split into tensor x pipeline x context parallel groups of "
                f"{self.tp} x {self.pp} x {self.cp} = {self.tp * self.pp * self.cp}: the world size must be a "
                f"multiple of model.tensor_model_parallel_size x model.pipeline_model_parallel_size x "
                f"model.context_parallel_size")
        if self.dp % self.ep:
            raise ConfigError(
                f"model.expert_model_parallel_size={self.ep} must divide the data-parallel size {self.dp} (experts "
                f"are spread over data-parallel ranks: world {self.world_size} / (tensor {self.tp} x pipeline "
                f"{self.pp} x context {self.cp}))")
        if self.fsdp is not None and self.fsdp not in FSDP_STRATEGIES:
            raise ConfigError(f"model.fsdp_sharding_strategy={self.fsdp!r} is not known; use one of "
                              f"{', '.join(FSDP_STRATEGIES)}")
        if self.fsdp == "hybrid" and self.dp % self.devices_per_node:
            raise ConfigError(
                f"model.fsdp_sharding_strategy=hybrid shards inside a node of trainer.devices="
                f"{self.devices_per_node} ranks, but the data-parallel size {self.dp} is not a multiple of it")

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Data-parallel size: the number of model replicas (shards of one replica count once)."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def dp_shard(self) -> int:
        """Ranks one replica's parameters are sharded over (1 without FSDP)."""
        if self.fsdp is None:
            return 1
        return self.devices_per_node if self.fsdp == "hybrid" else self.dp

    @property
    def dp_replicate(self) -> int:
        """Replicas whose gradients are averaged (all of dp under DDP, the nodes under HSDP)."""
        return self.dp // self.dp_shard

    @property
    def dp_rank(self) -> int:
        """This process's index among the data-parallel ranks (which samples it reads)."""
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def cp_rank(self) -> int:
        """This process's index in its context-parallel group (which part of each sequence it holds)."""
        return (self.rank // self.tp) % self.cp

    @property
    def pp_rank(self) -> int:
        """This process's pipeline stage group (ranks ordered pipeline, data, context, tensor: tensor fastest)."""
        return self.rank // (self.dp * self.cp * self.tp)

    @property
    def non_data_parallel(self) -> int:
        """Processes that hold one data-parallel rank's samples together: tensor x pipeline x context."""
        return self.tp * self.pp * self.cp

    @property
    def is_sharded(self) -> bool:
        return self.fsdp is not None

    # -- checks and meshes ------------------------------------------------------------------------
    def check_supported(self) -> None:
        """Refuse what lmforge cannot run yet, before any work."""
        if self.cp > 1:  # context parallelism (lmforge.parallel.context): beside data parallelism only
            from lmforge.parallel.context import context_parallel_problems

            problems = context_parallel_problems(None, self.cp, tp=self.tp, pp=self.pp, ep=self.ep, fsdp=self.fsdp)
            if problems:
                raise ConfigError(problems[0])
        problem = self.expert_parallel_problem()
        if problem:
            raise ConfigError(problem)

    def expert_parallel_problem(self) -> Optional[str]:
        """Why this layout cannot run expert parallelism (None: it can, or ``ep`` is 1). Expert parallelism
        (:mod:`lmforge.parallel.expert`) is built beside data parallelism: replicated (DDP) or FSDP full / grad."""
        if self.ep == 1:
            return None
        key = f"model.expert_model_parallel_size={self.ep}"
        if self.fsdp == "hybrid":
            return (f"{key} with model.fsdp_sharding_strategy=hybrid is not supported yet: use full or grad (experts "
                    f"are sharded over the ranks holding the same experts, the rest over all data-parallel ranks)")
        for other, size in (("model.tensor_model_parallel_size", self.tp), ("model.pipeline_model_parallel_size", self.pp),
                            ("model.context_parallel_size", self.cp)):
            if size > 1:
                return (f"{key} with {other}={size} is not supported yet: expert parallelism combines with data "
                        f"parallelism only; set one of them to 1")
        return None

    def check_world(self, launched_world_size: int, launched_rank: int) -> "ParallelDims":
        """This layout for the process torchrun started; ConfigError when the world differs from the plan."""
        from lmforge.config.batch import check_world_size

        check_world_size(self.devices_per_node, max(1, self.world_size // self.devices_per_node), launched_world_size)
        return ParallelDims(self.world_size, launched_rank, self.tp, self.pp, self.fsdp, self.devices_per_node,
                            self.cp, self.ep)

    def build_mesh(self, device_type: str):
        """The run's DeviceMesh, ``(pp, dp_replicate, dp_shard, cp, tp)`` with the dimensions of size 1 left out
        (at least ``dp_shard``): tensor parallel innermost, so a tensor-parallel group is consecutive ranks (one node).

        Only called for FSDP, tensor-, pipeline- or context-parallel runs (DDP alone needs no mesh);
        torch.distributed must be initialised. Take the FSDP mesh with :meth:`fsdp_mesh`, the tensor-parallel one
        as ``mesh["tp"]``, the context-parallel one as ``mesh["cp"]``.
        """
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = [], []
        if self.pp > 1:
            shape.append(self.pp)
            names.append("pp")
        if self.fsdp == "hybrid" and self.dp_replicate > 1:
            shape.append(self.dp_replicate)
            names.append("dp_replicate")
        shape.append(self.dp_shard if self.fsdp is not None else self.dp)
        names.append("dp_shard")
        if self.cp > 1:
            shape.append(self.cp)
            names.append("cp")
        if self.tp > 1:
            shape.append(self.tp)
            names.append("tp")
        return init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))

    @staticmethod
    def fsdp_mesh(mesh):
        """The data-parallel part of :meth:`build_mesh`'s mesh: what FSDP shards (and HSDP replicates) over.

        With context parallelism, ``dp_shard x cp`` flattened into one dimension (torchtitan's ``dp_shard_cp``):
        the ranks of a context-parallel group hold the same parameters, so FSDP shards them over both (and
        averages the gradients over both: the training loop scales the loss by ``cp`` for that)."""
        names = mesh.mesh_dim_names
        if "cp" in names:  # HSDP beside context parallelism is refused (check_supported)
            return mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        if "dp_replicate" in names:
            return mesh["dp_replicate", "dp_shard"]
        return mesh["dp_shard"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rank")
        d.update(dp=self.dp, dp_shard=self.dp_shard, dp_replicate=self.dp_replicate)
        return d

    def describe(self) -> str:
        """One line for the start-of-run log: ``4 processes: data parallel 4 (FSDP full: ...)``."""
        text = f"{self.world_size} process(es): data parallel {self.dp}"
        if self.tp > 1 or self.pp > 1 or self.cp > 1 or self.ep > 1:
            text += f", tensor parallel {self.tp}, pipeline parallel {self.pp}"
            text += f", context parallel {self.cp}" if self.cp > 1 else ""
            text += f", expert parallel {self.ep}" if self.ep > 1 else ""
        if self.fsdp is not None:
            text += f" (FSDP {self.fsdp}: {FSDP_STRATEGIES[self.fsdp]})"
        return text


def fsdp_strategy(enabled, strategy) -> Optional[str]:
    """NeMo's ``model.fsdp`` + ``model.fsdp_sharding_strategy`` -> None or a key of :data:`FSDP_STRATEGIES`."""
    if not enabled:
        return None
    return "full" if strategy is None else str(strategy).lower()  # ParallelDims refuses an unknown name
