"""Derived scheduler steps: Megatron-Bridge's rules, and exact samples under a batch ramp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anneal.config.batch import BatchRamp
from anneal.config.optimizer import OptimizerConfig
from anneal.config.scheduler import SchedulerConfig
from anneal.config.training import TrainingConfig
from anneal.config.derive import derive
from anneal.errors import ConfigError
from anneal.scheduler import OptimizerParamScheduler

GOLDEN = Path(__file__).parents[1] / "fixtures" / "megatron_scheduler_cases.json"
BRIDGE = [c for c in json.loads(GOLDEN.read_text())["cases"] if c["id"].startswith("bridge__")]


def _sections(inputs: dict) -> tuple[TrainingConfig, OptimizerConfig, SchedulerConfig]:
    train = TrainingConfig(train_iters=inputs["train.train_iters"],
                           global_batch_size=inputs["train.global_batch_size"], micro_batch_size=1)
    optimizer = OptimizerConfig(lr=inputs["optimizer.lr"], min_lr=inputs["optimizer.min_lr"])
    sched = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith("scheduler.")}
    if sched["lr_wsd_decay_style"] is None:
        sched["lr_wsd_decay_style"] = "exponential"
    return train, optimizer, SchedulerConfig(**sched)


@pytest.mark.parametrize("case", BRIDGE, ids=[c["id"] for c in BRIDGE])
def test_derivation_matches_bridge_or_refuses_its_silent_cap(case: dict) -> None:
    train, optimizer, scheduler = _sections(case["bridge_config_inputs"])
    expected = case["constructor_kwargs"]
    if "capped" in case["id"]:  # Bridge caps warmup to decay - 1 with a warning; anneal refuses
        with pytest.raises(ConfigError, match=r"scheduler.lr_warmup_iters \(500\) must be < train.train_iters"):
            derive(train, optimizer, scheduler)
        return
    schedule = derive(train, optimizer, scheduler).schedule
    for key in ("init_lr", "max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style"):
        assert getattr(schedule, key) == expected[key], key
    if expected["lr_decay_style"] == "WSD":
        assert schedule.wsd_decay_steps == expected["wsd_decay_steps"]


def test_ramp_follows_megatron_rule() -> None:
    ramp = BatchRamp(global_batch_size=32, start=8, increment=8, ramp_samples=1000)
    per_increment = 1000 / 3  # (32 - 8) / 8 = 3 increments
    consumed, seen = 0, []
    for _ in range(80):
        expected = 32 if consumed > 1000 else min(8 + int(consumed / per_increment) * 8, 32)
        assert ramp.batch_size_at(consumed) == expected
        seen.append(expected)
        consumed += expected
    assert seen[0] == 8 and seen[-1] == 32 and sorted(seen) == seen
    for k in range(80):
        assert ramp.samples_after(k) == sum(seen[:k])
        assert ramp.iterations_for(ramp.samples_after(k)) == k


def _run_with_ramp(train: TrainingConfig, scheduler: SchedulerConfig) -> tuple[object, list[float]]:
    derived = derive(train, OptimizerConfig(lr=1e-3, min_lr=1e-5), scheduler)
    opt = type("Opt", (), {"param_groups": [{}]})()
    sched = OptimizerParamScheduler(opt, **vars(derived.schedule))
    steps = [0]
    for _ in range(train.train_iters):
        sched.step(derived.ramp.batch_size_at(sched.num_steps))  # the loop's increment: this iteration's batch
        steps.append(sched.num_steps)
    return derived, steps


def test_rampup_keeps_warmup_and_decay_exact_in_samples() -> None:
    train = TrainingConfig(train_iters=100, global_batch_size=32, micro_batch_size=8,
                           rampup_batch_size=[8, 8, 1000])
    scheduler = SchedulerConfig(lr_decay_style="WSD", lr_warmup_iters=10, lr_wsd_decay_iters=20,
                                lr_wsd_decay_style="linear")
    derived, steps = _run_with_ramp(train, scheduler)
    s = derived.schedule
    assert steps[10] == s.lr_warmup_steps  # warmup ends exactly at iteration 10 ...
    assert steps[10] < 10 * 32  # ... which Bridge's iters × final batch would overshoot
    assert steps[80] == s.lr_decay_steps - s.wsd_decay_steps  # the anneal starts at iteration 100 - 20
    assert steps[100] == s.lr_decay_steps == derived.train_samples  # and the decay ends with the run


def test_sample_based_run_converts_to_iterations() -> None:
    train = TrainingConfig(train_samples=1000, global_batch_size=32, micro_batch_size=8)
    derived = derive(train, OptimizerConfig(lr=1e-3), SchedulerConfig(lr_warmup_samples=100))
    assert derived.train_iters == 31  # 1000 // 32, as Megatron-Bridge: whole global batches only
    assert derived.train_samples == 992  # what the run trains
    assert derived.schedule.lr_warmup_steps == 100 and derived.schedule.lr_decay_steps == 1000


def test_wsd_default_anneal_is_a_fifth_of_the_decay() -> None:
    train = TrainingConfig(train_iters=1000, global_batch_size=4, micro_batch_size=1)
    derived = derive(train, OptimizerConfig(lr=1e-3), SchedulerConfig(lr_decay_style="WSD", lr_warmup_iters=10))
    assert derived.schedule.wsd_decay_steps == 200 * 4
