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


def _drawn_figure(monkeypatch):
    """The figure ``plot_schedules`` saves, kept open for its layout to be measured."""
    import anneal.plot

    figures = []
    monkeypatch.setattr(anneal.plot, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def test_two_compares_without_base_overrides_draw_exactly_two_curves(tmp_path: Path, capsys) -> None:
    main(["--compare", "scheduler=wsd", "--compare", "scheduler=cosine", "--out", str(tmp_path / "c.png")])
    assert capsys.readouterr().out.strip().endswith("(2 configurations)")
    with (tmp_path / "c.csv").open() as f:
        labels = list(dict.fromkeys(r["config"] for r in csv.DictReader(f)))
    assert labels == ["scheduler=wsd", "scheduler=cosine"]


def test_legends_and_a_long_title_stay_inside_the_figure_off_the_panels(tmp_path: Path, monkeypatch) -> None:
    figures = _drawn_figure(monkeypatch)
    overrides = ["scheduler=wsd", "train.train_iters=100000", "scheduler.lr_warmup_iters=2000",  # a title of
                 "scheduler.lr_wsd_decay_iters=10000", "scheduler.lr_wsd_decay_style=linear"]  # 169 characters
    main([*overrides, "--branch", "20000:2000", "--branch", "40000:4000", "--branch", "80000:8000", "--out",
          str(tmp_path / "b.png")])
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    assert all(ax.get_legend() is None for ax in fig.axes)  # no legend inside a panel
    assert len(fig.legends) == 2  # the curves and the phases, below the panels
    curves, shaded = (legend.get_window_extent(renderer) for legend in fig.legends)
    assert not curves.overlaps(shaded)
    for box in (curves, shaded):
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y0 >= page.y0
        assert not any(box.overlaps(panel) for panel in panels)
    title = fig._suptitle.get_window_extent(renderer)
    assert page.x0 <= title.x0 and title.x1 <= page.x1 and title.y1 <= page.y1, (title, page)


def test_default_output_goes_to_outputs_not_the_working_directory(tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    monkeypatch.chdir(tmp_path)
    main(["train.train_iters=50", "--points", "0"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "outputs/schedules/schedule.csv", "outputs/schedules/schedule.png"]
    assert "wrote outputs/schedules/schedule.png" in capsys.readouterr().out


def test_run_schedule_csv_has_no_column_left_empty(compose, tmp_path: Path) -> None:
    from anneal.plot import plot_run

    cfg, d = _derived(compose, "scheduler=wsd", "train.train_iters=40")
    png = plot_run(d.schedule, d.ramp, d.train_iters, tmp_path / "schedule.png",
                   seq_length=cfg.model.seq_length)
    with png.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all(all(value != "" for value in row.values()) for row in rows)
    assert int(rows[-1]["consumed_tokens"]) == int(rows[-1]["consumed_samples"]) * cfg.model.seq_length
    png = plot_run(d.schedule, d.ramp, d.train_iters, tmp_path / "bare.png")  # no sequence length known
    header = png.with_suffix(".csv").read_text().splitlines()[0]
    assert header == "iteration,consumed_samples,lr,weight_decay,phase"


def test_a_first_plot_keeps_matplotlibs_font_cache_message_out_of_the_log(monkeypatch, caplog) -> None:
    import logging

    from anneal.plot import _pyplot

    _pyplot()
    from matplotlib import font_manager

    monkeypatch.setattr(font_manager, "json_dump", lambda *args: None)  # the user's cache file stays as it is
    caplog.set_level(logging.INFO)  # a run's log takes INFO and up
    font_manager._load_fontmanager(try_read_cache=False)  # what a fresh environment's first import does
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("matplotlib")]
