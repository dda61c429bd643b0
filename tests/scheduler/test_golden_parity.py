"""Parity with Megatron-Core's OptimizerParamScheduler on trajectories recorded from the upstream class.

The golden file is a copy of shared/golden/megatron_scheduler_cases.json (schema in its README);
ANNEAL_GOLDEN_FILE points the same test at another file of that schema (the held-back set).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from anneal.scheduler import OptimizerParamScheduler

GOLDEN = Path(os.environ.get("ANNEAL_GOLDEN_FILE", Path(__file__).parents[1] / "fixtures" / "megatron_scheduler_cases.json"))
REL_TOL = 1e-12
# Megatron's attributes, compared after load_state_dict.
ATTRIBUTES = (
    "init_lr", "max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd",
    "end_wd", "wd_incr_steps", "wd_incr_style", "use_checkpoint_opt_param_scheduler",
    "override_opt_param_scheduler", "wsd_decay_steps", "lr_wsd_decay_style", "num_steps",
)


def _cases() -> list[dict]:
    if not GOLDEN.is_file():  # the parametrization must not silently shrink to nothing
        raise FileNotFoundError(f"golden file missing: {GOLDEN}")
    return json.loads(GOLDEN.read_text())["cases"]


CASES = _cases()


class FakeOptimizer:
    """What the golden generator gave upstream: param_groups as plain dicts."""

    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]


def _build(case: dict) -> tuple[FakeOptimizer, OptimizerParamScheduler]:
    opt = FakeOptimizer(case["param_groups"])
    return opt, OptimizerParamScheduler(opt, **case["constructor_kwargs"])


def _close(actual: float, expected: float) -> bool:
    return math.isclose(actual, expected, rel_tol=REL_TOL, abs_tol=0.0) or actual == expected


def _assert_groups(opt: FakeOptimizer, expected: dict, where: str) -> None:
    lrs = [g["lr"] for g in opt.param_groups]
    wds = [g["weight_decay"] for g in opt.param_groups]
    assert len(lrs) == len(expected["lr"]), where
    for i, (a, e) in enumerate(zip(lrs, expected["lr"])):
        assert _close(a, e), f"{where}: lr[group {i}] = {a!r}, Megatron {e!r}"
    for i, (a, e) in enumerate(zip(wds, expected["weight_decay"])):
        assert _close(a, e), f"{where}: weight_decay[group {i}] = {a!r}, Megatron {e!r}"


def _assert_state_dict(actual: dict, expected: dict, sched: OptimizerParamScheduler) -> None:
    # Megatron's keys must be equal; anneal's extras must carry the scheduler's own values.
    assert {k: actual[k] for k in expected} == expected
    assert actual["init_lr"] == sched.init_lr
    assert actual["wsd_decay_steps"] == sched.wsd_decay_steps
    assert actual["lr_wsd_decay_style"] == sched.lr_wsd_decay_style


def _run_trajectory(case: dict) -> None:
    records = {r["call"]: r for r in case["records"] if isinstance(r, dict)}
    error = case.get("error")
    if error and error["during"] == "constructor":
        with pytest.raises(ValueError):
            _build(case)
        return
    opt, sched = _build(case)
    if 0 in records:
        _assert_groups(opt, records[0], "after constructor")
    fail_at = error.get("at_call") if error else None
    for call in range(1, case["num_step_calls"] + 1):
        if fail_at is not None and call >= fail_at:
            pytest.fail(f"upstream raised {error['type']} at call {fail_at}; anneal did not")
        sched.step(case["increment"])
        if call in records:
            assert sched.num_steps == records[call]["num_steps"]
            _assert_groups(opt, records[call], f"call {call}")
    _assert_state_dict(sched.state_dict(), case["final_state_dict"], sched)


def _trajectory_or_early_failure(case: dict) -> None:
    """Upstream failed mid-run: anneal must fail too, at construction at the latest call."""
    error = case["error"]
    try:
        opt, sched = _build(case)
    except ValueError as e:
        assert str(e), "the error must say what is wrong"
        return
    for call in range(1, error["at_call"]):
        sched.step(case["increment"])
        record = next((r for r in case["records"] if isinstance(r, dict) and r["call"] == call), None)
        if record:
            _assert_groups(opt, record, f"call {call}")
    with pytest.raises(ValueError):
        sched.step(case["increment"])


def _run_constructor(case: dict) -> None:
    if case["error"]:
        with pytest.raises(ValueError):
            _build(case)
        return
    opt, sched = _build(case)
    _assert_groups(opt, case["after_constructor"], "after constructor")
    _assert_state_dict(sched.state_dict(), case["state_dict"], sched)


def _attributes(sched: OptimizerParamScheduler) -> dict:
    return {name: getattr(sched, name) for name in ATTRIBUTES}


def _run_load(case: dict) -> None:
    error = case.get("error")
    if error and error["during"] == "constructor":
        with pytest.raises(ValueError):
            _build(case)
        return
    opt, sched = _build(case)
    for _ in range(case.get("pre_load_step_calls", 0)):
        sched.step(case["pre_load_increment"])
    assert _attributes(sched) == case["before_load"]["attributes"]
    _assert_groups(opt, case["before_load"]["param_groups"], "before load")
    if case["raised"]:
        before = _attributes(sched), [dict(g) for g in opt.param_groups]
        with pytest.raises(ValueError):
            sched.load_state_dict(case["checkpoint_state_dict"])
        # Deliberate difference: Megatron leaves a half-loaded scheduler; anneal changes nothing.
        assert (_attributes(sched), opt.param_groups) == before
        return
    sched.load_state_dict(case["checkpoint_state_dict"])
    assert _attributes(sched) == case["after_load"]["attributes"]
    _assert_groups(opt, case["after_load"]["param_groups"], "after load")
    for _ in range(case.get("post_load_step_calls", 0)):
        sched.step(case["post_load_increment"])
    assert _attributes(sched) == case["after_post_load_steps"]["attributes"]
    _assert_groups(opt, case["after_post_load_steps"]["param_groups"], "after post-load steps")
    _assert_state_dict(sched.state_dict(), case["state_dict_after"], sched)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_megatron(case: dict) -> None:
    kind = case["kind"]
    if kind == "trajectory":
        error = case.get("error")
        if error and error["during"] == "step":
            _trajectory_or_early_failure(case)
        else:
            _run_trajectory(case)
    elif kind == "constructor":
        _run_constructor(case)
    elif kind == "load_state_dict":
        _run_load(case)
    else:
        pytest.fail(f"unknown golden case kind {kind!r}")


def test_golden_file_is_complete() -> None:
    """Every case is collected above; the shipped copy has the 69 cases of the shared file."""
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    kinds = {c["kind"] for c in CASES}
    assert kinds <= {"trajectory", "constructor", "load_state_dict"}
    if "ANNEAL_GOLDEN_FILE" not in os.environ:
        assert len(CASES) == 69
