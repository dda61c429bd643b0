"""Exact resume through the real entry point: SIGKILL, a crash mid-save, torchrun restarts, resharding."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from anneal_testing import metrics_by_iteration as _records
from ckpt_helpers import pretrain

pytestmark = pytest.mark.slow

RUN = ["model.num_layers=1", "model.seq_length=32", "train.train_iters=20", "train.global_batch_size=8",
       "train.micro_batch_size=2", "scheduler.lr_warmup_iters=3", "logger.log_interval=1",
       "train.eval_interval=null", "logger.plot_schedule=false"]


def _pretrain(run_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return pretrain(run_dir, *RUN, *overrides, **kwargs)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def _same(a: dict[int, dict], b: dict[int, dict], keys=("loss", "lr", "weight_decay", "grad_norm")) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for it in a:
        assert [a[it][k] for k in keys] == [b[it][k] for k in keys], f"iteration {it} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, dict[int, dict]]:
    """Uninterrupted 20-iteration runs: one process, and 2 ranks with the distributed optimizer."""
    root = tmp_path_factory.mktemp("straight")
    _ok(_pretrain(root / "one"))
    _ok(_pretrain(root / "two", "optimizer=distributed_fused_adam", nproc=2))
    return {"one": _records(root / "one"), "two": _records(root / "two")}


def test_sigkill_and_resume_is_bit_identical_single_process(straight, tmp_path: Path) -> None:
    save = [f"checkpoint.save={tmp_path / 'ck'}", "checkpoint.save_interval=10"]
    killed = _pretrain(tmp_path / "run", *save, fault="kill_at_iteration:11")
    assert killed.returncode == -9
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    resumed = _pretrain(tmp_path / "run", *save)
    _ok(resumed)
    assert "resumed from" in resumed.stdout and "at iteration 10 (80 samples)" in resumed.stdout
    _same(straight["one"], _records(tmp_path / "run"))


def test_sigkill_and_resume_is_bit_identical_on_two_ranks(straight, tmp_path: Path) -> None:
    save = ["optimizer=distributed_fused_adam", f"checkpoint.save={tmp_path / 'ck'}", "checkpoint.save_interval=10"]
    killed = _pretrain(tmp_path / "run", *save, nproc=2, fault="kill_at_iteration:11")
    assert killed.returncode != 0
    _ok(_pretrain(tmp_path / "run", *save, nproc=2))
    _same(straight["two"], _records(tmp_path / "run"))


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(straight, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    save = [f"checkpoint.save={ck}", "checkpoint.save_interval=5"]
    crashed = _pretrain(tmp_path / "run", *save, fault="crash_in_save:10")
    assert crashed.returncode == -9
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert (ck / ".iter_0000010.partial").is_dir() and not (ck / "iter_0000010").exists()
    resumed = _pretrain(tmp_path / "run", *save)
    _ok(resumed)
    assert "at iteration 5 (40 samples)" in resumed.stdout
    assert not (ck / ".iter_0000010.partial").exists()
    _same(straight["one"], _records(tmp_path / "run"))


def test_torchrun_restart_after_a_rank_crash_completes_from_the_checkpoint(straight, tmp_path: Path) -> None:
    save = ["optimizer=distributed_fused_adam", f"checkpoint.save={tmp_path / 'ck'}", "checkpoint.save_interval=10"]
    result = _pretrain(tmp_path / "run", *save, nproc=2, fault="kill_at_iteration:11:1",
                       torchrun_args=("--max-restarts", "1"))
    _ok(result)
    assert "resumed from" in result.stdout + result.stderr
    _same(straight["two"], _records(tmp_path / "run"))


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)])
def test_checkpoint_reshards_between_rank_counts(straight, tmp_path: Path, saved_on: int, resumed_on: int) -> None:
    save = ["optimizer=distributed_fused_adam", f"checkpoint.save={tmp_path / 'ck'}", "checkpoint.save_interval=10"]
    first = _pretrain(tmp_path / "run", *save, "train.exit_interval=10", nproc=saved_on)
    _ok(first)
    _ok(_pretrain(tmp_path / "run", *save, nproc=resumed_on))
    records = _records(tmp_path / "run")
    reference = straight["two" if resumed_on == 2 else "one"]
    for it in range(11, 21):  # the same training, up to float summation order across ranks
        assert records[it]["loss"] == pytest.approx(reference[it]["loss"], rel=1e-4)
        assert records[it]["lr"] == reference[it]["lr"]
