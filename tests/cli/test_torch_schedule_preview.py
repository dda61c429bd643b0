"""The preview and the dry run of torch.optim.lr_scheduler schedules: stepped for real, plateau flagged."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from types import SimpleNamespace

import anneal.plot
from anneal.cli.dry_run import schedule_table
from anneal.config.batch import BatchRamp
from anneal.config.torch_scheduler import TorchSchedule
from anneal.plot import curve, plot_run, plot_schedules, write_csv
from anneal.scheduler.torch_schedules import TorchScheduler
from anneal_testing import run_cli

M = "torch.optim.lr_scheduler"


def _derived(compose, *overrides: str):
    cfg = compose(*overrides)
    return cfg, cfg.validate()


def test_every_point_is_what_the_training_scheduler_applies(compose, tmp_path: Path) -> None:
    cfg, d = _derived(compose, "scheduler=exponential_warmup_multistep", "scheduler.kwargs.milestones=[99,200]")
    c = curve(d.schedule, d.ramp, d.train_iters, label="custom", seq_length=cfg.model.seq_length, points=0)
    group = {"max_lr": d.schedule.max_lr, "min_lr": d.schedule.min_lr}
    scheduler = TorchScheduler(SimpleNamespace(param_groups=[group]), d.schedule)
    applied = []
    for _ in range(d.train_iters):
        applied.append(group["lr"])
        scheduler.step(cfg.train.global_batch_size)
    assert c.lr == applied and c.iterations == list(range(1, d.train_iters + 1))
    assert set(c.wd) == {cfg.optimizer.weight_decay} and c.note == ""
    assert [(p.name, p.end_iteration) for p in c.phases] == [("warmup", 50), ("MultiStepLR", d.train_iters)]
    with write_csv([c], tmp_path / "s.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == applied
    # As for Megatron's schedules, the peak (after 50 steps, applied in iteration 51) closes the warmup.
    assert {r["phase"] for r in rows[:51]} == {"warmup"}
    assert {r["phase"] for r in rows[51:]} == {"MultiStepLR"}


def test_plateau_preview_is_flat_after_the_warmup_and_says_it_follows_the_metric(compose, tmp_path) -> None:
    _, d = _derived(compose, "scheduler=plateau")
    c = curve(d.schedule, d.ramp, d.train_iters, label="plateau", points=0)
    assert c.lr[0] < c.lr[29] and len(set(c.lr[30:])) == 1  # warmup 30, then flat at its initial value
    assert "depends on the validation loss" in c.note
    assert plot_schedules([c], tmp_path / "p.png").stat().st_size > 20_000
    assert plot_run(d.schedule, d.ramp, d.train_iters, tmp_path / "run.png").stat().st_size > 20_000


def test_300k_iterations_of_a_torch_schedule_render_in_seconds(tmp_path: Path) -> None:
    schedule = TorchSchedule(f"{M}.CosineAnnealingLR", {"T_max": 299_500, "eta_min": 0.0}, 500, "linear",
                             0.01, 3e-4, 0.0, 0.1, 300_000)
    ramp = BatchRamp(1024)
    plot_schedules([curve(schedule, ramp, 1000)], tmp_path / "warm.png")  # the first call pays the imports
    start = time.perf_counter()
    c = curve(schedule, ramp, 300_000, label="cosine", seq_length=4096)
    png = plot_schedules([c], tmp_path / "s.png")
    elapsed = time.perf_counter() - start
    assert png.stat().st_size > 20_000 and c.iterations[-1] == 300_000 and c.note == ""
    assert {500, 501, 502} <= set(c.iterations)
    assert elapsed < 8.0, elapsed  # ~2-3 s on 2 cores (every iteration stepped); generous for a busy machine
    print(f"300k-iteration torch schedule plot: {elapsed:.2f} s")


def test_runs_past_the_cap_are_drawn_up_to_it_with_a_note(monkeypatch) -> None:
    monkeypatch.setattr(anneal.plot, "TORCH_PREVIEW_MAX_ITERS", 100)
    schedule = TorchSchedule(f"{M}.ExponentialLR", {"gamma": 0.99}, 0, "linear", 0.01, 3e-4, 0.0, 0.1, 300)
    c = curve(schedule, BatchRamp(8), 300, points=0)
    assert c.iterations[-1] == 100 and "drawn up to iteration 100 of 300" in c.note


def test_dry_run_prints_the_class_kwargs_and_warmup(compose) -> None:
    cfg, d = _derived(compose, "scheduler=multistep")
    table = schedule_table(cfg, d)
    assert table.splitlines()[:4] == [
        f"schedule: {M}.MultiStepLR(milestones=[150, 240], gamma=0.3)",
        "steps: once per iteration",
        ("warmup: linear from 0.01 x lr over 30 iterations; the schedule's iterations count from its end "
         "(SequentialLR)"),
        "lr: from each param group's max_lr (optimizer.lr 0.003); wd constant 0.1",
    ]
    assert "warmup end" in table and "end of training" in table
    cfg, d = _derived(compose, "scheduler=plateau")
    assert "steps: on the validation loss after each evaluation (train.eval_interval = 50" \
        in schedule_table(cfg, d)


def test_script_compares_a_torch_schedule_with_a_megatron_one(tmp_path: Path) -> None:
    out = run_cli("scheduler=onecycle", "--compare", "scheduler=cosine", "--out", str(tmp_path / "cmp.png"),
                  script="plot_schedule.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with (tmp_path / "cmp.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["config"] for r in rows} == {"scheduler=onecycle", "scheduler=cosine"}
    assert {r["phase"] for r in rows if r["config"] == "scheduler=onecycle"} == {"OneCycleLR"}
