"""The parallel layout: one object, built once from the world size, that every consumer reads.

Modelled on torchtitan's ``ParallelDims``: the data sampler (its data-parallel rank and size),
the microbatch count, the optimizer's gradient-reduction group and the loss average all ask the
layout, never ``WORLD_SIZE`` or the global rank. Today the layout has one dimension, data
parallel over every rank ("dp"); a tensor- or pipeline-parallel dimension becomes a new field
and a new mesh dimension here, and the consumers keep asking the same questions.

``plan_layout`` checks the layout before any process group exists (a ConfigError naming the
field); ``with_mesh`` attaches the ``DeviceMesh`` once the group exists. A 1-D mesh over every
rank reuses the default process group (no new group is created).
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

DIM_NAMES = ("dp",)  # the mesh's dimensions, outermost first


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int  # global rank
    dp_size: int  # data-parallel ranks: each reads its own slice of the global batch
    dp_rank: int
    mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)  # once a process group exists

    @property
    def dp_group(self) -> ProcessGroup | None:
        """The data-parallel process group (gradients, loss average); None for a single rank."""
        if self.dp_size == 1:
            return None
        if self.mesh is None:
            raise RuntimeError("ParallelDims.dp_group: no DeviceMesh; call with_mesh once the group exists")
        return self.mesh.get_group("dp")

    def microbatches(self, train: TrainingConfig, global_batch_size: int | None = None) -> int:
        """Microbatches per iteration on this rank; ``global_batch_size`` overrides the config's (a ramp)."""
        if global_batch_size is not None and global_batch_size != train.global_batch_size:
            train = TrainingConfig(train_iters=1, global_batch_size=global_batch_size,
                                   micro_batch_size=train.micro_batch_size)
        return check_world(train, self.dp_size)


def plan_layout(train: TrainingConfig, world_size: int, rank: int = 0) -> ParallelDims:
    """The layout of ``world_size`` ranks; ConfigError when the batch does not split over it."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"WORLD_SIZE ({world_size}) must be >= 1 and RANK ({rank}) in [0, {world_size})")
    dims = ParallelDims(world_size=world_size, rank=rank, dp_size=world_size, dp_rank=rank)
    dims.microbatches(train)  # every batch size of the run (ramp included) must split over dp
    return dims


def with_mesh(dims: ParallelDims, device_type: str) -> ParallelDims:
    """``dims`` with its ``DeviceMesh`` (call after ``init_process_group``; no-op for one rank)."""
    if dims.world_size == 1:
        return dims
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dims.dp_size,), mesh_dim_names=DIM_NAMES)
    if mesh.get_local_rank("dp") != dims.dp_rank:
        raise RuntimeError(f"DeviceMesh puts rank {dims.rank} at dp rank {mesh.get_local_rank('dp')}, "
                           f"the layout at {dims.dp_rank}")
    return dataclasses.replace(dims, mesh=mesh)


def single_process() -> ParallelDims:
    """The layout of one process without a group (tests, benchmarks)."""
    return ParallelDims(world_size=1, rank=0, dp_size=1, dp_rank=0)
