"""setup_optimizer: which backend runs, what it says at start-up, and the scheduler it builds."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from optim_helpers import FLAGS, SCHEDULE, TinyLM, build, config

from anneal.errors import ConfigError
from anneal.optim import select_backend, setup_optimizer
from anneal.optim.apex_backend import apex_available


def test_backend_follows_use_distributed_optimizer():
    assert select_backend(config()) == "replicated"
    assert select_backend(config(use_distributed_optimizer=True)) == "native"
    assert select_backend(config(use_distributed_optimizer=True, distributed_backend="native")) == "native"


@pytest.mark.skipif(apex_available(), reason="checks the fallback where Apex is missing")
def test_auto_falls_back_to_native_without_apex_and_explicit_apex_is_an_error():
    assert select_backend(config(use_distributed_optimizer=True, distributed_backend="auto")) == "native"
    with pytest.raises(ConfigError, match=r"^optimizer\.distributed_backend \('apex'\) needs CUDA"):
        select_backend(config(use_distributed_optimizer=True, distributed_backend="apex"))


def test_auto_never_picks_apex_and_says_when_it_could_run(monkeypatch, caplog):
    """Apex has not run under a GPU test here: ``auto`` keeps native-zero1 even where Apex would import,
    and the start-up log names the setting that would use it."""
    monkeypatch.setattr("anneal.optim.setup.apex_available", lambda: True)
    auto = config(use_distributed_optimizer=True, distributed_backend="auto")
    with caplog.at_level(logging.INFO, logger="anneal.optim"):
        assert select_backend(auto, on_cuda=True, group_backend="nccl") == "native"
        assert select_backend(auto, on_cuda=False, group_backend="gloo") == "native"
    notes = [r.getMessage() for r in caplog.records if "Apex is available" in r.getMessage()]
    assert len(notes) == 1 and "optimizer.distributed_backend=apex" in notes[0]


@pytest.mark.parametrize("on_cuda, group, error", [
    (False, None, r"needs the parameters on a CUDA device"),
    (True, "gloo", r"needs an NCCL process group, not 'gloo'"),
])
def test_explicit_apex_runs_only_on_cuda_parameters_over_nccl(monkeypatch, on_cuda, group, error):
    monkeypatch.setattr("anneal.optim.setup.apex_available", lambda: True)
    apex = config(use_distributed_optimizer=True, distributed_backend="apex")
    with pytest.raises(ConfigError, match=r"^optimizer\.distributed_backend \('apex'\) " + error):
        select_backend(apex, on_cuda=on_cuda, group_backend=group)
    assert select_backend(apex, on_cuda=True, group_backend="nccl") == "apex"
    assert select_backend(apex, on_cuda=True, group_backend=None) == "apex"  # one process: a one-rank group


def test_apex_is_never_imported_on_a_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    apex_available()
    build(use_distributed_optimizer=True)
    assert not any(name == "apex" or name.startswith("apex.") for name in sys.modules)


def test_apex_runs_adam_only():
    with pytest.raises(ConfigError, match=r"^optimizer\.distributed_backend \('apex'\) runs only"):
        select_backend(config(optimizer="sgd", use_distributed_optimizer=True, distributed_backend="apex"))


def test_unhonoured_overlap_settings_are_logged_once_at_start_up(caplog):
    with caplog.at_level(logging.WARNING, logger="anneal.optim"):
        _, opt, sched = build(
            use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "overlap_grad_reduce=true is not honoured by the native-zero1 backend" in warnings[0]
    assert "overlap_param_gather=true" in warnings[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anneal.optim"):
        for _ in range(2):
            opt.zero_grad()
            opt.step()
            sched.step(1)
    assert not caplog.records  # once, at start-up: never again per step


def test_backend_is_reported_and_described(caplog):
    with caplog.at_level(logging.INFO, logger="anneal.optim"):
        _, opt, _ = build(use_distributed_optimizer=True, bf16=True)
    assert opt.backend == "native-zero1"
    assert "native-zero1: fused adamw" in opt.describe() and "bfloat16 params, fp32 master" in opt.describe()
    assert any("optimizer: native-zero1" in r.getMessage() for r in caplog.records)


def test_scheduler_is_built_from_the_schedule_and_writes_the_optimizers_groups():
    model = TinyLM()
    opt, sched = setup_optimizer(config(), FLAGS, model, schedule=SCHEDULE)
    assert sched.optimizer is opt and sched.schedule == SCHEDULE
    assert all(g["lr"] == pytest.approx(SCHEDULE.init_lr) for g in opt.param_groups)  # step(0) wrote them
    assert sorted(g["weight_decay"] for g in opt.param_groups) == pytest.approx([0.0, 0.1])


def test_invalid_optimizer_config_is_rejected_before_anything_is_built():
    model = TinyLM()
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"^optimizer\.bf16"):
        setup_optimizer(config(bf16=True, fp16=True), FLAGS, model, schedule=SCHEDULE)
    assert [p.data_ptr() for p in model.parameters()] == before


def test_frozen_parameters_follow_the_model_dtype():
    model = TinyLM()
    model.embedding.weight.requires_grad_(False)
    opt, _ = setup_optimizer(config(bf16=True), FLAGS, model, schedule=SCHEDULE)
    assert model.embedding.weight.dtype == torch.bfloat16
    assert "embedding.weight" not in opt.layout.names
