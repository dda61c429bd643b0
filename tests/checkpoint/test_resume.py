"""Exact resume through the real entry point: SIGKILL, a crash mid-save, torchrun restarts, resharding."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
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
    with ThreadPoolExecutor(max_workers=2) as pool:  # independent: the one-process run overlaps torchrun's
        one = pool.submit(_pretrain, root / "one")
        two = pool.submit(_pretrain, root / "two", "optimizer=distributed_fused_adam", nproc=2)
        _ok(one.result())
        _ok(two.result())
    return {"one": _records(root / "one"), "two": _records(root / "two")}


ZERO1 = ["optimizer=distributed_fused_adam", "checkpoint.save_interval=10"]


@pytest.fixture(scope="module")
def killed_on_two_ranks(tmp_path_factory) -> Path:
    """A 2-rank run (distributed optimizer) that saved iteration 10 and was SIGKILLed as 11 started.

    Its directory holds ``run/`` and ``ck/``; a test resumes a copy (``_copy_of``), on 2 ranks or on 1.
    """
    root = tmp_path_factory.mktemp("killed2")
    killed = _pretrain(root / "run", *ZERO1, f"checkpoint.save={root / 'ck'}", nproc=2,
                       fault="kill_at_iteration:11")
    assert killed.returncode != 0
    assert (root / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    return root


def _copy_of(killed: Path, tmp_path: Path) -> list[str]:
    """``killed``'s run directory and checkpoints copied to ``tmp_path``: the overrides that resume them."""
    for name in ("run", "ck"):
        shutil.copytree(killed / name, tmp_path / name)
    return [*ZERO1, f"checkpoint.save={tmp_path / 'ck'}"]


@pytest.fixture(scope="module")
def one_process_faults(tmp_path_factory) -> dict[str, dict]:
    """The one-process faults, each followed by the same command again; both pairs at once (one core each).

    SIGKILL as iteration 11 starts (saves every 10); a crash halfway through the save of iteration 10
    (saves every 5). Per fault: the save directory, the faulted run, that directory's tracker and
    entries (name: is a directory) right after the fault, and the run that resumes.
    """
    root = tmp_path_factory.mktemp("faults")
    faults = {"sigkill": ("kill_at_iteration:11", 10), "crash_in_save": ("crash_in_save:10", 5)}

    def fault_then_resume(name: str) -> dict:
        fault, interval = faults[name]
        run, ck = root / name / "run", root / name / "ck"
        run.parent.mkdir()
        save = [f"checkpoint.save={ck}", f"checkpoint.save_interval={interval}"]
        faulted = _pretrain(run, *save, fault=fault)
        tracker = ck / "latest_checkpointed_iteration.txt"
        after = {"tracker": tracker.read_text().strip() if tracker.is_file() else None,
                 "entries": {p.name: p.is_dir() for p in ck.iterdir()} if ck.is_dir() else {}}
        return {"ck": ck, "faulted": faulted, "after": after, "resumed": _pretrain(run, *save),
                "records": _records(run) if (run / "metrics.jsonl").is_file() else {}}

    with ThreadPoolExecutor(max_workers=len(faults)) as pool:
        return dict(zip(faults, pool.map(fault_then_resume, faults)))


def test_sigkill_and_resume_is_bit_identical_single_process(straight, one_process_faults) -> None:
    case = one_process_faults["sigkill"]
    assert case["faulted"].returncode == -9
    assert case["after"]["tracker"] == "10"
    resumed = case["resumed"]
    _ok(resumed)
    assert "resumed from" in resumed.stdout and "at iteration 10 (80 samples)" in resumed.stdout
    _same(straight["one"], case["records"])


def test_sigkill_and_resume_is_bit_identical_on_two_ranks(straight, killed_on_two_ranks,
                                                           tmp_path: Path) -> None:
    _ok(_pretrain(tmp_path / "run", *_copy_of(killed_on_two_ranks, tmp_path), nproc=2))
    _same(straight["two"], _records(tmp_path / "run"))


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(straight, one_process_faults) -> None:
    case = one_process_faults["crash_in_save"]
    assert case["faulted"].returncode == -9
    assert case["after"]["tracker"] == "5"
    entries = case["after"]["entries"]  # the partial save is a directory; no completed iteration 10
    assert entries.get(".iter_0000010.partial") is True and "iter_0000010" not in entries
    resumed = case["resumed"]
    _ok(resumed)
    assert "at iteration 5 (40 samples)" in resumed.stdout
    assert not (case["ck"] / ".iter_0000010.partial").exists()
    _same(straight["one"], case["records"])


def test_torchrun_restart_after_a_rank_crash_completes_from_the_checkpoint(straight, tmp_path: Path) -> None:
    save = ["optimizer=distributed_fused_adam", f"checkpoint.save={tmp_path / 'ck'}", "checkpoint.save_interval=10"]
    result = _pretrain(tmp_path / "run", *save, nproc=2, fault="kill_at_iteration:11:1",
                       torchrun_args=("--max-restarts", "1"))
    _ok(result)
    assert "resumed from" in result.stdout + result.stderr
    _same(straight["two"], _records(tmp_path / "run"))


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)])
def test_checkpoint_reshards_between_rank_counts(straight, request, tmp_path: Path, saved_on: int,
                                                 resumed_on: int) -> None:
    if saved_on == 2:  # the checkpoint of iteration 10 that the 2-rank SIGKILL test resumes
        save = _copy_of(request.getfixturevalue("killed_on_two_ranks"), tmp_path)
    else:
        save = [*ZERO1, f"checkpoint.save={tmp_path / 'ck'}"]
        _ok(_pretrain(tmp_path / "run", *save, "train.exit_interval=10", nproc=saved_on))
    _ok(_pretrain(tmp_path / "run", *save, nproc=resumed_on))
    records = _records(tmp_path / "run")
    reference = straight["two" if resumed_on == 2 else "one"]
    for it in range(11, 21):  # the same training, up to float summation order across ranks
        assert records[it]["loss"] == pytest.approx(reference[it]["loss"], rel=1e-4)
        assert records[it]["lr"] == reference[it]["lr"]
