"""torch.optim.lr_scheduler schedules behind OptimizerParamScheduler's API: parity, resume, errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch.optim import lr_scheduler as L

from anneal.config.container import ConfigContainer
from anneal.config.derive import derive
from anneal.config.optimizer import OptimizerConfig
from anneal.config.torch_scheduler import TorchSchedulerConfig
from anneal.config.training import TrainingConfig
from anneal.errors import ConfigError
from anneal.scheduler import OptimizerParamScheduler, build_scheduler
from anneal.scheduler.torch_schedules import TorchScheduler, preview_lrs

M = "torch.optim.lr_scheduler"
ITERS, WARMUP, EVAL_EVERY, BATCH = 60, 5, 5, 4
MAX_LRS, MIN_LRS = [1e-3, 2e-3], [1e-5, 4e-5]  # group 1: a decoupled lr, as the embeddings get
# Validation losses at iterations 5, 10, ...: improving, then stuck (ReduceLROnPlateau halves the lr).
LOSSES = [3.0, 2.5, 2.2, 2.2, 2.2, 2.2, 2.1, 2.1, 2.1, 2.1, 2.1, 2.1]
PLATEAU = {"factor": 0.5, "patience": 1, "threshold": 1e-3}


def _cfg(cls: str, warmup: int = 0, style: str = "linear", **kwargs) -> TorchSchedulerConfig:
    return TorchSchedulerConfig(f"{M}.{cls}", kwargs, warmup_iters=warmup, warmup_style=style)


def _after_warmup(main, warmup=lambda o: L.LinearLR(o, start_factor=0.01, total_iters=WARMUP)):
    return lambda o: L.SequentialLR(o, [warmup(o), main(o)], milestones=[WARMUP])


def _cyclic(mode: str, **extra):
    return lambda o: L.CyclicLR(o, base_lr=MIN_LRS, max_lr=MAX_LRS, step_size_up=4, mode=mode,
                                cycle_momentum=False, **extra)


def _exponential_warmup(o):
    return L.LambdaLR(o, lambda t: 0.01 ** (1 - min(t, WARMUP) / WARMUP))


# name -> (config, the same schedule built by hand on a torch optimizer whose group lrs are MAX_LRS;
# None for the plateau, whose warmup steps per iteration and itself per evaluation: see _raw_lrs)
FAMILY = {
    "multistep": (_cfg("MultiStepLR", WARMUP, milestones=[10, 30], gamma=0.5),
                  _after_warmup(lambda o: L.MultiStepLR(o, milestones=[10, 30], gamma=0.5))),
    "exponential": (_cfg("ExponentialLR", WARMUP, gamma=0.95),
                    _after_warmup(lambda o: L.ExponentialLR(o, gamma=0.95))),
    "cyclic_triangular": (_cfg("CyclicLR", step_size_up=4, mode="triangular", cycle_momentum=False),
                          _cyclic("triangular")),
    "cyclic_triangular2": (_cfg("CyclicLR", step_size_up=4, mode="triangular2", cycle_momentum=False),
                           _cyclic("triangular2")),
    "cyclic_exp_range": (_cfg("CyclicLR", step_size_up=4, mode="exp_range", gamma=0.97, cycle_momentum=False),
                         _cyclic("exp_range", gamma=0.97)),
    "onecycle": (_cfg("OneCycleLR", pct_start=0.3, cycle_momentum=False),
                 lambda o: L.OneCycleLR(o, MAX_LRS, total_steps=ITERS, pct_start=0.3, cycle_momentum=False)),
    "cosine_warmup": (_cfg("CosineAnnealingLR", WARMUP, T_max=None, eta_min=1e-6),
                      _after_warmup(lambda o: L.CosineAnnealingLR(o, T_max=ITERS - WARMUP, eta_min=1e-6))),
    "plateau": (_cfg("ReduceLROnPlateau", WARMUP, **PLATEAU), None),
    "exponential_warmup_multistep": (
        _cfg("MultiStepLR", WARMUP, "exponential", milestones=[10, 30], gamma=0.5),
        _after_warmup(lambda o: L.MultiStepLR(o, milestones=[10, 30], gamma=0.5), _exponential_warmup)),
}


def _train(**changes) -> TrainingConfig:
    return TrainingConfig(**{"train_iters": ITERS, "global_batch_size": BATCH, "micro_batch_size": 2,
                             "eval_interval": EVAL_EVERY, "eval_iters": 1, **changes})


def _schedule(config: TorchSchedulerConfig, **train_changes):
    config.validate()
    optimizer = OptimizerConfig(lr=MAX_LRS[0], min_lr=MIN_LRS[0], weight_decay=0.1)
    return derive(_train(**train_changes), optimizer, config).schedule


def _optimizer() -> torch.optim.Optimizer:
    """anneal's param groups: bounds and wd_mult per group (the lr is the scheduler's to write)."""
    groups = [{"params": [torch.zeros(2, requires_grad=True)], "lr": 0.0, "max_lr": hi, "min_lr": lo,
               "wd_mult": m} for hi, lo, m in zip(MAX_LRS, MIN_LRS, (1.0, 0.0))]
    return torch.optim.SGD(groups, lr=0.0)


def _adapter(name: str, **kwargs) -> TorchScheduler:
    return TorchScheduler(_optimizer(), _schedule(FAMILY[name][0]), **kwargs)


def _run(scheduler: TorchScheduler, start: int = 1, stop: int = ITERS) -> list[tuple[float, ...]]:
    """Iterations start..stop as the loop drives them: read the lrs, step, evaluate every EVAL_EVERY."""
    lrs = []
    for k in range(start, stop + 1):
        lrs.append(tuple(g["lr"] for g in scheduler.optimizer.param_groups))
        scheduler.step(BATCH)
        if k % EVAL_EVERY == 0:
            scheduler.observe(LOSSES[k // EVAL_EVERY - 1])
    return lrs


def _raw_lrs(name: str) -> list[tuple[float, ...]]:
    """The lrs torch's own scheduler writes into a torch optimizer, stepped once per iteration."""
    opt = torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)], "lr": lr} for lr in MAX_LRS])
    build = FAMILY[name][1]
    if build is not None:
        raw, plateau = build(opt), None
    else:
        raw = L.LinearLR(opt, start_factor=0.01, total_iters=WARMUP)
        plateau = L.ReduceLROnPlateau(opt, **PLATEAU)
    opt.step()  # no gradients: tells torch the optimizer stepped first
    lrs = []
    for k in range(1, ITERS + 1):
        lrs.append(tuple(g["lr"] for g in opt.param_groups))
        if plateau is None or k <= WARMUP:
            raw.step()
        if plateau is not None and k % EVAL_EVERY == 0 and k >= WARMUP:
            plateau.step(LOSSES[k // EVAL_EVERY - 1])
    return lrs


@pytest.mark.parametrize("name", FAMILY)
def test_adapter_applies_exactly_the_lrs_of_torchs_own_scheduler(name: str) -> None:
    lrs = _run(_adapter(name))
    assert lrs == _raw_lrs(name)  # exactly, every group, every iteration
    assert len(set(lrs)) > 3, "the schedule should move in this run"


@pytest.mark.parametrize("name", FAMILY)
def test_state_dict_through_json_resumes_identically(name: str) -> None:
    straight = _adapter(name)
    _run(straight, 1, 23)
    saved = json.loads(json.dumps(straight.state_dict()))  # what the checkpointer writes and reads
    resumed = _adapter(name)
    report = resumed.load_state_dict(saved)
    resumed.step(0)  # as the checkpointer does after settling the param-group bounds
    assert "resumed at num_steps=92" in report.table() and {f.source for f in report.fields} == {"both"}
    assert resumed.num_steps == straight.num_steps == 23 * BATCH
    assert _run(resumed, 24) == _run(straight, 24)


def test_plateau_halves_the_lr_when_the_validation_loss_stops_improving() -> None:
    scheduler = _adapter("plateau")
    lrs = [lr for lr, _ in _run(scheduler)]
    peak = lrs[WARMUP]  # LinearLR's last warmup step: max_lr up to rounding
    assert peak == pytest.approx(MAX_LRS[0], rel=1e-12) and set(lrs[WARMUP:25]) == {peak}
    # Evaluations at 5 (warmup over: best 3.0), 10, 15 improve; 20 and 25 do not (patience 1): halved at 25.
    assert lrs[26 - 1] == peak * 0.5
    # 30 does not improve on 2.2 either: one bad evaluation so far; 35 improves (2.1); 40, 45 do not.
    assert lrs[45 - 1] == peak * 0.5 and lrs[46 - 1] == peak * 0.25
    assert scheduler.get_lr(scheduler.optimizer.param_groups[0]) == peak * 0.125  # 55: once more


def test_plateau_ignores_evaluations_during_the_warmup() -> None:
    scheduler = _adapter("plateau")
    for _ in range(3):
        scheduler.step(BATCH)
        scheduler.observe(10.0)  # would cut the lr after the warmup
    assert scheduler._plateau.num_bad_epochs == 0 and scheduler._plateau.best == math.inf


def test_other_schedules_ignore_observations_and_megatrons_too() -> None:
    scheduler = _adapter("exponential")
    scheduler.step(BATCH)
    before = scheduler.state_dict()
    scheduler.observe(1.0)
    assert scheduler.state_dict() == before
    assert OptimizerParamScheduler.observe(object(), 1.0) is None


def test_weight_decay_is_constant_times_wd_mult_and_a_tensor_lr_is_filled_in_place() -> None:
    opt = _optimizer()
    lr = torch.tensor(0.0)
    opt.param_groups[0]["lr"] = lr
    scheduler = TorchScheduler(opt, _schedule(FAMILY["exponential"][0]))
    scheduler.step(BATCH)
    assert opt.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(scheduler.get_lr(opt.param_groups[0]))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert scheduler.get_wd() == 0.1 and scheduler.mode == "strict"


def test_build_scheduler_picks_megatron_or_torch_from_the_schedule(compose) -> None:
    megatron = compose("scheduler=cosine", "train.train_iters=60", "scheduler.lr_warmup_iters=5")
    scheduler = build_scheduler(_optimizer(), megatron.scheduler, megatron.validate().schedule)
    assert isinstance(scheduler, OptimizerParamScheduler)
    torch_cfg = compose("scheduler=multistep", "train.train_iters=60", "scheduler.warmup_iters=5")
    scheduler = build_scheduler(_optimizer(), torch_cfg.scheduler, torch_cfg.validate().schedule)
    assert isinstance(scheduler, TorchScheduler)


def test_preview_steps_the_same_scheduler_the_training_does() -> None:
    for name in ("cosine_warmup", "cyclic_triangular2", "plateau"):
        schedule = _schedule(FAMILY[name][0])
        one_group = TorchScheduler(_OneGroup(schedule), schedule)
        applied = []
        for _ in range(ITERS):
            applied.append(one_group.optimizer.param_groups[0]["lr"])
            one_group.step(BATCH)
        assert preview_lrs(schedule, list(range(1, ITERS + 1))) == applied
        assert preview_lrs(schedule, [1, 7, ITERS]) == [applied[0], applied[6], applied[-1]]


class _OneGroup:
    def __init__(self, schedule) -> None:
        self.param_groups = [{"max_lr": schedule.max_lr, "min_lr": schedule.min_lr}]


# -- resume across changed settings ---------------------------------------------------------------------

def test_strict_resume_lists_every_changed_setting_and_changes_nothing() -> None:
    straight = _adapter("multistep")
    _run(straight, 1, 12)
    saved = json.loads(json.dumps(straight.state_dict()))
    changed = TorchScheduler(_optimizer(), replace(_schedule(FAMILY["multistep"][0]), warmup_iters=3,
                                                   kwargs={"milestones": [10, 30], "gamma": 0.3}))
    before = changed.state_dict()
    with pytest.raises(ConfigError, match=r"^scheduler checkpoint does not match the config in 2 field\(s\): "
                                          r"kwargs: .*gamma.*; warmup_iters: config 3 vs checkpoint 5\. Set "
                                          r"scheduler.use_checkpoint_opt_param_scheduler=true"):
        changed.load_state_dict(saved)
    assert changed.state_dict() == before


def test_use_checkpoint_resume_continues_the_checkpoints_schedule() -> None:
    straight = _adapter("multistep")
    _run(straight, 1, 12)
    saved = json.loads(json.dumps(straight.state_dict()))
    changed = TorchScheduler(_optimizer(), replace(_schedule(FAMILY["multistep"][0]), warmup_iters=0,
                                                   kwargs={"gamma": 0.1, "milestones": [1]}),
                             use_checkpoint_opt_param_scheduler=True)
    report = changed.load_state_dict(saved)
    assert report.mode == "use-checkpoint" and {f.source for f in report.fields} == {"checkpoint"}
    changed.step(0)
    assert _run(changed, 13) == _run(straight, 13)


def test_a_megatron_checkpoint_is_refused_by_a_torch_schedule() -> None:
    megatron = OptimizerParamScheduler(_optimizer(), 0.0, 1e-3, 0.0, 10, 100, "cosine", 0.1, 0.1, 100,
                                       "constant", use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ConfigError, match="^scheduler checkpoint was saved by Megatron's schedule"):
        _adapter("multistep").load_state_dict(megatron.state_dict())


# -- validation: every error names its field ------------------------------------------------------------

CONFIG_ERRORS = [
    (dict(name="torch.optim.SGD"), f"scheduler.name ('torch.optim.SGD') must be a class of {M}"),
    (dict(name=f"{M}.MultiStep"), (f"scheduler.name ('{M}.MultiStep') is not a scheduler of {M}; did you mean "
                                   f"'{M}.MultiStepLR'?")),
    (dict(name=f"{M}.LambdaLR"), f"scheduler.name ('{M}.LambdaLR') takes Python callables"),
    (dict(kwargs={"gama": 0.5}), ("scheduler.kwargs.gama is not an argument of ExponentialLR (arguments: "
                                  "gamma, last_epoch); did you mean scheduler.kwargs.gamma?")),
    (dict(kwargs={"gamma": 0}), "scheduler.kwargs.gamma (0) must be a number > 0"),
    (dict(kwargs={"gamma": "fast"}), "scheduler.kwargs.gamma ('fast') must be a number > 0"),
    (dict(kwargs={"gamma": {"a": 1}}), "scheduler.kwargs.gamma ({'a': 1}) must be a number, string, boolean"),
    (dict(kwargs={"gamma": 0.9, "last_epoch": 3}), "scheduler.kwargs.last_epoch (3) cannot be set for"),
    (dict(name=f"{M}.MultiStepLR", kwargs={"milestones": [30, 10]}),
     "scheduler.kwargs.milestones ([30, 10]) must be a list of increasing integers > 0"),
    (dict(name=f"{M}.CyclicLR", kwargs={"max_lr": 0.1, "cycle_momentum": False}),
     "scheduler.kwargs.max_lr (0.1) cannot be set for CyclicLR: it is each param group's max_lr"),
    (dict(name=f"{M}.CyclicLR", kwargs={"mode": "triangle", "cycle_momentum": False}),
     "scheduler.kwargs.mode ('triangle') must be one of 'triangular', 'triangular2', 'exp_range'; did you"),
    (dict(name=f"{M}.CyclicLR", kwargs={}),
     "scheduler.kwargs.cycle_momentum (unset: torch's default is true) must be false for CyclicLR"),
    (dict(name=f"{M}.OneCycleLR", kwargs={"cycle_momentum": True}),
     "scheduler.kwargs.cycle_momentum (True) must be false for OneCycleLR"),
    (dict(name=f"{M}.OneCycleLR", kwargs={"cycle_momentum": False}, warmup_iters=5),
     "scheduler.warmup_iters (5) must be 0 for OneCycleLR: it warms up itself"),
    (dict(name=f"{M}.ReduceLROnPlateau", kwargs={"mode": "max"}),
     "scheduler.kwargs.mode ('max') must be one of 'min'"),
    (dict(name=f"{M}.ReduceLROnPlateau", kwargs={"factor": 1.5}),
     "scheduler.kwargs.factor (1.5) must be a number in (0, 1)"),
    (dict(warmup_iters=-1), "scheduler.warmup_iters (-1) must be >= 0"),
    (dict(warmup_style="quadratic"), "scheduler.warmup_style ('quadratic') must be one of 'linear', 'const"),
    (dict(warmup_start_factor=0.0), "scheduler.warmup_start_factor (0.0) must be in (0, 1]"),
]


@pytest.mark.parametrize("changes,message", CONFIG_ERRORS)
def test_config_errors_name_the_field(changes: dict, message: str) -> None:
    config = TorchSchedulerConfig(**{"name": f"{M}.ExponentialLR", "kwargs": {"gamma": 0.9}, **changes})
    with pytest.raises(ConfigError) as error:
        config.validate()
    assert str(error.value).startswith(message), str(error.value)


DERIVE_ERRORS = [
    (dict(warmup_iters=ITERS), {}, f"scheduler.warmup_iters ({ITERS}) must be < train.train_iters ({ITERS})"),
    (dict(name=f"{M}.OneCycleLR", kwargs={"total_steps": 50, "cycle_momentum": False}), {},
     f"scheduler.kwargs.total_steps (50) must be >= train.train_iters ({ITERS}): OneCycleLR cannot step"),
    (dict(name=f"{M}.ReduceLROnPlateau", kwargs={}), {"eval_interval": None},
     "train.eval_interval (None) and train.eval_iters (1) must be set for scheduler.name ReduceLROnPlateau"),
    (dict(name=f"{M}.LinearLR", kwargs={"start_factor": 0.0}), {},
     'scheduler.kwargs ({"start_factor": 0.0}) are refused by LinearLR: Starting multiplicative factor'),
]


@pytest.mark.parametrize("changes,train,message", DERIVE_ERRORS)
def test_errors_against_the_run_name_the_fields(changes: dict, train: dict, message: str) -> None:
    config = TorchSchedulerConfig(**{"name": f"{M}.ExponentialLR", "kwargs": {"gamma": 0.9}, **changes})
    with pytest.raises(ConfigError) as error:
        _schedule(config, **train)
    assert str(error.value).startswith(message), str(error.value)


def test_the_root_config_checks_the_kwargs_type_and_fills_the_run_length(compose) -> None:
    with pytest.raises(ConfigError, match=r"^scheduler.kwargs \(\[1\]\) must be dict"):
        ConfigContainer(scheduler=TorchSchedulerConfig(kwargs=[1])).validate()
    cfg = compose("scheduler=cosine_warmup", "train.train_iters=100", "scheduler.warmup_iters=10")
    assert cfg.validate().schedule.kwargs["T_max"] == 90  # null: the run after the warmup
    cfg = compose("scheduler=onecycle", "train.train_iters=100")
    assert cfg.validate().schedule.kwargs["total_steps"] == 100
