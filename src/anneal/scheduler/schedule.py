"""Megatron's learning-rate and weight-decay schedules as pure functions of ``num_steps``.

``num_steps`` counts whatever the caller passes to ``OptimizerParamScheduler.step``; anneal's
training loop passes the global batch size, so steps are consumed samples, as in Megatron-Bridge.
The float operations follow Megatron-Core's ``OptimizerParamScheduler`` one for one, so the values
match it bit for bit (checked against recorded upstream trajectories in the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from anneal.errors import ConfigError, check_choice

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """Everything that decides the lr and wd at a given step, in Megatron's argument names."""

    init_lr: float
    max_lr: float
    min_lr: float
    lr_warmup_steps: float
    lr_decay_steps: float
    lr_decay_style: str
    start_wd: float
    end_wd: float
    wd_incr_steps: float
    wd_incr_style: str
    wsd_decay_steps: float | None = None
    lr_wsd_decay_style: str | None = None

    def lr_at(self, num_steps: float, max_lr: float | None = None, min_lr: float | None = None) -> float:
        return lr_at(self, num_steps, self.max_lr if max_lr is None else max_lr, self.min_lr if min_lr is None else min_lr)

    def wd_at(self, num_steps: float, start_wd: float | None = None, end_wd: float | None = None) -> float:
        start = self.start_wd if start_wd is None else start_wd
        return wd_at(self, num_steps, start, self.end_wd if end_wd is None else end_wd)


def validate_schedule(s: Schedule, prefix: str = "") -> None:
    """Reject every setting that Megatron rejects, sooner or later, with one clear error.

    Megatron asserts some of these in its constructor and finds the others only when a step
    reaches the bad branch (an unknown style after warmup, a missing WSD style at the anneal):
    anneal checks them all before the first step. ``prefix`` is prepended to argument names.
    """
    p = prefix
    check_choice(f"{p}lr_decay_style", s.lr_decay_style, LR_DECAY_STYLES)
    check_choice(f"{p}wd_incr_style", s.wd_incr_style, WD_INCR_STYLES)
    if s.min_lr < 0.0:
        raise ConfigError(f"{p}min_lr ({s.min_lr}) must be >= 0")
    if s.max_lr < s.min_lr:
        raise ConfigError(f"{p}max_lr ({s.max_lr}) must be >= {p}min_lr ({s.min_lr})")
    if s.init_lr > s.max_lr:
        raise ConfigError(f"{p}init_lr ({s.init_lr}) must be <= {p}max_lr ({s.max_lr})")
    if not s.lr_decay_steps > 0:
        raise ConfigError(f"{p}lr_decay_steps ({s.lr_decay_steps}) must be > 0")
    if not s.lr_warmup_steps < s.lr_decay_steps:
        raise ConfigError(
            f"{p}lr_warmup_steps ({s.lr_warmup_steps}) must be < {p}lr_decay_steps ({s.lr_decay_steps})"
        )
    if s.lr_decay_style == "WSD":
        if s.wsd_decay_steps is None:
            raise ConfigError(f"{p}wsd_decay_steps (None) must be set when {p}lr_decay_style is 'WSD'")
        check_choice(f"{p}lr_wsd_decay_style", s.lr_wsd_decay_style, WSD_DECAY_STYLES)
    if s.start_wd < 0.0:
        raise ConfigError(f"{p}start_wd ({s.start_wd}) must be >= 0")
    if s.end_wd < s.start_wd:
        raise ConfigError(f"{p}end_wd ({s.end_wd}) must be >= {p}start_wd ({s.start_wd})")
    if s.wd_incr_style == "constant" and s.start_wd != s.end_wd and s.wd_incr_steps >= 0:
        raise ConfigError(
            f"{p}start_wd ({s.start_wd}) must equal {p}end_wd ({s.end_wd}) when {p}wd_incr_style is 'constant'"
        )
    if s.wd_incr_style != "constant" and s.wd_incr_steps == 0:  # Megatron divides by it (a negative
        raise ConfigError(  # count never reaches the division: Megatron accepts it, and so does anneal)
            f"{p}wd_incr_steps ({s.wd_incr_steps}) must be > 0 when {p}wd_incr_style is {s.wd_incr_style!r}"
        )


def lr_at(s: Schedule, num_steps: float, max_lr: float, min_lr: float) -> float:
    """The learning rate after ``num_steps`` (Megatron-Core's ``get_lr``)."""
    # Linear warmup from init_lr to max_lr.
    if s.lr_warmup_steps > 0 and num_steps <= s.lr_warmup_steps:
        return s.init_lr + ((max_lr - s.init_lr) * float(num_steps) / float(s.lr_warmup_steps))
    if s.lr_decay_style == "constant":
        return max_lr
    if num_steps > s.lr_decay_steps:
        return min_lr
    if s.lr_decay_style == "inverse-square-root":
        warmup_steps = max(s.lr_warmup_steps, 1)
        steps = max(num_steps, 1)
        return max(min_lr, max_lr * warmup_steps**0.5 / (steps**0.5))
    decay_ratio = float(num_steps - s.lr_warmup_steps) / float(s.lr_decay_steps - s.lr_warmup_steps)
    if s.lr_decay_style == "linear":
        coeff = 1.0 - decay_ratio
    elif s.lr_decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
    elif s.lr_decay_style == "WSD":
        coeff = _wsd_coeff(s, num_steps)
    else:
        raise ConfigError(f"lr_decay_style ({s.lr_decay_style!r}) must be one of {LR_DECAY_STYLES}")
    return min_lr + coeff * (max_lr - min_lr)


def _wsd_coeff(s: Schedule, num_steps: float) -> float:
    """1.0 through the stable phase, then the anneal shape down to 0.0 at ``lr_decay_steps``."""
    anneal_start = s.lr_decay_steps - s.wsd_decay_steps
    if num_steps <= anneal_start:
        return 1.0
    ratio = float(num_steps - anneal_start) / float(s.wsd_decay_steps)
    style = s.lr_wsd_decay_style
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return (2.0 * math.pow(0.5, ratio)) - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ConfigError(f"lr_wsd_decay_style ({style!r}) must be one of {WSD_DECAY_STYLES}")


def wd_at(s: Schedule, num_steps: float, start_wd: float, end_wd: float) -> float:
    """The weight decay after ``num_steps`` (Megatron-Core's ``get_wd``), before ``wd_mult``."""
    if num_steps > s.wd_incr_steps:
        return end_wd
    if s.wd_incr_style == "constant":
        if start_wd != end_wd:
            raise ConfigError(f"start_wd ({start_wd}) must equal end_wd ({end_wd}) when wd_incr_style is 'constant'")
        return end_wd
    incr_ratio = float(num_steps) / float(s.wd_incr_steps)
    if s.wd_incr_style == "linear":
        coeff = incr_ratio
    elif s.wd_incr_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * (1 - incr_ratio)) + 1.0)
    else:
        raise ConfigError(f"wd_incr_style ({s.wd_incr_style!r}) must be one of {WD_INCR_STYLES}")
    return start_wd + coeff * (end_wd - start_wd)


@dataclass(frozen=True)
class Phases:
    """Where the schedule changes shape, in steps (samples when steps count samples)."""

    warmup_end: float
    anneal_start: float  # == decay_end unless WSD; the stable phase is [warmup_end, anneal_start]
    decay_end: float
    wd_incr_end: float

    def rows(self, wd_ramp: bool = True) -> list[tuple[str, float]]:
        rows = [
            ("warmup end", self.warmup_end),
            ("stable end / anneal start", self.anneal_start),
            ("decay end", self.decay_end),
        ]
        return rows + [("weight-decay ramp end", self.wd_incr_end)] if wd_ramp else rows


def phases(s: Schedule) -> Phases:
    """Phase boundaries of ``s``: warmup end, anneal start (WSD; else the warmup end), decay end."""
    if s.lr_decay_style == "WSD":
        anneal_start = s.lr_decay_steps - s.wsd_decay_steps
    elif s.lr_decay_style == "constant":
        anneal_start = s.lr_decay_steps  # constant never decays: stable to the end
    else:
        anneal_start = s.lr_warmup_steps
    return Phases(s.lr_warmup_steps, anneal_start, s.lr_decay_steps, s.wd_incr_steps)
