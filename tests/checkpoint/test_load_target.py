"""What ``checkpoint.load`` may name (the empty save directory, else a checkpoint); the resume report."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anneal.checkpoint import files
from ckpt_helpers import error_line, run

pytestmark = pytest.mark.slow

FRESH = "is the save directory and holds no checkpoint yet: starting a fresh run"


def test_load_equal_to_save_on_a_first_run_starts_fresh(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    result = run(tmp_path, "train.train_iters=4", f"checkpoint.load={ck}/", f"checkpoint.save={ck}")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count(FRESH) == 1
    assert (ck / files.TRACKER).read_text().strip() == "4"


TARGETS = ("empty", "missing")


@pytest.fixture(scope="module")
def nothing_to_load(tmp_path_factory) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """Per target (an empty directory, a missing one): checkpoint.load, checkpoint.save and the run.

    Both runs at once (one core each)."""
    root = tmp_path_factory.mktemp("nothing_to_load")

    def attempt(target: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
        tmp = root / target
        load, ck = tmp / target, tmp / "ck"
        tmp.mkdir()
        if target == "empty":
            load.mkdir()
        return load, ck, run(tmp, "train.train_iters=4", f"checkpoint.load={load}", f"checkpoint.save={ck}")

    with ThreadPoolExecutor(max_workers=len(TARGETS)) as pool:
        return dict(zip(TARGETS, pool.map(attempt, TARGETS)))


@pytest.mark.parametrize("target", TARGETS)
def test_explicit_load_with_nothing_to_load_fails_before_anything_is_built(nothing_to_load,
                                                                          target: str) -> None:
    load, ck, result = nothing_to_load[target]
    assert result.returncode == 2
    reason = f"has no {files.TRACKER}: no checkpoint to load" if target == "empty" else "does not exist"
    assert error_line(result).startswith(f"anneal: error: checkpoint.load ({load}) {reason}")
    assert "parameters" not in result.stdout + result.stderr  # refused before the model was built
    assert not ck.exists()  # nor was the save directory created


def test_resume_prints_the_scheduler_table_once(ck: Path, tmp_path: Path) -> None:
    result = run(tmp_path, "train.train_iters=11", f"checkpoint.save={ck}",
                 "scheduler.override_opt_param_scheduler=true")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count(f"resumed from {ck / 'iter_0000010'} at iteration 10") == 1
    assert output.count("lr_warmup_steps") == 1  # one row of the one table
