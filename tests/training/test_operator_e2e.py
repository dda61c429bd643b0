"""What an operator watches, through the real entry point: the console and ``pretrain.log`` in one
format, elapsed time and ETA, a W&B run (offline, the real wandb package) and a profiler trace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anneal_testing import ROOT, free_port, metrics_by_iteration, wandb_history

pytestmark = pytest.mark.slow

TINY = ["model.num_layers=1", "model.seq_length=32", "train.train_iters=6", "train.global_batch_size=4",
        "train.micro_batch_size=2", "scheduler.lr_warmup_iters=1", "logger.log_interval=2",
        "train.eval_interval=3", "train.eval_iters=1", "logger.plot_schedule=false"]
WATCH = ["logger.wandb_project=anneal-e2e", "profiling.use_pytorch_profiler=true",
         "profiling.profile_step_start=2", "profiling.profile_step_end=4"]
NO_WANDB_ENV = ("WANDB_API_KEY", "WANDB_MODE")  # without them, logger.wandb_mode auto means offline
ONE_FORMAT = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \S")
PROGRESS = re.compile(r"\] \[\d/6 +\d+%\] \| samples ")


def _pretrain(out: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """``scripts/pretrain.py`` with TINY and WATCH (torchrun when ``nproc`` > 1), without W&B credentials."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                                      "--master-port", str(free_port())]
    cmd = [sys.executable, *launcher, str(ROOT / "scripts" / "pretrain.py"), *TINY, *WATCH, *overrides,
           f"hydra.run.dir={out}"]
    dropped = (*NO_WANDB_ENV, "ANNEAL_FULL_ERROR", "HYDRA_FULL_ERROR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The one-process run and a 4-iteration 2-rank run (torchrun), at once: they share nothing."""
    single, two = tmp_path_factory.mktemp("operator"), tmp_path_factory.mktemp("operator_two_ranks")
    with ThreadPoolExecutor(max_workers=2) as pool:
        two_ranks = pool.submit(_pretrain, two, "profiling.profile_ranks=[]", "train.train_iters=4",
                                "train.eval_interval=null", nproc=2)
        one = _pretrain(single)
        return {"single": (single, one), "two_ranks": (two, two_ranks.result())}


@pytest.fixture(scope="module")
def single(runs) -> tuple[Path, subprocess.CompletedProcess]:
    out, result = runs["single"]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def test_console_lines_share_one_format(single) -> None:
    _, result = single
    lines = result.stdout.splitlines()
    assert len(lines) >= 10 and [line for line in lines if not ONE_FORMAT.match(line)] == []
    assert "][INFO] - " not in result.stdout + result.stderr  # Hydra's default format is gone


def test_pretrain_log_holds_the_console_lines(single) -> None:
    out, result = single
    logged = (out / "pretrain.log").read_text().splitlines()
    assert logged == result.stdout.splitlines()
    assert len([line for line in logged if PROGRESS.search(line)]) == 3  # iterations 2, 4, 6
    assert any("] anneal: " in line for line in logged)  # the banner


def test_progress_lines_show_elapsed_then_an_eta(single) -> None:
    _, result = single
    first, *later = [line for line in result.stdout.splitlines() if PROGRESS.search(line)]
    assert re.search(r" \| elapsed \d+:\d\d:\d\d$", first)  # no rate yet: the warm-up is excluded
    assert all(re.search(r" \| elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d$", line) for line in later)


def test_wandb_offline_run_holds_the_logged_loss(single) -> None:
    out, result = single
    rows = {row["_step"]: row for row in wandb_history(out)}
    expected = {it: r["loss"] for it, r in metrics_by_iteration(out).items()}
    assert expected.keys() == {2, 4, 6} and {it: rows[it]["loss"] for it in expected} == expected
    assert "valid_loss" in rows[6] and "wandb sync" in result.stdout


def test_profiler_trace_of_the_window(single) -> None:
    out, _ = single
    assert [p.name for p in (out / "profile").iterdir()] == ["trace_iters3-4_rank0.json"]
    events = json.loads((out / "profile" / "trace_iters3-4_rank0.json").read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)


def test_two_ranks_write_rank_tagged_traces_and_one_log(runs) -> None:
    out, result = runs["two_ranks"]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert sorted(p.name for p in (out / "profile").iterdir()) == [
        "trace_iters3-4_rank0.json", "trace_iters3-4_rank1.json"]
    logged = (out / "pretrain.log").read_text()
    assert "2 rank(s)" in logged and len(re.findall(r"\] \[\d/4 +\d+%\] \| samples ", logged)) == 2
    assert len(list(out.glob("wandb/offline-run-*"))) == 1  # rank 0 only
