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
from anneal.config.provenance import UserSet, in_force
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
    train_samples: int  # samples the run trains: whole global batches, as Megatron
    notes: tuple[str, ...] = ()  # defaults that a value set on the command line replaced

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
           scheduler: SchedulerConfig | TorchSchedulerConfig, user_set: UserSet | None = None) -> Derived:
    """Turn the three sections into the scheduler's ``Schedule`` and the run's length.

    ``user_set`` says which values were typed on the command line (None: all of them): of two
    mutually exclusive fields, the typed one replaces a default instead of colliding with it.
    """
    user_set = user_set or UserSet()
    if isinstance(scheduler, TorchSchedulerConfig):
        return _derive_torch(train, optimizer, scheduler, _in_force(train, None, user_set))
    ramp = _ramp(train)
    pick = _in_force(train, scheduler, user_set)
    iteration_based = pick["length"] == "train_iters"
    _forbid_mixing(scheduler, pick, iteration_based, user_set)
    train_iters, train_samples, length_samples = _length(train, ramp, iteration_based)
    decay_steps, decay_field, decay_iters = _decay(scheduler, ramp, train_iters, length_samples,
                                                   iteration_based)
    warmup_steps, warmup_field = _warmup(scheduler, pick["warmup"], ramp, decay_steps, user_set)
    if not warmup_steps < decay_steps:
        raise ConfigError(f"{warmup_field} must be < {decay_field}: the warmup must end before the decay does"
                          + _warmup_fix(pick["warmup"], scheduler, user_set, decay_iters))
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
        wd_incr_steps=length_samples,
        wd_incr_style=scheduler.weight_decay_incr_style,
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style=scheduler.lr_wsd_decay_style,
    )
    validate_schedule(schedule, prefix="derived schedule ")
    return Derived(schedule, ramp, train_iters, train_samples, _notes(pick, train, scheduler))


def _in_force(train: TrainingConfig, s: SchedulerConfig | None, user_set: UserSet) -> dict:
    """The field in force of each mutually exclusive group, and the defaults it set aside."""
    groups = {"length": ("train", train, {"train_iters": None, "train_samples": None})}
    if s is not None:
        groups |= {
            "warmup": ("scheduler", s, {"lr_warmup_fraction": None, "lr_warmup_iters": 0,
                                        "lr_warmup_samples": 0}),
            "decay": ("scheduler", s, {"lr_decay_iters": None, "lr_decay_samples": None}),
            "wsd": ("scheduler", s, {"lr_wsd_decay_iters": None, "lr_wsd_decay_samples": None}),
        }
    pick: dict = {"aside": {}}
    for group, (section, obj, unset) in groups.items():
        used = {n: v for n, off in unset.items() if (v := getattr(obj, n)) is not None and v != off}
        pick[group], pick["aside"][group] = in_force(section, used, user_set)
    if pick["length"] is None:
        raise ConfigError("train.train_iters (None) and train.train_samples (None): set exactly one")
    return pick


def _notes(pick: dict, train: TrainingConfig, s: SchedulerConfig | None) -> tuple[str, ...]:
    notes = []
    for group, aside in pick["aside"].items():
        section, obj = ("train", train) if group == "length" else ("scheduler", s)  # s: not None here
        for name in aside:
            notes.append(f"{section}.{pick[group]} (set on the command line) replaces the default "
                         f"{section}.{name} ({getattr(obj, name)}), which is not used")
    return tuple(notes)


def _length(train: TrainingConfig, ramp: BatchRamp, iteration_based: bool) -> tuple[int, int, int]:
    """(iterations, samples trained, the samples the schedule spans): Megatron trains whole batches."""
    if iteration_based:
        samples = ramp.samples_after(train.train_iters)
        return train.train_iters, samples, samples
    iters = ramp.whole_iterations(train.train_samples)
    if iters < 1:
        raise ConfigError(f"train.train_samples ({train.train_samples}) must be >= one global batch "
                          f"(train.global_batch_size {ramp.batch_size_at(0)})")
    return iters, ramp.samples_after(iters), train.train_samples


def _derive_torch(train: TrainingConfig, optimizer: OptimizerConfig,
                  scheduler: TorchSchedulerConfig, pick: dict) -> Derived:
    """The ``TorchSchedule``: run-length kwargs filled in, checked against the run, built once on a dummy."""
    ramp = _ramp(train)
    if pick["length"] == "train_iters":
        train_iters, train_samples = train.train_iters, ramp.samples_after(train.train_iters)
        length = f"train.train_iters ({train_iters})"
    else:
        train_iters = ramp.whole_iterations(train.train_samples)
        train_samples = ramp.samples_after(train_iters)
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
    return Derived(schedule, ramp, train_iters, train_samples, _notes(pick, train, None))


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _ramp(train: TrainingConfig) -> BatchRamp:
    if train.rampup_batch_size is None:
        return BatchRamp(train.global_batch_size)
    start, increment, ramp_samples = train.rampup_batch_size
    return BatchRamp(train.global_batch_size, start, increment, ramp_samples)


def _forbid_mixing(s: SchedulerConfig, pick: dict, iteration_based: bool, user_set: UserSet) -> None:
    """Iteration-based runs take *_iters fields, sample-based runs *_samples fields, never both."""
    unit, other = ("iters", "samples") if iteration_based else ("samples", "iters")
    length = "train.train_iters" if iteration_based else "train.train_samples"
    for group in ("warmup", "decay", "wsd"):
        name = pick[group]
        if name is not None and name.endswith(f"_{other}"):
            stem, path = name.removesuffix(f"_{other}"), f"scheduler.{name}"
            how = "override the default" if not user_set.has(path) else "set"
            fraction = ", or scheduler.lr_warmup_fraction=0.01" if group == "warmup" else ""
            raise ConfigError(
                f"{user_set.label(path, getattr(s, name))} cannot be used with {length}: {how}: "
                f"{path}={_unset(name)} scheduler.{stem}_{unit}=N{fraction}, or use train.train_{other}"
            )


def _unset(name: str) -> str:
    return "0" if name in ("lr_warmup_iters", "lr_warmup_samples") else "null"


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


def _warmup(s: SchedulerConfig, name: str | None, ramp: BatchRamp, decay_steps: int,
            user_set: UserSet) -> tuple[float, str]:
    if name == "lr_warmup_fraction":
        steps = s.lr_warmup_fraction * decay_steps
        label = user_set.label("scheduler.lr_warmup_fraction", s.lr_warmup_fraction)
        return steps, f"{label} × decay ({decay_steps} samples)"
    if name == "lr_warmup_samples":
        return s.lr_warmup_samples, user_set.label("scheduler.lr_warmup_samples", s.lr_warmup_samples)
    label = user_set.label("scheduler.lr_warmup_iters", s.lr_warmup_iters)
    return ramp.samples_after(s.lr_warmup_iters), label


def _warmup_fix(name: str | None, s: SchedulerConfig, user_set: UserSet, decay_iters: int) -> str:
    """The overrides that shorten the warmup to fit: a tenth of the decay, in iterations or as a fraction."""
    if name != "lr_warmup_iters":
        return ""
    what = "override the default" if not user_set.has("scheduler.lr_warmup_iters") else "set"
    return (f"; {what}: scheduler.lr_warmup_iters={max(0, decay_iters // 10)}, or "
            "scheduler.lr_warmup_fraction=0.1 (a tenth of the decay)")


_NO_ANNEAL = ("; 0 would never anneal (Megatron holds max_lr to the end and reaches min_lr only after the "
              "decay): for that use scheduler=constant")


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
            raise ConfigError(f"{field} must be in [1, {decay_iters}] (the decay's iterations)"
                              + (_NO_ANNEAL if iters == 0 else ""))
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
            + (_NO_ANNEAL if steps == 0 else "; an anneal that starts inside the warmup makes the lr drop "
               "from the warmup's peak to the anneal curve in one step (Megatron runs it)")
        )
    return steps
