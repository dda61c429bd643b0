"""``TorchScheduler``: a ``torch.optim.lr_scheduler`` schedule behind ``OptimizerParamScheduler``'s API.

torch's schedulers drive a ``torch.optim.Optimizer``; anneal's optimizers are not one. So the
scheduler runs on a shadow optimizer, one single-parameter group per real param group with ``lr``
set to that group's ``max_lr``, and every ``step`` copies the shadow's lrs into the real groups
(a tensor ``lr`` is filled in place) together with the constant ``weight_decay * wd_mult``. The
shadow also keeps what torch writes into groups (OneCycleLR's ``initial_lr``, ``max_lr``, ...)
away from anneal's own ``max_lr`` / ``min_lr``.

One torch step per iteration; ``num_steps`` counts samples as Megatron's does. ReduceLROnPlateau is
stepped by ``observe(valid_loss)`` after each evaluation instead (its warmup, if any, per iteration).
The state dict is JSON: torch's state with Counters and tuples tagged, plus the shadow's groups.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch.optim import lr_scheduler

from anneal.config.torch_scheduler import TorchSchedule, torch_class
from anneal.errors import ConfigError
from anneal.scheduler.param_scheduler import LoadedField, LoadReport

# Settings saved with the state and compared on resume, in TorchSchedule's names.
SETTINGS = ("name", "kwargs", "warmup_iters", "warmup_style", "warmup_start_factor", "weight_decay")


class TorchScheduler:
    """Steps a torch scheduler once per iteration and writes its lrs into ``optimizer.param_groups``."""

    def __init__(self, optimizer: Any, schedule: TorchSchedule, *,
                 use_checkpoint_opt_param_scheduler: bool = False) -> None:
        self.optimizer = optimizer
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.num_steps = 0  # samples, as Megatron's scheduler counts them
        self.iterations = 0  # torch steps taken
        self._build(schedule)
        self.step(0)

    def _build(self, schedule: TorchSchedule) -> None:
        self.schedule = schedule
        groups = self.optimizer.param_groups
        self._shadow = _ShadowOptimizer([float(g.get("max_lr", schedule.max_lr)) for g in groups])
        min_lrs = [float(g.get("min_lr", schedule.min_lr)) for g in groups]
        self._stepped, self._plateau = build_torch_scheduler(self._shadow, schedule, min_lrs)
        self._shadow.step()  # a no-op telling torch the optimizer steps before the scheduler (else it warns)

    @property
    def mode(self) -> str:
        """How load_state_dict settles config vs checkpoint: "use-checkpoint" or "strict"."""
        return "use-checkpoint" if self.use_checkpoint_opt_param_scheduler else "strict"

    def step(self, increment: float) -> None:
        """Advance one iteration of ``increment`` samples (0: only rewrite the param groups)."""
        self.num_steps += increment
        if increment:
            self._advance()
        for group, shadow in zip(self.optimizer.param_groups, self._shadow.param_groups):
            current = group.get("lr")
            if hasattr(current, "fill_"):
                current.fill_(shadow["lr"])  # a tensor lr (capturable / fused optimizers) keeps its identity
            else:
                group["lr"] = shadow["lr"]
            group["weight_decay"] = self.schedule.weight_decay * group.get("wd_mult", 1.0)

    def _advance(self) -> None:
        self.iterations += 1
        if self._plateau is None or self.iterations <= self.schedule.warmup_iters:
            self._stepped.step()

    def observe(self, metric: float) -> None:
        """The validation loss after an evaluation: ReduceLROnPlateau steps on it, after the warmup."""
        if self._plateau is None or self.iterations < self.schedule.warmup_iters:
            return
        self._plateau.step(metric)
        self.step(0)

    def get_lr(self, param_group: dict) -> float:
        groups = self.optimizer.param_groups
        index = next((i for i, g in enumerate(groups) if g is param_group), None)
        if index is None:
            raise ValueError("get_lr: param_group is not one of the optimizer's param groups")
        return self._shadow.param_groups[index]["lr"]

    def get_wd(self, param_group: dict | None = None) -> float:
        """The weight decay before the group's ``wd_mult`` (constant for torch schedules)."""
        return self.schedule.weight_decay

    def state_dict(self) -> dict:
        """JSON-serialisable: the settings, the position and torch's own state."""
        settings = asdict(self.schedule)
        return {
            "kind": "torch",
            **{name: settings[name] for name in SETTINGS},
            "num_steps": self.num_steps,
            "iterations": self.iterations,
            "shadow_groups": [_scalars(g) for g in self._shadow.param_groups],
            "torch": to_json(self._stepped.state_dict()) if self._stepped is not None else None,
            "plateau": to_json(self._plateau.state_dict()) if self._plateau is not None else None,
        }

    def load_state_dict(self, state_dict: dict) -> LoadReport:
        """Settle the settings (strict: they must match; use-checkpoint: the checkpoint's win), then resume.

        Nothing changes when the checkpoint is refused.
        """
        if state_dict.get("kind") != "torch":
            raise ConfigError("scheduler checkpoint was saved by Megatron's schedule (lr_decay_style); this "
                              "run uses a torch.optim.lr_scheduler schedule: resume with the same scheduler "
                              "family, or start fresh from the weights with checkpoint.finetune=true")
        fields = [self._settle(name, state_dict[name]) for name in SETTINGS]
        mismatched = [f for f in fields if f.source == "mismatch"]
        if mismatched:
            diffs = "; ".join(f"{f.name}: config {f.config!r} vs checkpoint {f.checkpoint!r}"
                              for f in mismatched)
            raise ConfigError(
                f"scheduler checkpoint does not match the config in {len(mismatched)} field(s): {diffs}. "
                "Set scheduler.use_checkpoint_opt_param_scheduler=true to take the checkpoint's values"
            )
        shadow_groups = state_dict["shadow_groups"]
        if len(shadow_groups) != len(self.optimizer.param_groups):
            raise ConfigError(f"scheduler checkpoint has {len(shadow_groups)} param groups, this run "
                              f"{len(self.optimizer.param_groups)}")
        in_force = replace(self.schedule, **{f.name: f.in_force for f in fields})
        if in_force != self.schedule:
            self._build(in_force)
        if self._stepped is not None:
            self._stepped.load_state_dict(from_json(state_dict["torch"]))
        if self._plateau is not None:
            self._plateau.load_state_dict(from_json(state_dict["plateau"]))
        for shadow, saved in zip(self._shadow.param_groups, shadow_groups):
            shadow.update(saved)
        self.num_steps = state_dict["num_steps"]
        self.iterations = state_dict["iterations"]
        self.step(0)
        return LoadReport(self.mode, self.num_steps, fields)

    def _settle(self, name: str, checkpoint_value: Any) -> LoadedField:
        config_value = getattr(self.schedule, name)
        if self.use_checkpoint_opt_param_scheduler:
            return LoadedField(name, config_value, checkpoint_value, checkpoint_value, "checkpoint")
        source = "both" if to_json(config_value) == checkpoint_value else "mismatch"
        return LoadedField(name, config_value, checkpoint_value, checkpoint_value, source)


def build_torch_scheduler(shadow: torch.optim.Optimizer, schedule: TorchSchedule,
                          min_lrs: Sequence[float]) -> tuple[Any, Any]:
    """``(stepped, plateau)`` on ``shadow``: the scheduler stepped each iteration; ReduceLROnPlateau or None.

    Each shadow group's ``lr`` must be its param group's max_lr. With a warmup, the warmup and the
    schedule are joined by SequentialLR; ReduceLROnPlateau cannot be (it steps on a metric), so then
    ``stepped`` is the warmup alone (None without one) and the plateau scheduler comes beside it.
    """
    cls = torch_class(schedule.name)
    kwargs = dict(schedule.kwargs)
    max_lrs = [g["lr"] for g in shadow.param_groups]
    if cls is lr_scheduler.CyclicLR:
        kwargs.update(base_lr=list(min_lrs), max_lr=max_lrs)
    elif cls is lr_scheduler.OneCycleLR:
        kwargs.update(max_lr=max_lrs)
    warmup = _warmup(shadow, schedule) if schedule.warmup_iters else None
    main = cls(shadow, **kwargs)
    if cls is lr_scheduler.ReduceLROnPlateau:
        return warmup, main
    if warmup is None:
        return main, None
    return lr_scheduler.SequentialLR(shadow, [warmup, main], milestones=[schedule.warmup_iters]), None


def _warmup(shadow: torch.optim.Optimizer, s: TorchSchedule) -> lr_scheduler.LRScheduler:
    """The warmup from ``warmup_start_factor`` × lr to lr over ``warmup_iters`` iterations."""
    f, n = s.warmup_start_factor, s.warmup_iters
    if s.warmup_style == "linear":
        return lr_scheduler.LinearLR(shadow, start_factor=f, end_factor=1.0, total_iters=n)
    if s.warmup_style == "constant":
        return lr_scheduler.ConstantLR(shadow, factor=f, total_iters=n)
    if s.warmup_style == "exponential":  # geometric: the same ratio every iteration
        return lr_scheduler.LambdaLR(shadow, lambda t: f ** (1.0 - min(t, n) / n))
    # cosine: slow at both ends
    return lr_scheduler.LambdaLR(shadow, lambda t: f + (1 - f) * (1 - math.cos(math.pi * min(t, n) / n)) / 2)


class _ShadowOptimizer(torch.optim.Optimizer):
    """A torch Optimizer that updates nothing: one group per real param group, for torch's schedulers."""

    def __init__(self, max_lrs: Sequence[float]) -> None:
        groups = [{"params": [torch.zeros(1)], "lr": lr} for lr in max_lrs]
        super().__init__(groups, {"lr": max_lrs[0] if max_lrs else 0.0})

    def add_param_group(self, param_group: dict) -> None:
        # torch's version imports torch._dynamo (2.5 s) to wrap itself; these groups need no checks
        self.param_groups.append(param_group)

    def step(self, closure: Any = None) -> None:
        return None


def _scalars(group: dict) -> dict:
    """A shadow group without its parameters: the values torch schedulers read and write."""
    return {k: v for k, v in group.items()
            if k != "params" and (v is None or isinstance(v, (int, float, str, bool)))}


def to_json(obj: Any) -> Any:
    """torch scheduler state as JSON data: a Counter and a tuple are tagged so ``from_json`` restores them."""
    if isinstance(obj, Counter):
        return {"__counter__": [[to_json(k), v] for k, v in obj.items()]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: to_json(v) for k, v in obj.items()}
        return {"__items__": [[to_json(k), to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"scheduler state value {obj!r} ({type(obj).__name__}) cannot be saved as JSON")


def from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__counter__"}:
        return Counter({from_json(k): v for k, v in obj["__counter__"]})
    if set(obj) == {"__items__"}:
        return {from_json(k): from_json(v) for k, v in obj["__items__"]}
    if set(obj) == {"__tuple__"}:
        return tuple(from_json(v) for v in obj["__tuple__"])
    return {k: from_json(v) for k, v in obj.items()}


def check_buildable(schedule: TorchSchedule) -> None:
    """Build the schedule on a one-group dummy optimizer; torch's own complaints become ConfigErrors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            TorchScheduler(_Groups(schedule), schedule)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"scheduler.kwargs ({json.dumps(schedule.kwargs)}) are refused by "
                          f"{schedule.class_name}: {error}") from error


def preview_lrs(schedule: TorchSchedule, iterations: Sequence[int]) -> list[float]:
    """The lr applied in each of ``iterations`` (increasing), stepping the real scheduler every iteration.

    Applied during iteration k is what the scheduler wrote after k - 1 steps, on a dummy optimizer
    with one group at ``schedule.max_lr``. ReduceLROnPlateau never observes a metric here: its lr
    stays at the value after the warmup.
    """
    scheduler = TorchScheduler(_Groups(schedule), schedule)
    group, advance = scheduler._shadow.param_groups[0], scheduler._advance
    lrs, done = [], 1  # iteration ``done`` is the next to be applied
    for k in iterations:
        for _ in range(k - done):  # a tight loop: torch's step is most of the time (~5 µs)
            advance()
        done = k
        lrs.append(group["lr"])
    return lrs


class _Groups:
    """A one-group stand-in for an optimizer: the scheduler only reads and writes ``param_groups``."""

    def __init__(self, schedule: TorchSchedule) -> None:
        self.param_groups = [{"max_lr": schedule.max_lr, "min_lr": schedule.min_lr}]

