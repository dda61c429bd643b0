"""The schedule preview: values from the scheduler the training uses, phases, CSV, PNG, comparisons."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from anneal.cli.plot_schedule import expand, main
from anneal.plot import curve, phase_spans, plot_schedules, write_csv
from anneal.scheduler import OptimizerParamScheduler
from anneal_testing import run_cli


def _derived(compose, *overrides: str):
    cfg = compose(*overrides)
    return cfg, cfg.validate()


def _scheduler(schedule) -> OptimizerParamScheduler:
    class Groups:
        param_groups = [{}]

    s = schedule
    return OptimizerParamScheduler(
        Groups(), s.init_lr, s.max_lr, s.min_lr, s.lr_warmup_steps, s.lr_decay_steps, s.lr_decay_style,
        s.start_wd, s.end_wd, s.wd_incr_steps, s.wd_incr_style, use_checkpoint_opt_param_scheduler=False,
        wsd_decay_steps=s.wsd_decay_steps, lr_wsd_decay_style=s.lr_wsd_decay_style,
    )


def test_every_point_is_what_the_training_scheduler_applies(compose) -> None:
    cfg, d = _derived(compose, "scheduler=wsd", "scheduler.weight_decay_incr_style=linear",
                      "scheduler.start_weight_decay=0.01", "train.rampup_batch_size=[8,8,1600]")
    c = curve(d.schedule, d.ramp, d.train_iters, points=0)
    scheduler = _scheduler(d.schedule)
    assert c.iterations == list(range(1, d.train_iters + 1))
    for k, lr, wd in zip(c.iterations, c.lr, c.wd):
        group = scheduler.optimizer.param_groups[0]
        assert (lr, wd) == (group["lr"], group["weight_decay"]), k  # exactly, not approximately
        scheduler.step(d.ramp.batch_size_at(scheduler.num_steps))  # as the loop: this batch's samples


def test_sampled_long_run_keeps_every_phase_boundary(compose) -> None:
    _, d = _derived(compose, "recipe=qwen3_4b")
    c = curve(d.schedule, d.ramp, d.train_iters, points=2000)
    assert 2000 <= len(c.iterations) < 2050 and c.iterations[-1] == 300_000
    assert {500, 501, 502, 240_000, 240_001, 240_002} <= set(c.iterations)
    at = dict(zip(c.iterations, c.lr))
    assert at[501] == d.schedule.max_lr and at[500] < d.schedule.max_lr  # the peak, at the right iteration
    assert at[240_001] == d.schedule.max_lr > at[240_002]  # the anneal starts right after
    assert [p.name for p in c.phases] == ["warmup", "stable", "anneal"]
    assert [(p.end_iteration, p.end_samples) for p in c.phases] == [(500, 16_000), (240_000, 7_680_000),
                                                                   (300_000, 9_600_000)]


def test_phase_column_follows_the_lr_branches(compose) -> None:
    _, d = _derived(compose, "scheduler=wsd", "train.train_iters=300", "scheduler.lr_decay_iters=250")
    c = curve(d.schedule, d.ramp, d.train_iters, points=0)
    phase = [c.phase_at(s) for s in c.samples]
    by_phase = {name: [lr for lr, p in zip(c.lr, phase) if p == name] for name in set(phase)}
    assert sorted(by_phase) == ["anneal", "min lr", "stable", "warmup"]
    assert by_phase["warmup"] == sorted(by_phase["warmup"]) and by_phase["warmup"][-1] == d.schedule.max_lr
    assert set(by_phase["stable"]) == {d.schedule.max_lr}
    assert set(by_phase["min lr"]) == {d.schedule.min_lr}
    assert [p.name for p in phase_spans(d.schedule, d.ramp, d.train_iters)][-1] == "min lr"


def test_csv_has_one_row_per_point_with_exact_values(compose, tmp_path: Path) -> None:
    cfg, d = _derived(compose, "scheduler=cosine")
    c = curve(d.schedule, d.ramp, d.train_iters, label="cos", seq_length=cfg.model.seq_length, points=0)
    with write_csv([c], tmp_path / "s.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == d.train_iters
    assert [float(r["lr"]) for r in rows] == c.lr
    last = rows[-1]
    assert int(last["consumed_samples"]) == (d.train_iters - 1) * cfg.train.global_batch_size
    assert int(last["consumed_tokens"]) == int(last["consumed_samples"]) * cfg.model.seq_length


def test_300k_iterations_plot_in_about_a_second(compose, tmp_path: Path) -> None:
    _, d = _derived(compose, "recipe=qwen3_4b")
    curves = [curve(d.schedule, d.ramp, d.train_iters, label="qwen3_4b", seq_length=4096)]
    plot_schedules(curves, tmp_path / "warm.png")  # the first call pays matplotlib's imports
    start = time.perf_counter()
    c = curve(d.schedule, d.ramp, d.train_iters, label="qwen3_4b", seq_length=4096)
    png = plot_schedules([c], tmp_path / "s.png")
    elapsed = time.perf_counter() - start
    assert png.stat().st_size > 20_000
    assert elapsed < 3.0, elapsed  # ~0.6 s on 2 idle cores; generous for a busy CI machine
    print(f"300k-iteration plot: {elapsed:.2f} s")


def test_compare_and_sweeps_expand_to_labelled_runs() -> None:
    runs = expand(["recipe=tiny", "scheduler.lr_wsd_decay_style=linear,cosine"], ["scheduler=cosine"],
                  multirun=True)
    assert runs == [
        ("scheduler.lr_wsd_decay_style=linear", ["recipe=tiny", "scheduler.lr_wsd_decay_style=linear"]),
        ("scheduler.lr_wsd_decay_style=cosine", ["recipe=tiny", "scheduler.lr_wsd_decay_style=cosine"]),
        ("scheduler=cosine", ["recipe=tiny", "scheduler.lr_wsd_decay_style=linear", "scheduler=cosine"]),
    ]
    assert expand([], [], multirun=False) == [("default", [])]


def test_a_sweep_without_multirun_fails_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["recipe=tiny", "scheduler.lr_wsd_decay_style=linear,cosine"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("anneal: error: scheduler.lr_wsd_decay_style=linear,cosine "
                                               "is a sweep: add -m to draw one curve per value")


def test_script_draws_a_multirun_and_a_comparison_on_one_plot(tmp_path: Path) -> None:
    out = run_cli("-m", "recipe=qwen3_4b", "scheduler.lr_wsd_decay_style=minus_sqrt,linear",
                  "--compare", "scheduler=cosine", "--out", str(tmp_path / "cmp.png"),
                  script="plot_schedule.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cmp.png").stat().st_size > 20_000
    with (tmp_path / "cmp.csv").open() as f:
        configs = {row["config"] for row in csv.DictReader(f)}
    assert configs == {"scheduler.lr_wsd_decay_style=minus_sqrt", "scheduler.lr_wsd_decay_style=linear",
                       "scheduler=cosine"}


def test_parent_and_branches_on_one_figure(tmp_path: Path) -> None:
    out = tmp_path / "branches.png"
    main(["scheduler=wsd", "train.train_iters=100", "scheduler.lr_warmup_iters=5", "scheduler.lr_wsd_decay_iters=10",
          "--branch", "20:5", "--branch", "40:10", "--out", str(out), "--points", "0"])
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    labels = list(dict.fromkeys(r["config"] for r in rows))
    assert labels[0] == "parent" and len(labels) == 3 and out.stat().st_size > 10_000
    branch = [r for r in rows if r["config"] == labels[2]]
    assert [int(r["iteration"]) for r in branch] == list(range(41, 51))  # drawn from the branch point on
    parent_lr = {int(r["iteration"]): float(r["lr"]) for r in rows if r["config"] == "parent"}
    assert float(branch[0]["lr"]) == parent_lr[41] and float(branch[-1]["lr"]) < parent_lr[50]


def test_a_branch_in_the_warmup_is_refused(tmp_path: Path) -> None:
    result = run_cli("scheduler=wsd", "scheduler.lr_warmup_iters=30", "--branch", "10:5",
                     "--out", str(tmp_path / "x.png"), script="plot_schedule.py")
    assert result.returncode == 2 and "is in the warmup" in result.stderr
