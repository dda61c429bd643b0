"""Anneal branches and extensions as pure functions of a parent ``Schedule`` (all steps in samples).

A branch leaves the parent after ``at`` steps and anneals with a WSD shape until ``end``: it is the
Megatron WSD schedule with ``lr_decay_steps = end`` and ``wsd_decay_steps = end - at``, the parent's
warmup and the parent's weight-decay schedule, so a branch equals one Megatron run built with those
arguments. From the stable phase (or the post-warmup part of a constant schedule) the lr in force
is ``max_lr`` and nothing else changes; from a decay (a branch of a branch) the lr in force becomes
the new peak, for the schedule and for each param group's ``max_lr``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from anneal.errors import ConfigError
from anneal.scheduler.schedule import Schedule, lr_at, phases, validate_schedule


@dataclass(frozen=True)
class BranchPoint:
    """Where a branch leaves its parent: ``steps`` consumed and whether the lr is still at its peak."""

    steps: float
    at_peak: bool


def branch_point(parent: Schedule, steps: float, where: str) -> BranchPoint:
    """Check that a branch may start after ``steps`` of ``parent``; ``where`` names the checkpoint."""
    p = phases(parent)
    if parent.lr_warmup_steps > 0 and steps < p.warmup_end:
        raise ConfigError(f"scheduler.anneal_branch_iters: {where} is in the warmup ({steps:g} of "
                          f"{p.warmup_end:g} samples): branch from a checkpoint after the warmup")
    if parent.lr_decay_style not in ("constant",) and steps >= p.decay_end:
        raise ConfigError(f"scheduler.anneal_branch_iters: {where} is past the decay end ({steps:g} >= "
                          f"{p.decay_end:g} samples): the lr is already min_lr, there is nothing to anneal")
    # the lr is at its peak (coefficient 1) through a constant schedule, a WSD stable phase, at the warmup end
    return BranchPoint(steps, parent.lr_decay_style == "constant" or steps <= p.anneal_start)


def branch_schedule(parent: Schedule, point: BranchPoint, end: float, wsd_style: str) -> Schedule:
    """The WSD schedule that follows ``parent`` to ``point`` and anneals until ``end`` steps."""
    peak = parent.max_lr if point.at_peak else lr_at(parent, point.steps, parent.max_lr, parent.min_lr)
    branch = replace(parent, init_lr=min(parent.init_lr, peak), max_lr=peak, lr_decay_steps=end,
                     lr_decay_style="WSD", wsd_decay_steps=end - point.steps, lr_wsd_decay_style=wsd_style)
    validate_schedule(branch, prefix="branch schedule ")
    return branch


def branch_bounds(parent: Schedule, point: BranchPoint, bounds: list[dict]) -> list[dict]:
    """Each param group's ``max_lr`` / ``min_lr`` for the branch: its lr in force becomes its peak."""
    if point.at_peak:
        return [dict(b) for b in bounds]
    return [{**b, "max_lr": lr_at(parent, point.steps, b["max_lr"], b["min_lr"])} if "max_lr" in b else dict(b)
            for b in bounds]


_LENGTHS = ("lr_decay_steps", "wsd_decay_steps", "wd_incr_steps")


def is_extension(before: Schedule, after: Schedule) -> bool:
    """Whether ``after`` lengthens (or shortens) the stable phase of ``before`` and changes nothing else.

    Only WSD and constant schedules have a stable phase; a longer cosine or linear run changes the lr
    already applied, so it stays a config-versus-checkpoint mismatch (the scheduler's strict rule).
    """
    names = Schedule.__dataclass_fields__
    return before != after and before.lr_decay_style in ("WSD", "constant") and all(getattr(before, n) == getattr(after, n) for n in names if n not in _LENGTHS)


def extension_refusal(before: Schedule, after: Schedule, steps: float) -> str:
    """Why ``after`` may not replace ``before`` after ``steps``; "" when it may (nothing trained changes)."""
    old, new = phases(before), phases(after)
    if steps > old.anneal_start:
        return f"the anneal began after {old.anneal_start:g} samples and the checkpoint is at {steps:g}"
    if steps > new.anneal_start:
        return f"the new anneal would start at {new.anneal_start:g} samples, before the checkpoint ({steps:g})"
    return ""


def extended(before: Schedule, after: Schedule) -> Schedule:
    """``after`` with ``before``'s weight-decay schedule: stretching a wd ramp would change the wd already
    applied, so the checkpoint's ramp continues as it would have (it ends where it ended)."""
    return replace(after, wd_incr_steps=before.wd_incr_steps)
