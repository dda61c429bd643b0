"""``OptimizerParamScheduler``: Megatron-Core's stateful scheduler API over anneal's pure schedule.

It writes ``lr`` and ``weight_decay`` into every param group of any optimizer-like object whose
``param_groups`` is a list of dicts (a tensor ``lr`` is updated in place, so capturable / fused
optimizers keep their tensor). Per-group ``max_lr``, ``min_lr``, ``start_wd``, ``end_wd`` and
``wd_mult`` are read exactly as Megatron-Core reads them.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class LoadedField:
    name: str
    config: Any
    checkpoint: Any
    in_force: Any
    source: str  # "config" (override), "checkpoint", "both" (equal), or "config (not in checkpoint)"


@dataclass(frozen=True)
class LoadReport:
    """What ``load_state_dict`` took from the checkpoint and what it kept from the config."""

    mode: str  # "override", "use-checkpoint" or "strict"
    num_steps: float
    fields: list[LoadedField] = field(default_factory=list)

    def table(self) -> str:
        rows = [("field", "config", "checkpoint", "in force", "from")]
        rows += [(f.name, repr(f.config), repr(f.checkpoint), repr(f.in_force), f.source) for f in self.fields]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        header = f"scheduler resumed at num_steps={self.num_steps} ({self.mode} mode)"
        return "\n".join([header, *lines])


class OptimizerParamScheduler:
    """Megatron-Core's ``OptimizerParamScheduler``, same constructor, methods and numbers."""

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
    ) -> None:
        self.optimizer = optimizer
        self.init_lr = init_lr
        self.max_lr = float(max_lr)
        self.min_lr = min_lr
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.start_wd = start_wd
        self.end_wd = end_wd
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style
        self.num_steps = 0
        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise ConfigError(
                "override_opt_param_scheduler (True) and use_checkpoint_opt_param_scheduler (True) "
                "are mutually exclusive: set at most one"
            )
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        validate_schedule(self.schedule)
        self.step(0)
        logger.info("> learning rate decay style: %s", self.lr_decay_style)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _SCHEDULE_FIELDS:  # the cached Schedule is stale once a setting changes
            self.__dict__.pop("_schedule", None)

    @property
    def schedule(self) -> Schedule:
        """The current settings as a frozen ``Schedule`` (built once, again after a setting changes)."""
        cached = self.__dict__.get("_schedule")
        if cached is None:
            cached = self.__dict__["_schedule"] = self._build_schedule()
        return cached

    def _build_schedule(self) -> Schedule:
        return Schedule(
            init_lr=self.init_lr,
            max_lr=self.max_lr,
            min_lr=self.min_lr,
            lr_warmup_steps=self.lr_warmup_steps,
            lr_decay_steps=self.lr_decay_steps,
            lr_decay_style=self.lr_decay_style,
            start_wd=self.start_wd,
            end_wd=self.end_wd,
            wd_incr_steps=self.wd_incr_steps,
            wd_incr_style=self.wd_incr_style,
            wsd_decay_steps=self.wsd_decay_steps,
            lr_wsd_decay_style=self.lr_wsd_decay_style,
        )

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
        """Megatron's ten keys, plus ``init_lr`` and the WSD settings, which Megatron forgets."""
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
            "init_lr": self.init_lr,
            "wsd_decay_steps": self.wsd_decay_steps,
            "lr_wsd_decay_style": self.lr_wsd_decay_style,
        }

    def load_state_dict(self, state_dict: dict) -> LoadReport:
        """Restore ``num_steps`` and settle each setting between config and checkpoint.

        As Megatron: ``override_opt_param_scheduler`` keeps the config, ``use_checkpoint_...``
        takes the checkpoint, and with neither the two must agree. Unlike Megatron, a strict-mode
        mismatch lists every differing field at once and changes nothing; a combination that
        would fail later (say a WSD checkpoint without WSD settings) is rejected now, also before
        anything changes. Megatron's own state dicts (no WSD keys, no wd keys, legacy names) load.
        """
        fields = [self._settle(name, _read(state_dict, name)) for name in _present_fields(state_dict)]
        mismatched = [f for f in fields if f.source == "mismatch"]
        if mismatched:
            diffs = "; ".join(f"{f.name}: config {f.config!r} vs checkpoint {f.checkpoint!r}" for f in mismatched)
            raise ConfigError(
                f"scheduler checkpoint does not match the config in {len(mismatched)} field(s): {diffs}. "
                "Set scheduler.use_checkpoint_opt_param_scheduler=true to take the checkpoint's values "
                "or scheduler.override_opt_param_scheduler=true to keep the config's"
            )
        values = {f.name: f.in_force for f in fields}
        validate_schedule(Schedule(**{**self._settings(), **values}), prefix="loaded scheduler ")
        num_steps = _read(state_dict, "num_steps")
        # Megatron's order: lr settings, then step to the saved position, then wd settings, so the
        # wd written into the param groups by this step still comes from the previous wd settings.
        for f in fields:
            if f.name not in _WD_FIELDS:
                setattr(self, f.name, f.in_force)
        self.step(increment=num_steps)
        for f in fields:
            if f.name in _WD_FIELDS:
                setattr(self, f.name, f.in_force)
        report = LoadReport(self._mode(), self.num_steps, fields)
        logger.info("%s", report.table())
        return report

    @property
    def mode(self) -> str:
        """How load_state_dict settles config vs checkpoint: "override", "use-checkpoint" or "strict"."""
        return self._mode()

    def _mode(self) -> str:
        if self.override_opt_param_scheduler:
            return "override"
        return "use-checkpoint" if self.use_checkpoint_opt_param_scheduler else "strict"

    def _settings(self) -> dict:
        s = self.schedule
        return {name: getattr(s, name) for name in Schedule.__dataclass_fields__}

    def _settle(self, name: str, checkpoint_value: Any) -> LoadedField:
        config_value = getattr(self, name)
        mode = self._mode()
        if mode == "override":
            return LoadedField(name, config_value, checkpoint_value, config_value, "config")
        if mode == "use-checkpoint":
            return LoadedField(name, config_value, checkpoint_value, checkpoint_value, "checkpoint")
        source = "both" if config_value == checkpoint_value else "mismatch"
        return LoadedField(name, config_value, checkpoint_value, checkpoint_value, source)


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
