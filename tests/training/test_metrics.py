"""MetricsLogger, its ETA, its log format and its W&B sink (the real wandb package, offline)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from anneal.config.runtime import LoggerConfig
from anneal.errors import ConfigError
from anneal.log_format import LogFormatter
from anneal.training.metrics import MetricsLogger, Progress, format_duration, wandb_mode
from anneal_testing import wandb_history


def _record(iteration: int, loss: float) -> dict:
    return {"iteration": iteration, "consumed_samples": 8 * iteration, "loss": loss, "lr": 1e-3,
            "weight_decay": 0.1, "grad_norm": 1.5, "loss_scale": 1.0, "skipped_iters": 0,
            "peak_mem_mb": 100.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_excludes_the_warm_up_before_the_first_log() -> None:
    clock = FakeClock()
    progress = Progress(total_iters=100, clock=clock)
    clock.now = 60.0  # build, compilation and the first 10 iterations: slow
    assert progress.update(10) == {"elapsed_s": 60.0, "eta_s": None}  # no rate measured yet
    clock.now = 80.0  # then 2 s per iteration
    assert progress.update(20) == {"elapsed_s": 80.0, "eta_s": pytest.approx(80 * 2.0)}
    clock.now = 100.0
    assert progress.update(30)["eta_s"] == pytest.approx(70 * 2.0)


def test_eta_of_a_resumed_run_counts_only_the_iterations_left() -> None:
    clock = FakeClock()
    progress = Progress(total_iters=1000, clock=clock)
    clock.now = 5.0
    progress.update(600)  # resumed at 590: the first log of this process
    clock.now = 25.0
    assert progress.update(610) == {"elapsed_s": 25.0, "eta_s": pytest.approx(390 * 2.0)}


def test_eta_shows_as_soon_as_two_iterations_after_the_first_are_timed(tmp_path: Path, caplog) -> None:
    """The first iteration (allocator, caches) is warm-up; iterations 2 and 3 give the rate, so iteration 3
    prints a line with the ETA (log_interval 10), and iteration 10's line measures from the same mark."""
    caplog.set_level(logging.INFO, logger="anneal")
    clock = FakeClock()
    metrics = MetricsLogger(LoggerConfig(), tmp_path, enabled=True, total_iters=100)
    metrics.progress = Progress(total_iters=100, clock=clock)
    for iteration, now in ((1, 30.0), (2, 32.0), (3, 34.0), (4, 36.0)):
        clock.now = now
        metrics.tick(iteration)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["[  3/100   3%] | 2.00 s per iteration | elapsed 0:00:34, ETA 0:03:14"]
    clock.now = 48.0
    assert metrics.progress.update(10) == {"elapsed_s": 48.0, "eta_s": pytest.approx(90 * 2.0)}
    metrics.close()


def test_the_early_eta_is_not_repeated_on_a_logging_step(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="anneal")
    metrics = MetricsLogger(LoggerConfig(log_interval=3), tmp_path, enabled=True, total_iters=100)
    for iteration in (1, 2, 3):
        metrics.tick(iteration)
    assert not caplog.records  # iteration 3 logs its own line, with the ETA
    metrics.close()


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"),
                                           (2 * 86400 + 3600, "2d 1:00:00")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("mode, environ, resolved", [
    ("auto", {}, "offline"),
    ("auto", {"WANDB_API_KEY": "k"}, "online"),
    ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "offline"),
    ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
    ("online", {}, "online"),
    ("offline", {"WANDB_API_KEY": "k"}, "offline"),
])
def test_wandb_mode_auto_is_offline_without_an_api_key(mode: str, environ: dict, resolved: str) -> None:
    assert wandb_mode(mode, environ) == resolved


def test_log_format_names_only_levels_other_than_info() -> None:
    fmt = LogFormatter()
    info = logging.LogRecord("anneal", logging.INFO, __file__, 1, "loss %.1f", (2.0,), None)
    warning = logging.LogRecord("anneal", logging.WARNING, __file__, 1, "disk low", (), None)
    assert fmt.format(info)[21:] == " loss 2.0" and fmt.format(info)[0] == "["
    assert fmt.format(warning).endswith("] WARNING: disk low")


def test_console_line_shows_elapsed_and_eta(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="anneal")
    metrics = MetricsLogger(LoggerConfig(), tmp_path, enabled=True, total_iters=40)
    metrics.progress = Progress(40, clock=(clock := FakeClock()))
    for it, now in ((10, 100.0), (20, 150.0)):  # 5 s per iteration after the first log
        clock.now = now
        metrics.log(_record(it, 3.0))
    metrics.close()
    first, second = [r.getMessage() for r in caplog.records if "loss" in r.getMessage()]
    assert first.startswith("[10/40  25%] | samples 80 | loss 3.0000")
    assert first.endswith(" | elapsed 0:01:40")  # no ETA before a rate is measured
    assert second.endswith(" | elapsed 0:02:30, ETA 0:01:40")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["elapsed_s"], r["eta_s"]) for r in rows] == [(100.0, None), (150.0, 100.0)]


def test_banner_lines_are_logged_one_by_one(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="anneal")
    MetricsLogger(LoggerConfig(), tmp_path, enabled=True, total_iters=4).info("first\nsecond")
    assert [r.getMessage() for r in caplog.records][-2:] == ["first", "second"]


def test_a_rank_other_than_0_writes_nothing(tmp_path: Path, caplog) -> None:
    cfg = LoggerConfig(wandb_project="anneal-test", wandb_mode="offline")
    metrics = MetricsLogger(cfg, tmp_path / "run", enabled=False, total_iters=4)
    metrics.log(_record(1, 3.0))
    metrics.info("banner")
    metrics.close()
    assert not (tmp_path / "run").exists() and not caplog.records


def test_wandb_offline_run_holds_the_logged_metrics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = LoggerConfig(wandb_project="anneal-test", wandb_exp_name="tiny")  # auto: offline here
    metrics = MetricsLogger(cfg, tmp_path, enabled=True, total_iters=3, run_config={"train": {"iters": 3}})
    for it, loss in ((1, 5.5), (2, 4.25), (3, 3.125)):
        metrics.log(_record(it, loss))
    metrics.log({"iteration": 3, "valid_loss": 3.5})
    metrics.close()
    rows = {row["_step"]: row for row in wandb_history(tmp_path)}
    assert [rows[i]["loss"] for i in (1, 2, 3)] == [5.5, 4.25, 3.125]
    assert rows[3]["valid_loss"] == 3.5 and rows[2]["lr"] == 1e-3 and "eta_s" in rows[3]
    assert "iteration" not in rows[1]


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path) -> None:
    cfg = LoggerConfig(wandb_project="anneal-test", wandb_mode="offline")
    first = MetricsLogger(cfg, tmp_path / "a", enabled=True, total_iters=4)
    first.log(_record(1, 3.0))
    first.close()
    run_id = first.wandb_run_id
    second = MetricsLogger(cfg, tmp_path / "b", enabled=True, total_iters=4, wandb_run_id=run_id)
    second.log(_record(2, 2.0))
    second.close()
    assert second.wandb_run_id == run_id
    assert [p.name.rsplit("-", 1)[1] for p in (tmp_path / "b").glob("wandb/offline-run-*")] == [run_id]
    assert wandb_history(tmp_path / "b")[0]["loss"] == 2.0


def test_wandb_save_dir_places_the_run(tmp_path: Path) -> None:
    cfg = LoggerConfig(wandb_project="anneal-test", wandb_save_dir=str(tmp_path / "wb"), wandb_mode="offline")
    metrics = MetricsLogger(cfg, tmp_path / "run", enabled=True, total_iters=1)
    metrics.log(_record(1, 2.0))
    metrics.close()
    assert wandb_history(tmp_path / "wb")[0]["loss"] == 2.0


def test_missing_wandb_names_the_field_and_the_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"^logger.wandb_project \('p'\) needs the wandb package: pip"):
        MetricsLogger(LoggerConfig(wandb_project="p"), tmp_path, enabled=True, total_iters=1)


@pytest.mark.parametrize("overrides, message", [
    ({"wandb_mode": "onlin"}, r"^logger.wandb_mode \('onlin'\) must be one of .*did you mean 'online'"),
    ({"wandb_exp_name": "x"}, r"^logger.wandb_exp_name \('x'\) needs logger.wandb_project"),
    ({"wandb_save_dir": "/tmp"}, r"^logger.wandb_save_dir \('/tmp'\) needs logger.wandb_project"),
])
def test_logger_rules(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoggerConfig(**overrides).validate()


def test_throughput_window_leaves_out_excluded_time_and_says_nothing_without_tokens(monkeypatch) -> None:
    import anneal.training.metrics as metrics_module
    from anneal.training.metrics import Throughput

    clock = FakeClock()
    monkeypatch.setattr(metrics_module.time, "perf_counter", clock)
    throughput = Throughput(flops_per_token=6.0, world_size=1, peak=None)
    throughput.add(1000)
    clock.now += 1.0  # one second of training
    with throughput.excluded():  # an evaluation, a save or the first iteration's compilation
        clock.now += 9.0
    assert throughput.read()["tokens_per_s"] == pytest.approx(1000.0)  # not 100: the 9 s are left out
    assert throughput.read() == {}  # a window without timed tokens reports no rate (not 0 tok/s)


@pytest.mark.parametrize("name, half, matmul, peak", [
    ("NVIDIA H100 80GB HBM3", True, "highest", 989e12), ("NVIDIA H100 PCIe", True, "highest", 756e12),
    ("NVIDIA H100 NVL", True, "highest", 835e12), ("NVIDIA H100 80GB HBM3", False, "high", 494.7e12),
    ("NVIDIA H100 80GB HBM3", False, "highest", 67e12), ("NVIDIA A100-SXM4-80GB", True, "highest", 312e12),
    ("Tesla T4", True, "highest", None),
])
def test_mfu_divides_by_the_peak_of_the_card_and_the_precision_in_use(monkeypatch, name, half, matmul, peak):
    import torch

    from anneal.training.metrics import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: matmul)
    assert peak_flops(torch.device("cuda", 0), half) == peak
