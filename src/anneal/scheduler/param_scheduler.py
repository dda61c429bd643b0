"""``OptimizerParamScheduler``: Megatron-Core's stateful scheduler API over anneal's pure schedule.

It writes ``lr`` and ``weight_decay`` into every param group of any optimizer-like object whose
``param_groups`` is a list of dicts (a tensor ``lr`` is updated in place, so capturable / fused
optimizers keep their tensor). Per-group ``max_lr``, ``min_lr``, ``start_wd``, ``end_wd`` and
``wd_mult`` are read exactly as Megatron-Core reads them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from anneal.errors import ConfigError
from anneal.scheduler.schedule import Phases, Schedule, lr_at, phases, validate_schedule, wd_at

logger = logging.getLogger(__name__)

# Checkpoint key aliases in the order Megatron-Core's load_state_dict tries them (legacy first).
_ALIASES = {
    "max_lr": ("start_lr", "max_lr"),
    "lr_warmup_steps": ("warmup_iter", "warmup_steps", "lr_warmup_steps"),
    "lr_decay_steps": ("end_iter", "decay_steps", "lr_decay_steps"),
    "lr_decay_style": ("decay_style", "lr_decay_style"),
    "num_steps": ("num_iters", "num_steps"),
}
_LR_FIELDS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")
_WD_FIELDS = ("start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")
_SCHEDULE_FIELDS = frozenset(Schedule.__dataclass_fields__)
# Saved by anneal, absent from Megatron's state dicts: checked only when the checkpoint has them.
_ANNEAL_FIELDS = ("init_lr", "wsd_decay_steps", "lr_wsd_decay_style")
_UNSET = object()


@dataclass(frozen=True)
class LoadedField:
    name: str
    config: Any
    checkpoint: Any
    in_force: Any
    source: str  # who won: "config" (override), "checkpoint", "both" (equal), "branch" or "extend"

    @property
    def differs(self) -> bool:
        return self.config != self.checkpoint


@dataclass(frozen=True)
class LoadReport:
    """What ``load_state_dict`` took from the checkpoint and what it kept from the config."""

    mode: str  # "override", "use-checkpoint", "strict", "branch" or "extend"
    num_steps: float
    fields: list[LoadedField] = field(default_factory=list)

    def table(self) -> str:
        """One row per setting; ``*`` marks a setting where config and checkpoint differ, with its winner.
        One line when nothing differs."""
        changed = sum(f.differs for f in self.fields)
        if not changed:
            return (f"scheduler resumed at num_steps={self.num_steps} ({self.mode} mode): config and checkpoint "
                    f"agree on all {len(self.fields)} settings")
        this_run = self.mode if self.mode in ("branch", "extend") else "config"
        rows = [("", "field", this_run, "checkpoint", "in force", "from")]
        for f in self.fields:
            winner = f"{f.source} wins" if f.differs else "both (equal)"
            values = (_cell(f.config), _cell(f.checkpoint), _cell(f.in_force))
            rows.append(("*" if f.differs else "", f.name, *values, winner))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        header = (f"scheduler resumed at num_steps={self.num_steps} ({self.mode} mode): "
                  f"{changed} setting(s) differ between config and checkpoint (marked *)")
        return "\n".join([header, *lines])


def _cell(value: Any) -> str:
    """A setting as the table shows it: exact (repr), param-group bounds as max/min per group."""
    if isinstance(value, list):
        return ", ".join(f"{g.get('max_lr', '-')!r}/{g.get('min_lr', '-')!r}" for g in value)
    return repr(value)


class OptimizerParamScheduler:
    """Megatron-Core's ``OptimizerParamScheduler``, same constructor, methods and numbers.

    The settings live in one frozen ``Schedule`` (``self.schedule``), replaced whole on load or
    branch; Megatron's attribute names (``max_lr``, ``lr_decay_steps``, ...) read it, and setting one
    replaces the schedule. ``resume_mode`` ("branch" or "extend", from ``anneal.resume``) makes the
    next ``load_state_dict`` keep this schedule and take only the position from the checkpoint;
    ``param_group_bounds`` replaces the groups' ``max_lr`` / ``min_lr`` (a branch from a decay).
    """

    def __init__(
        self,
        optimizer: Any,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: float,
        lr_decay_steps: float,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: float,
        wd_incr_style: str,
        use_checkpoint_opt_param_scheduler: bool = True,
        override_opt_param_scheduler: bool = False,
        wsd_decay_steps: float | None = None,
        lr_wsd_decay_style: str | None = None,
        resume_mode: str | None = None,
        param_group_bounds: list[dict] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.schedule = Schedule(init_lr, float(max_lr), min_lr, lr_warmup_steps, lr_decay_steps, lr_decay_style,
                                 start_wd, end_wd, wd_incr_steps, wd_incr_style, wsd_decay_steps, lr_wsd_decay_style)
        self.num_steps = 0
        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise ConfigError(
                "override_opt_param_scheduler (True) and use_checkpoint_opt_param_scheduler (True) "
                "are mutually exclusive: set at most one"
            )
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.resume_mode = resume_mode
        validate_schedule(self.schedule)
        for group, bounds in zip(optimizer.param_groups, param_group_bounds or ()):
            group.update(bounds)  # a branch from a decay: each group's lr in force is its new peak
        self.step(0)
        logger.info("> learning rate decay style: %s", self.lr_decay_style)

    @classmethod
    def from_schedule(cls, optimizer: Any, schedule: Schedule, **flags: Any) -> OptimizerParamScheduler:
        return cls(optimizer, **dataclasses.asdict(schedule), **flags)

    def __getattr__(self, name: str) -> Any:  # only for names not found otherwise: Megatron's attributes
        if name in _SCHEDULE_FIELDS and "schedule" in self.__dict__:
            return getattr(self.__dict__["schedule"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SCHEDULE_FIELDS:  # Megatron code sets settings one by one: replace the schedule whole
            value, name = dataclasses.replace(self.schedule, **{name: value}), "schedule"
        super().__setattr__(name, value)

    def phases(self) -> Phases:
        """Warmup end, stable end / anneal start, decay end and wd ramp end, in steps."""
        return phases(self.schedule)

    def get_lr(self, param_group: dict) -> float:
        s = self.schedule
        return lr_at(s, self.num_steps, param_group.get("max_lr", s.max_lr), param_group.get("min_lr", s.min_lr))

    def get_wd(self, param_group: dict | None = None) -> float:
        s = self.schedule
        group = param_group or {}
        return wd_at(s, self.num_steps, group.get("start_wd", s.start_wd), group.get("end_wd", s.end_wd))

    def observe(self, metric: float) -> None:
        """The validation loss after an evaluation: Megatron's schedules do not follow a metric."""

    def step(self, increment: float) -> None:
        """Advance by ``increment`` steps (anneal's loop passes the global batch size: samples)."""
        self.num_steps += increment
        s = self.schedule
        for group in self.optimizer.param_groups:
            lr = lr_at(s, self.num_steps, group.get("max_lr", s.max_lr), group.get("min_lr", s.min_lr))
            wd = wd_at(s, self.num_steps, group.get("start_wd", s.start_wd), group.get("end_wd", s.end_wd))
            current = group.get("lr")
            if hasattr(current, "fill_"):
                current.fill_(lr)  # a tensor lr (capturable / fused optimizers) keeps its identity
            else:
                group["lr"] = lr
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        """Megatron's ten keys, plus ``init_lr`` and the WSD settings, which Megatron forgets, and each
        param group's lr bounds (``param_group_bounds``), which belong to the schedule in force."""
        s = self.schedule
        return {
            "max_lr": s.max_lr,
            "lr_warmup_steps": s.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": s.lr_decay_style,
            "lr_decay_steps": s.lr_decay_steps,
            "min_lr": s.min_lr,
            "start_wd": s.start_wd,
            "end_wd": s.end_wd,
            "wd_incr_style": s.wd_incr_style,
            "wd_incr_steps": s.wd_incr_steps,
            "init_lr": s.init_lr,
            "wsd_decay_steps": s.wsd_decay_steps,
            "lr_wsd_decay_style": s.lr_wsd_decay_style,
            "param_group_bounds": group_bounds(self.optimizer.param_groups),
        }

    def load_state_dict(self, state_dict: dict) -> LoadReport:
        """Restore ``num_steps`` and settle each setting between config and checkpoint.

        As Megatron: ``override_opt_param_scheduler`` keeps the config, ``use_checkpoint_...``
        takes the checkpoint, and with neither the two must agree. Unlike Megatron, a strict-mode
        mismatch lists every differing field at once and changes nothing; a combination that
        would fail later (say a WSD checkpoint without WSD settings) is rejected now, also before
        anything changes. Megatron's own state dicts (no WSD keys, no wd keys, legacy names) load.
        The param groups' lr bounds follow the same rule (Megatron keeps whatever the groups carry).
        A branch or an extension (``resume_mode``) keeps this schedule and these bounds.
        """
        fields = [self._settle(name, _read(state_dict, name)) for name in _present_fields(state_dict)]
        bounds = self._settle_bounds(state_dict.get("param_group_bounds"))
        mismatched = [f for f in [*fields, bounds] if f is not None and f.source == "mismatch"]
        if mismatched:
            diffs = "; ".join(f"{f.name}: config {f.config!r} vs checkpoint {f.checkpoint!r}" for f in mismatched)
            raise ConfigError(
                f"scheduler checkpoint does not match the config in {len(mismatched)} field(s): {diffs}. "
                "Set scheduler.use_checkpoint_opt_param_scheduler=true to take the checkpoint's values "
                "or scheduler.override_opt_param_scheduler=true to keep the config's"
            )
        values = {f.name: f.in_force for f in fields}
        loaded = dataclasses.replace(self.schedule, **values)
        validate_schedule(loaded, prefix="loaded scheduler ")
        if bounds is not None:
            for group, saved in zip(self.optimizer.param_groups, bounds.in_force):
                group.update(saved)
        # Megatron's order: lr settings, then step to the saved position, then wd settings, so the
        # wd written into the param groups by this step still comes from the previous wd settings.
        self.schedule = dataclasses.replace(loaded, **{n: getattr(self.schedule, n) for n in _WD_FIELDS})
        self.step(increment=_read(state_dict, "num_steps"))
        self.schedule = loaded
        report = LoadReport(self.mode, self.num_steps, fields + ([bounds] if bounds is not None else []))
        return report  # the caller prints report.table() once (Checkpointer.load)

    @property
    def mode(self) -> str:
        """How load_state_dict settles config vs checkpoint: "override", "use-checkpoint" or "strict"
        (or the ``resume_mode``, "branch" or "extend", which keeps the config's schedule)."""
        if self.resume_mode:
            return self.resume_mode
        if self.override_opt_param_scheduler:
            return "override"
        return "use-checkpoint" if self.use_checkpoint_opt_param_scheduler else "strict"

    def _settle(self, name: str, checkpoint_value: Any, config_value: Any = _UNSET) -> LoadedField:
        config_value = getattr(self.schedule, name) if config_value is _UNSET else config_value
        mode = self.mode
        if mode in ("override", "branch", "extend"):
            source = "config" if mode == "override" else mode
            return LoadedField(name, config_value, checkpoint_value, config_value, source)
        if mode == "use-checkpoint":
            return LoadedField(name, config_value, checkpoint_value, checkpoint_value, "checkpoint")
        source = "both" if config_value == checkpoint_value else "mismatch"
        return LoadedField(name, config_value, checkpoint_value, checkpoint_value, source)

    def _settle_bounds(self, saved: list[dict] | None) -> LoadedField | None:
        current = group_bounds(self.optimizer.param_groups)
        if saved is None or saved == current:
            return None
        if len(saved) != len(current):
            raise ConfigError(f"scheduler checkpoint has {len(saved)} param groups, this run {len(current)}")
        return self._settle("param_group_bounds", saved, current)


def group_bounds(groups: list[dict]) -> list[dict[str, float]]:
    """Each param group's own ``max_lr`` / ``min_lr`` (empty when it has none)."""
    return [{k: float(g[k]) for k in ("max_lr", "min_lr") if k in g} for g in groups]


def saved_settings(state_dict: dict) -> dict[str, Any]:
    """The schedule settings a scheduler state dict carries (Megatron's legacy key names understood)."""
    return {name: _read(state_dict, name) for name in _present_fields(state_dict)}


def _present_fields(state_dict: dict) -> list[str]:
    """The settings a checkpoint carries, in Megatron's load order, then anneal's extras."""
    names = list(_LR_FIELDS)
    names += [n for n in _ANNEAL_FIELDS if n in state_dict]
    if "start_wd" in state_dict:  # Megatron's older state dicts have no weight-decay keys
        names += _WD_FIELDS
    return names


def _read(state_dict: dict, name: str) -> Any:
    for key in _ALIASES.get(name, (name,)):  # a legacy key wins when present, as in Megatron
        if key in state_dict:
            return state_dict[key]
    raise ConfigError(f"scheduler state dict has no {name!r} (keys: {sorted(state_dict)})")
