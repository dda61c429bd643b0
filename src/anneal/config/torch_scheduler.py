"""``scheduler.`` for the schedules of ``torch.optim.lr_scheduler``: the class, its kwargs, a warmup.

The class is named by its dotted path (``torch.optim.lr_scheduler.MultiStepLR``) and gets ``kwargs``
as PyTorch documents them, with steps in iterations: anneal steps it once per iteration. A warmup
(``warmup_iters`` > 0) runs first in one of ``WARMUP_STYLES``, built from torch's own classes and
joined to the schedule by ``SequentialLR``, so the schedule's iterations count from the warmup's end.

anneal sets what ties a schedule to the run: each param group starts from its own ``max_lr``
(``optimizer.lr``, ``decoupled_lr``, ``lr_mult``), CyclicLR cycles between each group's ``min_lr``
and ``max_lr``, OneCycleLR peaks at each group's ``max_lr``, and a null (or absent) length kwarg in
``RUN_LENGTH_KWARGS`` means the rest of the run after the warmup. Importing this module imports no
torch; validating a config does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from anneal.errors import ConfigError, check_choice, closest

MODULE = "torch.optim.lr_scheduler"
WARMUP_STYLES = ("linear", "constant", "exponential", "cosine")
# Classes that take callables or other schedulers, which a YAML config cannot hold.
UNSUPPORTED = ("LRScheduler", "_LRScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR",
               "ChainedScheduler")
# Length kwargs that default (when null or absent) to the run's iterations after the warmup.
RUN_LENGTH_KWARGS = {"CosineAnnealingLR": "T_max", "OneCycleLR": "total_steps", "PolynomialLR": "total_iters"}
# kwargs anneal sets, with where the value comes from instead.
OWNED_KWARGS = {
    "last_epoch": "anneal restores the position from the checkpoint",
    "CyclicLR.base_lr": "it is each param group's min_lr: set optimizer.min_lr (or decoupled_min_lr)",
    "CyclicLR.max_lr": "it is each param group's max_lr: set optimizer.lr (or decoupled_lr)",
    "CyclicLR.scale_fn": "a config cannot hold a function: use kwargs.mode",
    "CyclicLR.scale_mode": "torch uses it only with a scale_fn; kwargs.mode decides it",
    "OneCycleLR.max_lr": "it is each param group's max_lr: set optimizer.lr (or decoupled_lr)",
    "OneCycleLR.epochs": "anneal steps once per iteration: set kwargs.total_steps (null: the whole run)",
    "OneCycleLR.steps_per_epoch": "anneal steps once per iteration: set kwargs.total_steps instead",
}
# Classes whose kwargs.cycle_momentum must be false (torch's default is true).
CYCLES_MOMENTUM = ("CyclicLR", "OneCycleLR")
# Classes that shape the start themselves: a separate warmup would fight them.
OWN_WARMUP = {"CyclicLR": "its cycle starts at base_lr and rises over kwargs.step_size_up",
              "OneCycleLR": "it warms up itself over kwargs.pct_start of its steps"}
CHOICES = {
    "CyclicLR.mode": ("triangular", "triangular2", "exp_range"),
    "OneCycleLR.anneal_strategy": ("cos", "linear"),
    "ReduceLROnPlateau.mode": ("min",),  # anneal feeds it the validation loss: lower is better
    "ReduceLROnPlateau.threshold_mode": ("rel", "abs"),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# kwarg (or Class.kwarg) -> (the rule as the error states it, the check).
RULES = {
    "gamma": ("a number > 0", lambda v: _number(v) and v > 0),
    "milestones": ("a list of increasing integers > 0 (iterations after the warmup)",
                   lambda v: isinstance(v, list) and all(_integer(m) and m > 0 for m in v)
                   and all(a < b for a, b in pairwise(v))),
    "step_size": ("an integer > 0", lambda v: _integer(v) and v > 0),
    "step_size_up": ("an integer > 0", lambda v: _integer(v) and v > 0),
    "step_size_down": ("null or an integer > 0", lambda v: v is None or (_integer(v) and v > 0)),
    "T_0": ("an integer > 0", lambda v: _integer(v) and v > 0),
    "T_mult": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "eta_min": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "patience": ("an integer >= 0 (evaluations)", lambda v: _integer(v) and v >= 0),
    "cooldown": ("an integer >= 0 (evaluations)", lambda v: _integer(v) and v >= 0),
    "threshold": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "min_lr": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "pct_start": ("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1),
    "div_factor": ("a number > 0", lambda v: _number(v) and v > 0),
    "final_div_factor": ("a number > 0", lambda v: _number(v) and v > 0),
    "ReduceLROnPlateau.factor": ("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1),
    "ConstantLR.factor": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
}
RULES.update({f"{cls}.{name}": ("null (the run after the warmup) or an integer > 0",
                                 lambda v: v is None or (_integer(v) and v > 0))
              for cls, name in RUN_LENGTH_KWARGS.items()})


@dataclass
class TorchSchedulerConfig:
    name: str = f"{MODULE}.CosineAnnealingLR"  # the class, by its dotted path
    kwargs: dict = field(default_factory=dict)  # its arguments, steps in iterations
    warmup_iters: int = 0  # iterations of warmup before the torch schedule starts (0: none)
    warmup_style: str = "linear"  # one of WARMUP_STYLES
    warmup_start_factor: float = 0.01  # the warmup starts at this fraction of each group's max_lr
    use_checkpoint_opt_param_scheduler: bool = False  # on resume, the checkpoint's settings win

    @property
    def class_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def validate(self) -> None:
        names = kwarg_names(torch_class(self.name))
        for key, value in self.kwargs.items():
            _check_kwarg(self.class_name, str(key), value, names)
        if self.class_name in CYCLES_MOMENTUM and self.kwargs.get("cycle_momentum", True) is not False:
            shown = self.kwargs.get("cycle_momentum", "unset: torch's default is true")
            raise ConfigError(
                f"scheduler.kwargs.cycle_momentum ({shown}) must be false for {self.class_name}: anneal's "
                "optimizers take momentum from optimizer.adam_beta1 / optimizer.sgd_momentum"
            )
        if self.warmup_iters < 0:
            raise ConfigError(f"scheduler.warmup_iters ({self.warmup_iters}) must be >= 0")
        check_choice("scheduler.warmup_style", self.warmup_style, WARMUP_STYLES)
        if not 0 < self.warmup_start_factor <= 1:
            factor = self.warmup_start_factor
            raise ConfigError(f"scheduler.warmup_start_factor ({factor}) must be in (0, 1]")
        if self.warmup_iters and self.class_name in OWN_WARMUP:
            raise ConfigError(f"scheduler.warmup_iters ({self.warmup_iters}) must be 0 for "
                              f"{self.class_name}: {OWN_WARMUP[self.class_name]}")


@dataclass(frozen=True)
class TorchSchedule:
    """What ``derive()`` resolves from a ``TorchSchedulerConfig``: all the scheduler is built from."""

    name: str
    kwargs: dict  # run-length kwargs filled in
    warmup_iters: int
    warmup_style: str
    warmup_start_factor: float
    max_lr: float  # optimizer.lr; each param group starts from its own max_lr
    min_lr: float  # optimizer.min_lr (0.0 when unset): the param groups' fallback min_lr
    weight_decay: float  # constant; each group gets weight_decay * wd_mult
    train_iters: int

    @property
    def class_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def follows_metric(self) -> bool:
        """True for ReduceLROnPlateau: the lr after the warmup depends on the validation loss."""
        return self.class_name == "ReduceLROnPlateau"

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"


def torch_class(name: str) -> type:
    """The scheduler class ``name`` names, or a ConfigError that lists the supported ones."""
    from torch.optim import lr_scheduler

    supported = sorted(n for n in dir(lr_scheduler)
                       if _is_scheduler(getattr(lr_scheduler, n)) and n not in UNSUPPORTED)
    module, _, short = name.rpartition(".")
    if module != MODULE:
        hint = closest(short, supported)
        suggestion = f"; did you mean '{MODULE}.{hint}'?" if hint else ""
        raise ConfigError(f"scheduler.name ({name!r}) must be a class of {MODULE}{suggestion}")
    if short in UNSUPPORTED and hasattr(lr_scheduler, short):
        raise ConfigError(f"scheduler.name ({name!r}) takes Python callables or other schedulers, which a "
                          "config cannot hold; for a warmup shape use scheduler.warmup_style")
    if short not in supported:
        hint = closest(short, supported)
        suggestion = f"; did you mean '{MODULE}.{hint}'?" if hint else f" (supported: {', '.join(supported)})"
        raise ConfigError(f"scheduler.name ({name!r}) is not a scheduler of {MODULE}{suggestion}")
    return getattr(lr_scheduler, short)


def kwarg_names(cls: type) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "optimizer")]


def _is_scheduler(obj) -> bool:
    from torch.optim import lr_scheduler

    return isinstance(obj, type) and issubclass(obj, lr_scheduler.LRScheduler)


def _check_kwarg(class_name: str, key: str, value, names: list[str]) -> None:
    path = f"scheduler.kwargs.{key}"
    if key not in names:
        hint = closest(key, names)
        suggestion = f"; did you mean scheduler.kwargs.{hint}?" if hint else ""
        listed = ", ".join(names)
        raise ConfigError(f"{path} is not an argument of {class_name} (arguments: {listed}){suggestion}")
    why = OWNED_KWARGS.get(f"{class_name}.{key}") or OWNED_KWARGS.get(key)
    if why:
        raise ConfigError(f"{path} ({value!r}) cannot be set for {class_name}: {why}")
    if not _plain(value):
        raise ConfigError(f"{path} ({value!r}) must be a number, string, boolean, null or a list of those")
    rule = RULES.get(f"{class_name}.{key}") or RULES.get(key)
    if rule and not rule[1](value):
        raise ConfigError(f"{path} ({value!r}) must be {rule[0]}")
    choices = CHOICES.get(f"{class_name}.{key}")
    if choices:
        check_choice(path, value, choices)


def _plain(value) -> bool:
    if isinstance(value, list):
        return all(_plain(v) and not isinstance(v, list) for v in value)
    return value is None or isinstance(value, (int, float, str, bool))
