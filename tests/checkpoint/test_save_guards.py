"""A save that cannot be completed loses nothing: a full disk, non-finite state; one process and torchrun.

The ``-async`` cases write in the background (``checkpoint.async_save``): the failure is agreed there and
stops the run at its next save or at the end, with the same line.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from anneal.checkpoint import files
from ckpt_helpers import digest, error_line, run

pytestmark = pytest.mark.slow

NONFINITE = "non-finite values in the model or optimizer state"


@pytest.fixture
def small_disk(tmp_path: Path):
    """``small_disk(size)``: a fresh tmpfs of ``size`` (unmounted after the test), or None where mounting
    is not permitted."""
    mounted: list[Path] = []

    def mount(size: str) -> Path | None:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                                capture_output=True)
        if result.returncode != 0:
            return None
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


def _save_dir(small_disk, tmp_path: Path, how: str, size: str) -> Path:
    if how.startswith("fault"):
        return tmp_path / "plain" / "ck"
    disk = small_disk(size)
    if disk is None:
        pytest.skip("mounting a tmpfs is not permitted here (the 'fault' case covers the same path)")
    return disk / "ck"


def _leftovers(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.iterdir() if p.name.startswith(".iter_") or p.name == "iter_0000010")


def _async(how: str) -> list[str]:
    return ["checkpoint.async_save=true"] if how.endswith("-async") else []


@pytest.mark.parametrize("how", ["tmpfs", "fault", "fault-async"])
def test_full_disk_keeps_the_latest_checkpoint_and_removes_the_partial_save(small_disk, tmp_path: Path,
                                                                            how: str) -> None:
    # 5 MiB holds one 2.9 MB checkpoint, not two: the save of iteration 10 is refused before writing.
    ck = _save_dir(small_disk, tmp_path, how, "5m")
    save = [f"checkpoint.save={ck}", "checkpoint.save_interval=5", "train.train_iters=10", *_async(how)]
    assert run(tmp_path, *save, "train.exit_interval=5").returncode == 0
    before = digest(ck)
    result = run(tmp_path, *save, fault="enospc_in_save:10" if how.startswith("fault") else None)
    assert result.returncode == 1, result.stderr[-3000:]
    line = error_line(result)
    assert line.startswith(f"anneal: error: no space left on device while saving iteration 10 to {ck}")
    assert line.endswith(f"; iteration 5 is the latest ({ck / 'iter_0000005'})")
    assert "Traceback" not in result.stderr and "inline_container" not in result.stderr
    assert _leftovers(ck) == []
    assert digest(ck) == before
    assert (ck / files.TRACKER).read_text().strip() == "5"


@pytest.mark.parametrize("how", ["tmpfs", "fault", "fault-async"])
def test_full_disk_under_torchrun_fails_on_every_rank_and_removes_the_partial_save(small_disk, tmp_path: Path,
                                                                                   how: str) -> None:
    # 2600 KiB is less than the first checkpoint (2.9 MB) but more than rank 0's share of it: the disk fills
    # up while DCP writes (a real ENOSPC, in a writer thread). The fault fails rank 1 alone.
    ck = _save_dir(small_disk, tmp_path, how, "2600k")
    ck.mkdir(parents=True)
    (ck / "notes.txt").write_text("kept")
    before = digest(ck)
    fault = "enospc_in_save:5:1" if how.startswith("fault") else None
    result = run(tmp_path, f"checkpoint.save={ck}", "checkpoint.save_interval=5", "train.train_iters=6",
                 "optimizer=distributed_fused_adam", *_async(how), nproc=2, fault=fault)
    assert result.returncode != 0
    for rank in ("", "[rank 1] "):
        assert (f"anneal: error: {rank}no space left on device while saving iteration 5 to {ck}; "
                f"no checkpoint has been saved in {ck} yet") in result.stderr, result.stderr[-3000:]
    assert "inline_container" not in result.stderr
    assert sorted(p.name for p in ck.iterdir()) == [".lock", "notes.txt"]
    assert digest(ck) == before


def test_nonfinite_state_is_never_saved_and_no_checkpoint_is_pruned(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    save = [f"checkpoint.save={ck}", "checkpoint.save_interval=3", "checkpoint.most_recent_k=1",
            "train.train_iters=9"]
    assert run(tmp_path, *save, "train.exit_interval=6").returncode == 0
    before = digest(ck)
    assert [p.name for p in files.completed(ck)] == ["iter_0000006"]
    result = run(tmp_path, *save, fault="nonfinite_in_save:9")
    assert result.returncode == 1, result.stderr[-3000:]
    line = error_line(result)
    assert line.startswith(f"anneal: error: iteration 9: {NONFINITE} (model.")
    assert "nothing was saved and no checkpoint removed" in line
    assert line.endswith(f"checkpoint.load={ck / 'iter_0000006'}")
    assert digest(ck) == before  # iteration 6 kept (most_recent_k=1 did not prune it), nothing new
    assert not list(ck.glob(".iter_*"))


def test_nonfinite_state_on_one_rank_stops_every_rank_before_writing(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    result = run(tmp_path, f"checkpoint.save={ck}", "checkpoint.save_interval=3", "train.train_iters=6",
                 nproc=2, fault="nonfinite_in_save:6:1")
    assert result.returncode != 0
    assert f"anneal: error: [rank 1] iteration 6: {NONFINITE} (model." in result.stderr, result.stderr[-3000:]
    latest = ck / "iter_0000003"
    assert (f"anneal: error: iteration 6: {NONFINITE} (on another rank; 1 rank(s)): nothing was saved and no "
            f"checkpoint removed; resume from the latest good checkpoint with checkpoint.load={latest}"
            ) in result.stderr
    assert [p.name for p in files.completed(ck)] == ["iter_0000003"]
    assert (ck / files.TRACKER).read_text().strip() == "3" and not list(ck.glob(".iter_*"))
    files.verify(ck / "iter_0000003")
