"""Values derived from the config: the scheduler's steps in samples, the run length, the batch ramp.

Returned as frozen dataclasses, never written back into the config. Steps are samples, as in
Megatron-Bridge (the loop calls ``scheduler.step(increment=global_batch_size)``); unlike Bridge,
iteration counts are turned into samples through the batch ramp, so with ``rampup_batch_size``
the warmup and decay still end exactly at the iterations the user asked for. A
``TorchSchedulerConfig`` derives to a ``TorchSchedule`` instead: torch schedules step once per
iteration, so only their run-length kwargs are resolved here.
"""

from __future__ import annotations

from dataclasses import dataclass

from anneal.config.batch import BatchRamp
from anneal.config.optimizer import OptimizerConfig
from anneal.config.scheduler import DEFAULT_WSD_DECAY_FRACTION, SchedulerConfig
from anneal.config.torch_scheduler import RUN_LENGTH_KWARGS, TorchSchedule, TorchSchedulerConfig
from anneal.config.training import TrainingConfig
from anneal.errors import ConfigError
from anneal.scheduler.schedule import Schedule, phases, validate_schedule


@dataclass(frozen=True)
class Derived:
    schedule: Schedule | TorchSchedule  # Megatron's, or a torch.optim.lr_scheduler schedule
    ramp: BatchRamp
    train_iters: int
    train_samples: int

    def phase_rows(self, seq_length: int) -> list[tuple[str, float, int, float]]:
        """(phase boundary, samples, iteration, tokens) rows for the dry run and the logs."""
        if isinstance(self.schedule, TorchSchedule):
            return self._torch_rows(seq_length)
        rows = []
        for name, samples in phases(self.schedule).rows(wd_ramp=self.schedule.wd_incr_style != "constant"):
            rows.append((name, samples, self.ramp.iterations_for(samples), samples * seq_length))
        rows.append(("end of training", self.train_samples, self.train_iters, self.train_samples * seq_length))
        return rows

    def _torch_rows(self, seq_length: int) -> list[tuple[str, float, int, float]]:
        rows = []
        if self.schedule.warmup_iters:
            warmup = self.ramp.samples_after(self.schedule.warmup_iters)
            rows.append(("warmup end", warmup, self.schedule.warmup_iters, warmup * seq_length))
        samples = self.train_samples
        return [*rows, ("end of training", samples, self.train_iters, samples * seq_length)]


def derive(train: TrainingConfig, optimizer: OptimizerConfig,
           scheduler: SchedulerConfig | TorchSchedulerConfig) -> Derived:
    """Turn the three sections into the scheduler's ``Schedule`` and the run's length."""
    if isinstance(scheduler, TorchSchedulerConfig):
        return _derive_torch(train, optimizer, scheduler)
    ramp = _ramp(train)
    iteration_based = train.train_iters is not None
    _forbid_mixing(scheduler, iteration_based)
    if iteration_based:
        train_iters, train_samples = train.train_iters, ramp.samples_after(train.train_iters)
    else:
        train_samples, train_iters = train.train_samples, ramp.iterations_for(train.train_samples)
    decay_steps, decay_field, decay_iters = _decay(scheduler, ramp, train_iters, train_samples, iteration_based)
    warmup_steps, warmup_field = _warmup(scheduler, ramp, decay_steps, iteration_based)
    if not warmup_steps < decay_steps:
        raise ConfigError(f"{warmup_field} must be < {decay_field}: the warmup must end before the decay does")
    wsd_steps = None
    if scheduler.lr_decay_style == "WSD":
        wsd_steps = _wsd(scheduler, ramp, decay_steps, decay_iters, warmup_steps, iteration_based)
    if scheduler.lr_warmup_init > optimizer.lr:
        raise ConfigError(f"scheduler.lr_warmup_init ({scheduler.lr_warmup_init}) must be <= optimizer.lr ({optimizer.lr})")
    schedule = Schedule(
        init_lr=scheduler.lr_warmup_init,
        max_lr=optimizer.lr,
        min_lr=optimizer.min_lr if optimizer.min_lr is not None else 0.0,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=scheduler.lr_decay_style,
        start_wd=_or(scheduler.start_weight_decay, optimizer.weight_decay),
        end_wd=_or(scheduler.end_weight_decay, optimizer.weight_decay),
        wd_incr_steps=train_samples,
        wd_incr_style=scheduler.weight_decay_incr_style,
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style=scheduler.lr_wsd_decay_style,
    )
    validate_schedule(schedule, prefix="derived schedule ")
    return Derived(schedule, ramp, train_iters, train_samples)


def _derive_torch(train: TrainingConfig, optimizer: OptimizerConfig,
                  scheduler: TorchSchedulerConfig) -> Derived:
    """The ``TorchSchedule``: run-length kwargs filled in, checked against the run, built once on a dummy."""
    ramp = _ramp(train)
    if train.train_iters is not None:
        train_iters, train_samples = train.train_iters, ramp.samples_after(train.train_iters)
        length = f"train.train_iters ({train_iters})"
    else:
        train_samples, train_iters = train.train_samples, ramp.iterations_for(train.train_samples)
        length = f"the run's {train_iters} iterations (train.train_samples {train_samples})"
    if not scheduler.warmup_iters < train_iters:
        raise ConfigError(f"scheduler.warmup_iters ({scheduler.warmup_iters}) must be < {length}")
    after_warmup = train_iters - scheduler.warmup_iters
    kwargs = dict(scheduler.kwargs)
    run_length = RUN_LENGTH_KWARGS.get(scheduler.class_name)
    if run_length is not None and kwargs.get(run_length) is None:
        kwargs[run_length] = after_warmup
    if scheduler.class_name == "OneCycleLR" and kwargs["total_steps"] < train_iters:
        raise ConfigError(f"scheduler.kwargs.total_steps ({kwargs['total_steps']}) must be >= {length}: "
                          "OneCycleLR cannot step past its last step (null: the whole run)")
    if scheduler.class_name == "ReduceLROnPlateau" and not (train.eval_interval and train.eval_iters):
        raise ConfigError(f"train.eval_interval ({train.eval_interval}) and train.eval_iters "
                          f"({train.eval_iters}) must be set for scheduler.name ReduceLROnPlateau: it steps "
                          "on the validation loss")
    schedule = TorchSchedule(
        name=scheduler.name,
        kwargs=kwargs,
        warmup_iters=scheduler.warmup_iters,
        warmup_style=scheduler.warmup_style,
        warmup_start_factor=scheduler.warmup_start_factor,
        max_lr=optimizer.lr,
        min_lr=_or(optimizer.min_lr, 0.0),
        weight_decay=optimizer.weight_decay,
        train_iters=train_iters,
    )
    from anneal.scheduler.torch_schedules import check_buildable  # imports torch

    check_buildable(schedule)
    return Derived(schedule, ramp, train_iters, train_samples)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _ramp(train: TrainingConfig) -> BatchRamp:
    if train.rampup_batch_size is None:
        return BatchRamp(train.global_batch_size)
    start, increment, ramp_samples = train.rampup_batch_size
    return BatchRamp(train.global_batch_size, start, increment, ramp_samples)


def _forbid_mixing(s: SchedulerConfig, iteration_based: bool) -> None:
    """Iteration-based runs take *_iters fields, sample-based runs *_samples fields, never both."""
    unit, other = ("iters", "samples") if iteration_based else ("samples", "iters")
    length = "train.train_iters" if iteration_based else "train.train_samples"
    for stem in ("lr_decay", "lr_warmup", "lr_wsd_decay"):
        value = getattr(s, f"{stem}_{other}")
        if value:  # None, and the 0 defaults of the warmup fields, mean unset
            raise ConfigError(
                f"scheduler.{stem}_{other} ({value}) cannot be used with {length}: "
                f"use scheduler.{stem}_{unit}, or set train.train_{other} instead"
            )


def _decay(s: SchedulerConfig, ramp: BatchRamp, train_iters: int, train_samples: int, by_iter: bool):
    if by_iter:
        if s.lr_decay_iters is None:
            return train_samples, f"train.train_iters ({train_iters})", train_iters
        iters = s.lr_decay_iters
        return ramp.samples_after(iters), f"scheduler.lr_decay_iters ({iters})", iters
    if s.lr_decay_samples is None:
        return train_samples, f"train.train_samples ({train_samples})", train_iters
    samples = s.lr_decay_samples
    return samples, f"scheduler.lr_decay_samples ({samples})", ramp.iterations_for(samples)


def _warmup(s: SchedulerConfig, ramp: BatchRamp, decay_steps: int, by_iter: bool) -> tuple[float, str]:
    if s.lr_warmup_fraction is not None:
        steps = s.lr_warmup_fraction * decay_steps
        return steps, f"scheduler.lr_warmup_fraction ({s.lr_warmup_fraction}) × decay ({decay_steps} samples)"
    if by_iter:
        return ramp.samples_after(s.lr_warmup_iters), f"scheduler.lr_warmup_iters ({s.lr_warmup_iters})"
    return s.lr_warmup_samples, f"scheduler.lr_warmup_samples ({s.lr_warmup_samples})"


def _wsd(s: SchedulerConfig, ramp: BatchRamp, decay_steps: int, decay_iters: int, warmup_steps: float,
         by_iter: bool) -> int:
    """Samples of the WSD anneal: the last lr_wsd_decay_iters iterations (or samples) of the decay."""
    if by_iter:
        iters = s.lr_wsd_decay_iters
        field = f"scheduler.lr_wsd_decay_iters ({iters})"
        if iters is None:
            iters = max(1, round(DEFAULT_WSD_DECAY_FRACTION * decay_iters))
            field = f"the default WSD anneal ({iters} iterations, {DEFAULT_WSD_DECAY_FRACTION:.0%} of the decay)"
        if not 0 < iters <= decay_iters:
            raise ConfigError(f"{field} must be in [1, {decay_iters}] (the decay's iterations)")
        steps = decay_steps - ramp.samples_after(decay_iters - iters)
    else:
        steps = s.lr_wsd_decay_samples
        field = f"scheduler.lr_wsd_decay_samples ({steps})"
        if steps is None:
            steps = max(1, round(DEFAULT_WSD_DECAY_FRACTION * decay_steps))
            field = f"the default WSD anneal ({steps} samples, {DEFAULT_WSD_DECAY_FRACTION:.0%} of the decay)"
    if not 0 < steps <= decay_steps - warmup_steps:
        raise ConfigError(
            f"{field} must leave the warmup intact: its {steps} samples must be in "
            f"[1, decay - warmup = {decay_steps - warmup_steps}]"
        )
    return steps
