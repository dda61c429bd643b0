"""The parallel layout: checked before any group exists, and the one source of data-parallel rank and size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from anneal.config.training import TrainingConfig
from anneal.errors import ConfigError
from anneal.parallel import ParallelDims, plan_layout, single_process, with_mesh
from anneal.context import DistContext
from anneal.training.distributed import all_reduce_mean


def _train(**overrides) -> TrainingConfig:
    return TrainingConfig(**{"train_iters": 10, "global_batch_size": 16, "micro_batch_size": 2, **overrides})


def test_pure_data_parallel_layout_of_four_ranks() -> None:
    dims = plan_layout(_train(), 4, rank=3)
    assert (dims.world_size, dims.rank, dims.dp_size, dims.dp_rank) == (4, 3, 4, 3)
    assert dims.microbatches(_train()) == 2  # 16 / (2 × 4)
    assert dims.microbatches(_train(), global_batch_size=8) == 1  # a ramp's smaller batch


@pytest.mark.parametrize(("train", "world", "message"), [
    (_train(), 3, r"train.global_batch_size \(16\) must be divisible by train.micro_batch_size \(2\) × "
                  r"data-parallel size \(3\) = 6"),
    (_train(rampup_batch_size=[4, 4, 100]), 4, r"train.global_batch_size \(4\) must be divisible .* "
                                              r"\(this batch size comes from train.rampup_batch_size\)"),
    (_train(), 0, r"WORLD_SIZE \(0\) must be >= 1"),
])
def test_a_layout_that_cannot_split_the_batch_is_refused_before_any_group(train, world, message) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_layout(train, world)
    assert not dist.is_initialized()


def test_one_rank_has_no_group_and_averages_nothing() -> None:
    dims = with_mesh(single_process(), "cpu")
    assert dims.mesh is None and dims.dp_group is None
    assert all_reduce_mean(torch.tensor(3.0), dims) == 3.0


def test_a_hand_built_context_is_pure_data_parallel_without_a_mesh() -> None:
    ctx = DistContext(1, 2, 1, torch.device("cpu"), "gloo")
    assert ctx.parallel == ParallelDims(world_size=2, rank=1, dp_size=2, dp_rank=1)
    with pytest.raises(RuntimeError, match="no DeviceMesh"):
        ctx.parallel.dp_group  # never silently the wrong group


def _ranks_read_their_layout(rank: int, world: int) -> None:
    from anneal.data.loader import microbatch_samples

    dims = with_mesh(plan_layout(_train(), world, rank), "cpu")
    assert dims.mesh.mesh_dim_names == ("dp",) and dims.dp_group == dist.group.WORLD  # no new group
    assert all_reduce_mean(torch.tensor(float(rank)), dims).item() == 0.5
    mine = microbatch_samples(consumed_samples=16, microbatch=1, micro_batch_size=2, dp_rank=dims.dp_rank,
                              dp_size=dims.dp_size)
    seen = [None] * world
    dist.all_gather_object(seen, mine.tolist(), group=dims.dp_group)
    assert seen == [[20, 21], [22, 23]]  # round 1 of the batch at sample 16, split in rank order


@pytest.mark.slow
def test_two_gloo_ranks_build_a_dp_mesh_and_read_rank_and_size_from_it() -> None:
    from optim.optim_helpers import run_distributed

    run_distributed(_ranks_read_their_layout, 2)
