"""The parallel layout: one object, built once from the world size and the config, that every consumer reads.

Modelled on torchtitan's ``ParallelDims``: the data sampler (its data-parallel rank and size),
the microbatch count, the optimizer's gradient-reduction group, the loss average, the model's
sharding and the checkpointer all ask the layout, never ``WORLD_SIZE`` or the global rank.

Two engines:

- anneal's native one (``dist.use_torch_fsdp2=false``): pure data parallel over every rank, a 1-D
  mesh ``("dp",)`` that reuses the default process group; the flat optimizer (replicated, ZeRO-1 or
  Apex) reduces gradients inside ``step()``.
- PyTorch's (``dist.use_torch_fsdp2=true``): a mesh ``("dp_replicate", "dp_shard", "tp")``, tensor
  parallel innermost (neighbouring ranks, as torchtitan), FSDP2 over ``dp_shard`` and HSDP when
  ``dp_replicate > 1``; ``"dp"`` is the two data-parallel dimensions flattened. Ranks of one
  tensor-parallel group read the same data.

``plan_layout`` checks the layout before any process group exists (a ConfigError naming the
field); ``with_mesh`` attaches the ``DeviceMesh`` once the group exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from anneal.config.container import check_world
from anneal.config.training import TrainingConfig
from anneal.errors import ConfigError

if TYPE_CHECKING:  # torch.distributed is imported only where a mesh is built
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

DIM_NAMES = ("dp",)  # the native engine's mesh
TORCH_DIM_NAMES = ("dp_replicate", "dp_shard", "tp")  # PyTorch's engine, outermost first
# Tensor parallel's plan for a Qwen3 block (anneal.parallelize applies it, anneal.planner sizes it):
COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")
TP_PARTIAL = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # per-head norms: gradients summed over tp


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int  # global rank
    dp_size: int  # data-parallel ranks: each reads its own slice of the global batch
    dp_rank: int
    tp_size: int = 1  # model.tensor_model_parallel_size
    dp_replicate: int = 1  # HSDP replicas (dist.data_parallel_replicate_degree)
    fsdp: bool = False  # PyTorch's engine: FSDP2 over the data-parallel dimensions
    mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)  # once a process group exists
    # PyTorch's engine: the data-parallel group (dp_replicate × dp_shard, one per tp rank), built with
    # torch.distributed's public subgroups rather than a flattened mesh dimension
    dp_process_group: ProcessGroup | None = field(default=None, compare=False, repr=False)

    @property
    def dp_shard(self) -> int:
        """Ranks one FSDP2 group shards over (1 on the native engine)."""
        return self.dp_size // self.dp_replicate if self.fsdp else 1

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_group(self) -> ProcessGroup | None:
        """The data-parallel process group (gradients, loss average); None for a single rank."""
        if self.dp_size == 1:
            return None
        if self.fsdp:
            if self.dp_process_group is None:
                raise RuntimeError("ParallelDims: no data-parallel group; call with_mesh once the group exists")
            return self.dp_process_group
        return self._mesh("dp").get_group()

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self._mesh("tp")

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """What ``fully_shard`` shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP."""
        return self._mesh("dp_replicate", "dp_shard") if self.dp_replicate > 1 else self._mesh("dp_shard")

    def describe(self) -> str:
        if not self.fsdp:
            return f"data parallel {self.dp_size} (native)"
        parts = [f"FSDP2 {self.dp_shard}"]
        if self.dp_replicate > 1:
            parts = [f"HSDP {self.dp_replicate}×{self.dp_shard}"]
        if self.tp_size > 1:
            parts.append(f"TP {self.tp_size}")
        return " × ".join(parts)

    def _mesh(self, *names: str) -> DeviceMesh:
        if self.mesh is None:
            raise RuntimeError("ParallelDims: no DeviceMesh; call with_mesh once the group exists")
        return self.mesh[names[0] if len(names) == 1 else names]

    def microbatches(self, train: TrainingConfig, global_batch_size: int | None = None) -> int:
        """Microbatches per iteration on this rank; ``global_batch_size`` overrides the config's (a ramp)."""
        if global_batch_size is not None and global_batch_size != train.global_batch_size:
            train = TrainingConfig(train_iters=1, global_batch_size=global_batch_size,
                                   micro_batch_size=train.micro_batch_size)
        return check_world(train, self.dp_size)


def plan_layout(train: TrainingConfig, world_size: int, rank: int = 0, *, tp: int = 1, fsdp: bool = False,
                replicate: int = 1) -> ParallelDims:
    """The layout of ``world_size`` ranks; ConfigError when the ranks or the batch do not split over it.

    ``tp`` is ``model.tensor_model_parallel_size``, ``fsdp`` ``dist.use_torch_fsdp2`` and ``replicate``
    ``dist.data_parallel_replicate_degree``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"WORLD_SIZE ({world_size}) must be >= 1 and RANK ({rank}) in [0, {world_size})")
    if world_size % tp:
        raise ConfigError(f"model.tensor_model_parallel_size ({tp}) must divide the world size ({world_size})")
    dp_size = world_size // tp
    if dp_size % replicate:
        raise ConfigError(f"dist.data_parallel_replicate_degree ({replicate}) must divide the data-parallel "
                          f"size ({dp_size} = world size {world_size} / tensor parallel {tp})")
    dims = ParallelDims(world_size=world_size, rank=rank, dp_size=dp_size, dp_rank=rank // tp, tp_size=tp,
                        dp_replicate=replicate, fsdp=fsdp)
    dims.microbatches(train)  # every batch size of the run (ramp included) must split over dp
    return dims


def with_mesh(dims: ParallelDims, device_type: str) -> ParallelDims:
    """``dims`` with its ``DeviceMesh`` (call after ``init_process_group``; no-op for one native rank)."""
    if dims.world_size == 1 and not dims.fsdp:
        return dims
    from torch.distributed.device_mesh import init_device_mesh

    if not dims.fsdp:
        mesh = init_device_mesh(device_type, (dims.dp_size,), mesh_dim_names=DIM_NAMES)
        return _checked(dataclasses.replace(dims, mesh=mesh))
    shape = (dims.dp_replicate, dims.dp_shard, dims.tp_size)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=TORCH_DIM_NAMES)
    return _checked(dataclasses.replace(dims, mesh=mesh, dp_process_group=_dp_subgroup(dims)))


def _dp_subgroup(dims: ParallelDims) -> ProcessGroup | None:
    """This rank's data-parallel group: the ranks of its tp index (tp is innermost), in dp order."""
    if dims.dp_size == 1:
        return None
    import torch.distributed as dist

    groups = [list(range(t, dims.world_size, dims.tp_size)) for t in range(dims.tp_size)]
    group, _ = dist.new_subgroups_by_enumeration(groups)
    return group


def _checked(dims: ParallelDims) -> ParallelDims:
    """``dims`` once its data-parallel group agrees with the layout's dp rank."""
    group = dims.dp_group
    if group is not None:
        import torch.distributed as dist

        if dist.get_rank(group) != dims.dp_rank:
            raise RuntimeError(f"the data-parallel group puts rank {dims.rank} at dp rank "
                               f"{dist.get_rank(group)}, the layout at {dims.dp_rank}")
    return dims


def single_process() -> ParallelDims:
    """The layout of one process without a group (tests, benchmarks)."""
    return ParallelDims(world_size=1, rank=0, dp_size=1, dp_rank=0)
