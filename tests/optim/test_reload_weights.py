"""Weights loaded into a built model survive the optimizer's first step (issue 11, defect 1).

Under bf16/fp16 the optimizer keeps fp32 master copies taken when it was built. A finetune or a
``checkpoint.load_optim=false`` resume writes the model's weights afterwards, so the optimizer
must refresh its masters from them (``reload_model_params``) or its first step writes the old
weights back. Each case: train a few steps and save with the real ``Checkpointer``; build a
model from other initial weights and load that checkpoint; one step at lr 0 must leave every
parameter equal to the checkpoint's. One process (no group) here, two gloo ranks in one spawn.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from optim_helpers import FLAGS, SCHEDULE, TinyLM, batches, config, lm_loss, run_distributed, train

from anneal.checkpoint.checkpointer import Checkpointer
from anneal.config.runtime import CheckpointConfig
from anneal.optim import setup_optimizer
from anneal.context import DistContext, TrainState

DTYPES = ("fp32", "bf16", "fp16")  # fp32: the master is the parameter itself (a control)
MODES = ("finetune", "no_optim")
BACKENDS = (False, True)  # use_distributed_optimizer: replicated flat, native ZeRO-1
CASES = list(itertools.product(DTYPES, MODES, BACKENDS))


def _ctx(world: int) -> DistContext:
    rank = dist.get_rank() if world > 1 else 0
    return DistContext(rank, world, rank, torch.device("cpu"), "gloo" if world > 1 else None)


def _build(dtype: str, distributed: bool, seed: int, world: int):
    # A static loss scale: fp16's dynamic scale (2**32) would skip the step, which hides the bug.
    overrides = {"use_distributed_optimizer": distributed, "bf16": dtype == "bf16", "fp16": dtype == "fp16"}
    if dtype == "fp16":
        overrides["loss_scale"] = 128.0
    model = TinyLM(seed=seed)
    group = dist.group.WORLD if world > 1 else None
    optimizer, scheduler = setup_optimizer(
        config(**overrides), FLAGS, model, schedule=SCHEDULE, dp_group=group
    )
    return model, optimizer, scheduler


def _checkpointer(cfg: CheckpointConfig, parts, world: int) -> Checkpointer:
    model, optimizer, scheduler = parts
    return Checkpointer(
        cfg,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ctx=_ctx(world),
        config_yaml="{}\n",
        report=lambda _: None,
    )


def _check_case(directory: Path, case: tuple[str, str, bool], rank: int, world: int) -> None:
    dtype, mode, distributed = case
    data = batches(4)
    trained = _build(dtype, distributed, seed=0, world=world)
    train(*trained, data, range(3), rank, world)
    _checkpointer(CheckpointConfig(save=str(directory)), trained, world).save(TrainState(iteration=3))
    saved = {n: p.detach().clone() for n, p in trained[0].named_parameters()}
    fresh = _build(dtype, distributed, seed=1, world=world)
    load = CheckpointConfig(load=str(directory), finetune=mode == "finetune", load_optim=mode != "no_optim")
    _checkpointer(load, fresh, world).load()
    model, optimizer, _ = fresh
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.zero_grad()
    optimizer.scale_loss(lm_loss(model, data[3].chunk(world)[rank])).backward()
    assert not optimizer.step().skipped
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), saved[name]), (
            f"{case} rank {rank}: {name} moved off the checkpoint"
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'zero1' if c[2] else 'replicated'}")
def test_one_rank_step_at_lr0_keeps_the_loaded_weights(tmp_path: Path, case) -> None:
    _check_case(tmp_path, case, rank=0, world=1)


def _two_ranks(rank: int, world: int, root: str) -> None:
    for i, case in enumerate(CASES):
        _check_case(Path(root) / f"case{i}", case, rank, world)


@pytest.mark.slow
def test_two_ranks_step_at_lr0_keeps_the_loaded_weights(tmp_path: Path) -> None:
    run_distributed(_two_ranks, 2, str(tmp_path))


E2E = [
    "model.num_layers=1",
    "model.seq_length=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "scheduler.lr_warmup_iters=2",
    "logger.log_interval=1",
    "train.eval_interval=null",
    "logger.plot_schedule=false",
    "optimizer.bf16=true",
]


@pytest.mark.slow
def test_bf16_finetune_through_pretrain_py_continues_from_the_checkpoint(tmp_path: Path) -> None:
    """Issue 11's report: iteration 2 of a bf16 finetune fell back to an untrained model's loss."""
    from anneal_testing import metrics_by_iteration, run_cli

    first = run_cli(
        *E2E,
        "train.train_iters=10",
        f"checkpoint.save={tmp_path / 'ck'}",
        f"hydra.run.dir={tmp_path / 'first'}",
        cwd=tmp_path,
        timeout=240,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    tuned = run_cli(
        *E2E,
        "train.train_iters=3",
        f"checkpoint.load={tmp_path / 'ck'}",
        "checkpoint.finetune=true",
        f"hydra.run.dir={tmp_path / 'tuned'}",
        cwd=tmp_path,
        timeout=240,
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    untrained = metrics_by_iteration(tmp_path / "first")[1]["loss"]
    losses = {i: r["loss"] for i, r in metrics_by_iteration(tmp_path / "tuned").items()}
    assert losses[1] < untrained - 0.3, "the checkpoint's weights were loaded"
    assert losses[2] < losses[1] + 0.1 < untrained - 0.2, f"iteration 2 must continue, not reset: {losses}"
