"""The two collectives of a flat-buffer ZeRO-1 step, each with the fastest form per backend.

Gradients are summed (the 1/world average is folded into the update kernel's ``grad_scale``) and
updated parameter shards are sent to every rank. With NCCL that is reduce-scatter and
all-gather into the flat buffers. Gloo's reduce-scatter and all-gather are 3x and 5x slower here
than its all-reduce and than one broadcast per owner (200 MB, 2 ranks: reduce_scatter 650 ms vs
all_reduce 220 ms; all_gather_into_tensor 460-520 ms vs 2 broadcasts 95 ms), so on gloo the
gradients are all-reduced (each rank reads its shard) and each owner broadcasts its shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from anneal.optim.flat_layout import FlatLayout


def world_of(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) without one."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def uses_gloo(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.get_backend(group) == "gloo"


def collective_names(group: dist.ProcessGroup | None, sharded: bool) -> str:
    if world_of(group)[0] == 1:
        return "none"
    if not sharded:
        return "all_reduce"
    return "all_reduce + broadcast" if uses_gloo(group) else "reduce_scatter + all_gather"


def reduce_gradients(
    flat_grad: torch.Tensor, layout: FlatLayout, group: dist.ProcessGroup | None, sharded: bool
) -> None:
    """Sum gradients over ``group``; afterwards this rank's shard (all of it if not sharded) holds the sum."""
    if world_of(group)[0] == 1:
        return
    if sharded and not uses_gloo(group):
        lo, hi = layout.shard_bounds(layout.rank)
        dist.reduce_scatter_tensor(flat_grad[lo:hi], flat_grad, group=group)
    else:
        dist.all_reduce(flat_grad, group=group)


def gather_parameters(flat_param: torch.Tensor, layout: FlatLayout, group: dist.ProcessGroup | None) -> None:
    """Give every rank every shard of the flat parameter buffer (after a sharded update)."""
    world = world_of(group)[0]
    if world == 1:
        return
    if not uses_gloo(group):
        lo, hi = layout.shard_bounds(layout.rank)
        dist.all_gather_into_tensor(flat_param, flat_param[lo:hi], group=group)
        return
    works = []
    for owner in range(world):
        lo, hi = layout.shard_bounds(owner)
        src = dist.get_global_rank(group, owner)
        works.append(dist.broadcast(flat_param[lo:hi], src=src, group=group, async_op=True))
    for work in works:
        work.wait()


def broadcast_from_first(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Make ``tensor`` equal on all ranks of ``group`` (group rank 0's values), as DDP does at start."""
    if world_of(group)[0] > 1:
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    if world_of(group)[0] > 1:
        dist.all_reduce(tensor, group=group)
