"""Anneal branches equal, bit for bit, one Megatron run built with the branch's arguments.

The reference is Megatron-Core's ``OptimizerParamScheduler`` when ``megatron.core`` imports (it
installs on CPU with ``pip install --no-deps megatron-core==0.16.1``), else anneal's class, which
the golden tests hold to Megatron's recorded trajectories.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from anneal.config.batch import BatchRamp
from anneal.errors import ConfigError
from anneal.scheduler import OptimizerParamScheduler, Schedule, lr_at
from anneal.scheduler.branch import (branch_bounds, branch_point, branch_schedule, extended, extension_refusal,
                                     is_extension)

try:  # 4.5 s to import; the same numbers as anneal's class on every golden case
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler as Megatron
except Exception:  # not installed (it is not a dependency)
    Megatron = OptimizerParamScheduler

GBS, TRAIN_ITERS, WARMUP_ITERS = 8, 100, 3
# Two param groups with their own bounds and wd_mult (Megatron's decoupled lr / no-wd groups).
GROUPS = ({"max_lr": 1e-3, "min_lr": 1e-5, "wd_mult": 1.0}, {"max_lr": 3e-4, "min_lr": 0.0, "wd_mult": 0.0})
# The parent: WSD with a long stable phase and a cosine weight-decay increment over the whole run.
PARENT = Schedule(init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=WARMUP_ITERS * GBS,
                  lr_decay_steps=TRAIN_ITERS * GBS, lr_decay_style="WSD", start_wd=0.01, end_wd=0.1,
                  wd_incr_steps=TRAIN_ITERS * GBS, wd_incr_style="cosine", wsd_decay_steps=20 * GBS,
                  lr_wsd_decay_style="exponential")


class Groups:
    def __init__(self, groups=GROUPS) -> None:
        self.param_groups = [dict(g) for g in groups]


def _run(sched, ramp: BatchRamp, start: int, stop: int) -> dict[int, list[tuple[float, float]]]:
    """Step from iteration ``start`` to ``stop``; (lr, wd) of every group applied in each iteration."""
    applied = {}
    for it in range(start + 1, stop + 1):
        applied[it] = [(g["lr"], g["weight_decay"]) for g in sched.optimizer.param_groups]
        sched.step(ramp.batch_size_at(ramp.samples_after(it - 1)))
    return applied


def _branch_off(parent_sched, parent: Schedule, ramp: BatchRamp, n: int, k: int, style: str):
    """What ``anneal.resume`` does: the branch scheduler, loaded from the parent's state at iteration ``n``."""
    state = parent_sched.state_dict()
    point = branch_point(parent, state["num_steps"], "test checkpoint")
    branch = branch_schedule(parent, point, state["num_steps"] + ramp.samples_after(n + k) - ramp.samples_after(n),
                             style)
    bounds = branch_bounds(parent, point, state["param_group_bounds"])
    sched = OptimizerParamScheduler.from_schedule(Groups(), branch, use_checkpoint_opt_param_scheduler=False,
                                                  resume_mode="branch", param_group_bounds=bounds)
    report = sched.load_state_dict(state)
    assert report.mode == "branch" and sched.num_steps == state["num_steps"]
    return sched, branch, bounds


@pytest.mark.parametrize("ramp", [BatchRamp(GBS), BatchRamp(GBS, start=4, increment=2, ramp_samples=120)],
                         ids=["constant-batch", "batch-ramp"])
def test_branch_from_the_stable_phase_equals_one_megatron_run(ramp: BatchRamp) -> None:
    n, k = 40, 10
    parent = PARENT if ramp.start is None else Schedule(**{**asdict(PARENT), "lr_warmup_steps": ramp.samples_after(3),
                                                           "lr_decay_steps": ramp.samples_after(TRAIN_ITERS),
                                                           "wd_incr_steps": ramp.samples_after(TRAIN_ITERS),
                                                           "wsd_decay_steps": ramp.samples_after(TRAIN_ITERS)
                                                           - ramp.samples_after(TRAIN_ITERS - 20)})
    parent_sched = OptimizerParamScheduler.from_schedule(Groups(), parent)
    parent_applied = _run(parent_sched, ramp, 0, n)
    branch_sched, branch, bounds = _branch_off(parent_sched, parent, ramp, n, k, "linear")
    # Megatron's arguments for the equivalent single run: everything in samples, the anneal over the
    # last K iterations of a run that ends at N + K, the parent's warmup and weight-decay schedule.
    megatron_args = dict(init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=ramp.samples_after(WARMUP_ITERS),
                         lr_decay_steps=ramp.samples_after(n + k), lr_decay_style="WSD", start_wd=0.01, end_wd=0.1,
                         wd_incr_steps=ramp.samples_after(TRAIN_ITERS), wd_incr_style="cosine",
                         wsd_decay_steps=ramp.samples_after(n + k) - ramp.samples_after(n),
                         lr_wsd_decay_style="linear")
    assert asdict(branch) == megatron_args and bounds == [{k: g[k] for k in ("max_lr", "min_lr")} for g in GROUPS]
    megatron = Megatron(Groups(), **megatron_args, use_checkpoint_opt_param_scheduler=False)
    reference = _run(megatron, ramp, 0, n + k)
    assert all(parent_applied[it] == reference[it] for it in range(1, n + 1))  # stable so far: the same run
    applied = _run(branch_sched, ramp, n, n + k)
    assert applied == {it: reference[it] for it in range(n + 1, n + k + 1)}
    assert branch_sched.optimizer.param_groups[0]["lr"] == megatron.optimizer.param_groups[0]["lr"] == 1e-5


def test_branch_of_a_branch_continues_from_the_lr_in_force() -> None:
    ramp = BatchRamp(GBS)
    parent_sched = OptimizerParamScheduler.from_schedule(Groups(), PARENT)
    _run(parent_sched, ramp, 0, 40)
    first, first_schedule, _ = _branch_off(parent_sched, PARENT, ramp, 40, 20, "linear")
    first_applied = _run(first, ramp, 40, 45)  # five iterations into the first branch's anneal
    second, schedule, bounds = _branch_off(first, first_schedule, ramp, 45, 8, "cosine")
    in_force = lr_at(first_schedule, 45 * GBS, 1e-3, 1e-5)
    # The equivalent single Megatron run: peak = the lr in force at iteration 45, for the schedule and each group.
    megatron_args = dict(init_lr=0.0, max_lr=in_force, min_lr=1e-5, lr_warmup_steps=24, lr_decay_steps=53 * GBS,
                         lr_decay_style="WSD", start_wd=0.01, end_wd=0.1, wd_incr_steps=800, wd_incr_style="cosine",
                         wsd_decay_steps=8 * GBS, lr_wsd_decay_style="cosine")
    assert asdict(schedule) == megatron_args
    group_peaks = [lr_at(first_schedule, 45 * GBS, g["max_lr"], g["min_lr"]) for g in GROUPS]
    assert [b["max_lr"] for b in bounds] == group_peaks
    megatron = Megatron(Groups([{**g, "max_lr": peak} for g, peak in zip(GROUPS, group_peaks)]), **megatron_args,
                        use_checkpoint_opt_param_scheduler=False)
    reference = _run(megatron, ramp, 0, 53)
    assert _run(second, ramp, 45, 53) == {it: reference[it] for it in range(46, 54)}
    # Iteration 46 applies the lr in force after 45 iterations, as the first branch would have (up to
    # Megatron's min_lr + 1.0 * (peak - min_lr) rounding); then the new anneal takes over.
    assert reference[46][0][0] == pytest.approx(in_force, rel=1e-15, abs=0)
    assert first_applied[45][0][0] > reference[46][0][0] > reference[47][0][0]


@pytest.mark.parametrize("steps,message", [(8, "is in the warmup"), (800, "past the decay end")])
def test_branch_point_outside_the_schedule_is_refused(steps: int, message: str) -> None:
    with pytest.raises(ConfigError, match=f"scheduler.anneal_branch_iters: ckpt .*{message}"):
        branch_point(PARENT, steps, "ckpt")


def test_branch_point_of_a_constant_schedule_is_at_its_peak() -> None:
    constant = Schedule(**{**asdict(PARENT), "lr_decay_style": "constant", "wd_incr_style": "constant",
                           "start_wd": 0.1})
    assert branch_point(constant, 10_000, "ckpt").at_peak
    assert not branch_point(PARENT, 700, "ckpt").at_peak  # in the parent's own anneal


def test_extension_moves_only_the_length_and_only_in_the_stable_phase() -> None:
    flat_wd = Schedule(**{**asdict(PARENT), "wd_incr_style": "constant", "start_wd": 0.1})
    longer = Schedule(**{**asdict(flat_wd), "lr_decay_steps": 1200, "wd_incr_steps": 1200})
    assert is_extension(flat_wd, longer) and not is_extension(flat_wd, flat_wd)
    assert not is_extension(flat_wd, Schedule(**{**asdict(longer), "max_lr": 2e-3}))
    assert extension_refusal(flat_wd, longer, 400) == ""
    assert "the anneal began after 640 samples" in extension_refusal(flat_wd, longer, 700)
    assert extended(PARENT, Schedule(**{**asdict(PARENT), "wd_incr_steps": 1200})).wd_incr_steps == 800  # wd as it was
    cosine = Schedule(**{**asdict(flat_wd), "lr_decay_style": "cosine"})
    assert not is_extension(cosine, Schedule(**{**asdict(cosine), "lr_decay_steps": 1200}))  # no stable phase
