"""``scheduler.``: Megatron-Bridge's ``SchedulerConfig`` fields; the steps are derived, never typed."""

from __future__ import annotations

from dataclasses import dataclass

from anneal.errors import ConfigError, check_choice
from anneal.scheduler.schedule import LR_DECAY_STYLES, WD_INCR_STYLES, WSD_DECAY_STYLES

# WSD without lr_wsd_decay_iters/_samples anneals over this fraction of the decay span
# (Bridge leaves it unset and Megatron then fails at the first step).
DEFAULT_WSD_DECAY_FRACTION = 0.2


@dataclass
class SchedulerConfig:
    lr_decay_style: str = "linear"  # one of LR_DECAY_STYLES (constant, linear, cosine, WSD, ...)
    lr_decay_iters: int | None = None  # default: train.train_iters
    lr_decay_samples: int | None = None  # default: train.train_samples
    lr_warmup_iters: int = 0  # linear warmup from lr_warmup_init to optimizer.lr, in iterations
    lr_warmup_samples: int = 0  # the same in samples (sample-based runs)
    lr_warmup_fraction: float | None = None  # of the decay span; replaces lr_warmup_iters/_samples from conf/
    lr_warmup_init: float = 0.0  # learning rate at the start of the warmup
    lr_wsd_decay_style: str = "exponential"  # WSD anneal shape: one of WSD_DECAY_STYLES
    lr_wsd_decay_iters: int | None = None  # default: 20% of the decay span
    lr_wsd_decay_samples: int | None = None  # the WSD anneal in samples (sample-based runs)
    start_weight_decay: float | None = None  # default: optimizer.weight_decay
    end_weight_decay: float | None = None  # default: optimizer.weight_decay
    weight_decay_incr_style: str = "constant"  # start -> end weight decay: constant, linear, cosine
    override_opt_param_scheduler: bool = False  # on resume, this config's schedule wins over the checkpoint's
    use_checkpoint_opt_param_scheduler: bool = False  # on resume, the checkpoint's schedule wins
    # From the checkpoint at iteration N (checkpoint.load), anneal over this many iterations to min_lr and
    # end at N + anneal_branch_iters, saving into a new checkpoint.save (anneal.resume). None: no branch.
    anneal_branch_iters: int | None = None

    def validate(self) -> None:
        check_choice("scheduler.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        check_choice("scheduler.lr_wsd_decay_style", self.lr_wsd_decay_style, WSD_DECAY_STYLES)
        check_choice("scheduler.weight_decay_incr_style", self.weight_decay_incr_style, WD_INCR_STYLES)
        for name in ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init"):
            _at_least(f"scheduler.{name}", getattr(self, name), 0)
        for name in ("lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters", "lr_wsd_decay_samples"):
            _at_least(f"scheduler.{name}", getattr(self, name), 0)
        for name in ("start_weight_decay", "end_weight_decay"):
            _at_least(f"scheduler.{name}", getattr(self, name), 0)
        _at_least("scheduler.anneal_branch_iters", self.anneal_branch_iters, 1)
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise ConfigError(f"scheduler.lr_warmup_fraction ({self.lr_warmup_fraction}) must be in [0, 1)")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError(
                "scheduler.override_opt_param_scheduler (True) and scheduler.use_checkpoint_opt_param_scheduler "
                "(True) are mutually exclusive: set at most one"
            )
        starts, ends = self.start_weight_decay, self.end_weight_decay
        if starts is not None and ends is not None and ends < starts:
            raise ConfigError(f"scheduler.end_weight_decay ({ends}) must be >= scheduler.start_weight_decay ({starts})")
        if self.weight_decay_incr_style == "constant" and None not in (starts, ends) and starts != ends:
            raise ConfigError(
                f"scheduler.start_weight_decay ({starts}) must equal scheduler.end_weight_decay ({ends}) "
                "when scheduler.weight_decay_incr_style is 'constant'"
            )


def _at_least(path: str, value: float | None, bound: float) -> None:
    if value is not None and value < bound:
        raise ConfigError(f"{path} ({value}) must be >= {bound}")
