"""anneal's scheduler beyond the golden cases: its own errors, state and load behaviour."""

from __future__ import annotations

import pytest
import torch

from anneal.errors import ConfigError
from anneal.scheduler import OptimizerParamScheduler, Schedule, lr_at, phases, wd_at

BASE = dict(init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=10, lr_decay_steps=100,
            lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=100, wd_incr_style="constant")


class Groups:
    def __init__(self, *groups: dict) -> None:
        self.param_groups = [dict(g) for g in (groups or ({},))]


def make(**changes) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(Groups(), **{**BASE, **changes})


CONSTRUCTOR_ERRORS = [
    (dict(min_lr=-1e-5), "min_lr (-1e-05) must be >= 0"),
    (dict(max_lr=1e-5, min_lr=1e-4), "max_lr (1e-05) must be >= min_lr (0.0001)"),
    (dict(init_lr=2e-3), "init_lr (0.002) must be <= max_lr (0.001)"),
    (dict(lr_decay_steps=0, lr_warmup_steps=0), "lr_decay_steps (0) must be > 0"),
    (dict(lr_warmup_steps=100), "lr_warmup_steps (100) must be < lr_decay_steps (100)"),
    (dict(lr_decay_style="polynomial"), "lr_decay_style ('polynomial') must be one of"),
    (dict(lr_decay_style="WSD"), "wsd_decay_steps (None) must be set when lr_decay_style is 'WSD'"),
    (dict(lr_decay_style="WSD", wsd_decay_steps=10), "lr_wsd_decay_style (None) must be one of"),
    (dict(lr_decay_style="WSD", wsd_decay_steps=10, lr_wsd_decay_style="minus-sqrt"), "did you mean 'minus_sqrt'"),
    (dict(start_wd=-0.1, wd_incr_style="linear"), "start_wd (-0.1) must be >= 0"),
    (dict(start_wd=0.2, end_wd=0.1, wd_incr_style="linear"), "end_wd (0.1) must be >= start_wd (0.2)"),
    (dict(start_wd=0.0, end_wd=0.1), "start_wd (0.0) must equal end_wd (0.1) when wd_incr_style is 'constant'"),
    (dict(wd_incr_style="linear", wd_incr_steps=0, start_wd=0.0), "wd_incr_steps (0) must be > 0"),
    (dict(wd_incr_style="exponential"), "wd_incr_style ('exponential') must be one of"),
    (dict(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True),
     "override_opt_param_scheduler (True) and use_checkpoint_opt_param_scheduler (True) are mutually exclusive"),
]


@pytest.mark.parametrize("changes,message", CONSTRUCTOR_ERRORS, ids=[m for _, m in CONSTRUCTOR_ERRORS])
def test_constructor_error_names_the_argument(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make(**changes)
    assert isinstance(info.value, ConfigError)
    assert message in str(info.value)


def test_class_writes_what_the_pure_functions_compute() -> None:
    opt = Groups({}, {"max_lr": 5e-4, "min_lr": 0.0, "wd_mult": 0.0}, {"start_wd": 0.0, "end_wd": 0.2})
    kwargs = {**BASE, "lr_decay_style": "WSD", "wsd_decay_steps": 30, "lr_wsd_decay_style": "cosine",
              "wd_incr_style": "linear", "start_wd": 0.05, "end_wd": 0.1}
    sched = OptimizerParamScheduler(opt, **kwargs)
    schedule = Schedule(**kwargs)
    for _ in range(120):
        sched.step(1)
        n = sched.num_steps
        assert opt.param_groups[0]["lr"] == lr_at(schedule, n, 1e-3, 1e-4)
        assert opt.param_groups[1]["lr"] == lr_at(schedule, n, 5e-4, 0.0)
        assert opt.param_groups[1]["weight_decay"] == 0.0
        assert opt.param_groups[2]["weight_decay"] == wd_at(schedule, n, 0.0, 0.2)


def test_phases_of_a_wsd_schedule() -> None:
    sched = make(lr_decay_style="WSD", wsd_decay_steps=30, lr_wsd_decay_style="linear")
    p = sched.phases()
    assert (p.warmup_end, p.anneal_start, p.decay_end) == (10, 70, 100)
    assert phases(Schedule(**BASE)).anneal_start == 10  # cosine decays right after warmup


def test_tensor_lr_of_a_torch_optimizer_is_updated_in_place() -> None:
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([param], lr=torch.tensor(0.0), weight_decay=0.0)
    lr_tensor = opt.param_groups[0]["lr"]
    sched = OptimizerParamScheduler(opt, **BASE)
    sched.step(5)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert lr_tensor.item() == pytest.approx(5e-4)
    param.grad = torch.ones(4)
    opt.step()  # the optimizer really runs with the scheduler's values
    assert param.detach().lt(1.0).all()


def test_state_dict_carries_what_megatron_forgets() -> None:
    sd = make(init_lr=1e-5, lr_decay_style="WSD", wsd_decay_steps=30, lr_wsd_decay_style="minus_sqrt").state_dict()
    assert (sd["init_lr"], sd["wsd_decay_steps"], sd["lr_wsd_decay_style"]) == (1e-5, 30, "minus_sqrt")


def test_strict_mismatch_lists_every_field_and_changes_nothing() -> None:
    sched = make(use_checkpoint_opt_param_scheduler=False)
    sched.step(7)
    before = (sched.state_dict(), [dict(g) for g in sched.optimizer.param_groups])
    ckpt = {**make().state_dict(), "max_lr": 2e-3, "lr_decay_steps": 200, "end_wd": 0.2, "num_steps": 50}
    with pytest.raises(ConfigError) as info:
        sched.load_state_dict(ckpt)
    message = str(info.value)
    assert "3 field(s)" in message
    for text in ("max_lr: config 0.001 vs checkpoint 0.002", "lr_decay_steps: config 100 vs checkpoint 200",
                 "end_wd: config 0.1 vs checkpoint 0.2"):
        assert text in message
    assert (sched.state_dict(), sched.optimizer.param_groups) == before


def test_a_changed_wsd_anneal_is_caught_on_resume() -> None:
    wsd = dict(lr_decay_style="WSD", wsd_decay_steps=30, lr_wsd_decay_style="linear")
    ckpt = make(**wsd).state_dict()
    with pytest.raises(ConfigError, match=r"lr_wsd_decay_style: config 'minus_sqrt' vs checkpoint 'linear'"):
        make(**{**wsd, "lr_wsd_decay_style": "minus_sqrt"}, use_checkpoint_opt_param_scheduler=False) \
            .load_state_dict(ckpt)


def test_load_reports_what_came_from_where() -> None:
    sched = make(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
    report = sched.load_state_dict({**make(max_lr=2e-3).state_dict(), "num_steps": 20})
    by_name = {f.name: f for f in report.fields}
    assert by_name["max_lr"].in_force == 1e-3 and by_name["max_lr"].source == "config"
    assert by_name["max_lr"].checkpoint == 2e-3
    assert report.mode == "override" and sched.num_steps == 20
    assert "max_lr" in report.table() and "0.002" in report.table()


def test_megatron_state_dict_without_wd_or_wsd_keys_loads() -> None:
    sched = make()
    megatron = {"max_lr": 1e-3, "min_lr": 1e-4, "lr_warmup_steps": 10, "lr_decay_steps": 100,
                "lr_decay_style": "cosine", "num_steps": 40}
    report = sched.load_state_dict(megatron)
    assert sched.num_steps == 40 and sched.wsd_decay_steps is None
    assert {f.name for f in report.fields} == {"max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps",
                                                "lr_decay_style"}


def test_checkpoint_that_would_fail_later_is_refused_now() -> None:
    sched = make()  # use-checkpoint by default: the checkpoint's WSD style arrives without its anneal
    ckpt = {**make().state_dict(), "lr_decay_style": "WSD", "wsd_decay_steps": None, "num_steps": 3}
    with pytest.raises(ConfigError, match="loaded scheduler wsd_decay_steps"):
        sched.load_state_dict(ckpt)
    assert sched.num_steps == 0 and sched.lr_decay_style == "cosine"


def test_missing_key_is_named() -> None:
    with pytest.raises(ConfigError, match="scheduler state dict has no 'min_lr'"):
        make().load_state_dict({"max_lr": 1e-3, "num_steps": 0})


def test_resume_table_marks_the_settings_that_differ_and_names_the_winner() -> None:
    sched = make(use_checkpoint_opt_param_scheduler=True)
    table = sched.load_state_dict({**make(max_lr=3e-3).state_dict(), "num_steps": 20}).table()
    lines = table.splitlines()
    assert "1 setting(s) differ between config and checkpoint (marked *)" in lines[0]
    changed = [line for line in lines[2:] if line.startswith("*")]
    assert len(changed) == 1 and "max_lr" in changed[0] and "checkpoint wins" in changed[0]
    assert all("both (equal)" in line for line in lines[2:] if not line.startswith("*"))


def test_schedule_is_one_frozen_value_replaced_whole() -> None:
    sched = make()
    before = sched.schedule
    sched.max_lr = 2e-3  # Megatron-style attribute writes replace the schedule, never mutate it
    assert before.max_lr == 1e-3 and sched.schedule.max_lr == 2e-3 and sched.max_lr == 2e-3
    assert "max_lr" not in vars(sched)


def test_param_group_bounds_are_the_schedulers_state() -> None:
    ckpt = OptimizerParamScheduler(Groups({"max_lr": 3e-3, "min_lr": 0.0}), **BASE).state_dict()
    assert ckpt["param_group_bounds"] == [{"max_lr": 3e-3, "min_lr": 0.0}]
    strict = OptimizerParamScheduler(Groups({"max_lr": 1e-3, "min_lr": 0.0}), **BASE,
                                     use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ConfigError, match="param_group_bounds"):
        strict.load_state_dict(ckpt)
    taken = OptimizerParamScheduler(Groups({"max_lr": 1e-3, "min_lr": 0.0}), **BASE)
    taken.load_state_dict({**ckpt, "num_steps": 50})
    assert taken.optimizer.param_groups[0]["max_lr"] == 3e-3
    assert taken.optimizer.param_groups[0]["lr"] == lr_at(Schedule(**BASE), 50, 3e-3, 0.0)


def test_resume_table_is_one_line_when_nothing_differs() -> None:
    table = make().load_state_dict({**make().state_dict(), "num_steps": 20}).table()
    assert table.splitlines() == [table]
    assert table.startswith("scheduler resumed at num_steps=20") and "agree on all" in table
