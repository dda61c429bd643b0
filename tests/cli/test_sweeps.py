"""Hydra multirun through the launcher: comma lists, choice(), range(), one directory per job, dry runs."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from anneal_testing import run_cli

SHORT = ("train.train_iters=20", "scheduler.lr_warmup_fraction=0.1", "dry_run=true")
# The documented sweep: a short run over optimizer.lr and two schedules (README "Sweeps (multirun)").
TINY_RUN = ("train.train_iters=4", "scheduler.lr_warmup_iters=1", "model.num_layers=1", "model.seq_length=32",
            "train.eval_interval=null", "logger.log_interval=2", "logger.plot_schedule=false")


def test_sweep_of_comma_lists_dry_runs_every_job_and_leaves_nothing(tmp_path) -> None:
    out = run_cli("-m", "scheduler=cosine,wsd", *SHORT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "lr cosine" in out.stdout and "lr WSD" in out.stdout  # each job printed its own schedule
    assert out.stdout.count("# plan") == 2 and "done:" not in out.stdout  # nothing trained
    assert not (tmp_path / "multirun").exists()


def test_choice_and_range_sweeps_expand(tmp_path) -> None:
    out = run_cli("-m", "scheduler=choice(cosine,wsd)", "train.train_iters=range(20,40,10)",
                  "scheduler.lr_warmup_fraction=0.1", "dry_run=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ends = [line.split()[3] for line in out.stdout.splitlines() if line.startswith("end of training")]
    assert sorted(ends) == ["20", "20", "30", "30"]


def test_a_bad_job_fails_alone_and_the_sweep_exits_non_zero(tmp_path) -> None:
    out = run_cli("-m", "optimizer.lr=1e-3,-1", *SHORT, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["anneal: error: optimizer.lr (-1) must be >= 0",
                                               "anneal: error: sweep: 1 of 2 jobs failed: #1 (exit 2)"]
    assert out.stdout.count("# plan") == 1  # job #0 still ran


def test_sweep_trains_one_directory_per_job(tmp_path) -> None:
    out = run_cli("-m", "optimizer.lr=1e-3,3e-3", "scheduler=cosine,wsd", *TINY_RUN, cwd=tmp_path,
                  env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    jobs = sorted((tmp_path / "multirun").glob("*/*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        lines = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("iteration") == 4 for r in lines), (job, overrides)


def test_sweep_under_torchrun_is_refused_in_one_line(tmp_path) -> None:
    out = run_cli("-m", "optimizer.lr=1e-3,3e-3", *SHORT, cwd=tmp_path,
                  env={"WORLD_SIZE": "2", "RANK": "0"})
    assert out.returncode == 2
    expected = "anneal: error: -m/--multirun (a Hydra sweep) cannot run under torchrun"
    assert out.stderr.strip().startswith(expected)
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_launcher_group_can_be_swapped(tmp_path) -> None:
    out = run_cli("-m", "hydra/launcher=basic", "optimizer.lr=1e-3,3e-3", *SHORT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("# plan") == 2


def _has_submitit() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


@pytest.mark.skipif(not _has_submitit(), reason="hydra-submitit-launcher is not installed")
def test_submitit_local_launcher_runs_the_sweep(tmp_path) -> None:
    out = run_cli("-m", "hydra/launcher=submitit_local", "optimizer.lr=1e-3,3e-3", *SHORT, cwd=tmp_path,
                  timeout=300)
    assert out.returncode == 0, out.stderr


def test_a_misspelled_key_in_a_sweep_is_one_line_before_any_job_starts(tmp_path) -> None:
    out = run_cli("-m", "optimizer.lrr=1e-3,3e-3", "dry_run=true", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == ("anneal: error: optimizer.lrr is not a config key; did you mean "
                                  "optimizer.lr=0.001? (sweep job #0: optimizer.lrr=0.001)")
    assert not (tmp_path / "multirun").exists()


def test_a_dry_run_sweep_prints_the_config_once_then_each_jobs_differences(tmp_path) -> None:
    """README's six-job dry-run sweep: the full config for job #0 only, then what each job changes; Hydra's
    own lines in anneal's log format (``[date time] message``, no ``[HYDRA]`` and no milliseconds)."""
    out = run_cli("-m", "optimizer.lr=choice(1e-3,3e-3)", "train.train_iters=range(100,400,100)",
                  "scheduler.lr_warmup_fraction=0.1", "dry_run=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert out.stdout.count("_target_: anneal.config.container.ConfigContainer") == 1
    assert out.stdout.count("# plan") == 6
    assert "job #4 differs from job #0 in 2 setting(s): optimizer.lr 0.001 -> 0.003, " \
           "train.train_iters 100 -> 200" in lines
    assert "[HYDRA]" not in out.stdout
    launching = next(line for line in lines if line.endswith("Launching 6 jobs locally"))
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] Launching 6 jobs locally", launching)
    assert len(lines) < 500, len(lines)  # 1069 lines with the config printed once per job
