"""The save guards and load-target checks on their own (fast; end-to-end runs: test_save_guards.py)."""

from __future__ import annotations

import errno
import shutil
import threading
import traceback
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from anneal.checkpoint import files, guards
from anneal.config.runtime import CheckpointConfig
from anneal.errors import ConfigError


def _torch_zip_failure() -> RuntimeError:
    """What torch.save raises on a full disk: the errno only in the context, as on a real tmpfs."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as error:
        return error


def test_a_full_disk_is_recognised_inside_dcp_per_rank_failures(tmp_path: Path) -> None:
    wrapped = CheckpointException("write", {1: (_torch_zip_failure(), traceback.StackSummary())})
    assert guards.is_disk_full(wrapped, tmp_path)
    assert not guards.is_disk_full(RuntimeError("something else"), tmp_path)


def test_writer_thread_errors_are_collected_not_printed(capsys) -> None:
    def failing() -> None:
        raise _torch_zip_failure()

    before = threading.excepthook
    with guards.writer_thread_errors() as caught:
        thread = threading.Thread(target=failing, name="Thread-9 (_write_files_from_queue)")
        thread.start()
        thread.join()
    assert len(caught) == 1 and "unexpected pos" in str(caught[0])
    assert "Traceback" not in capsys.readouterr().err
    assert threading.excepthook is before


def test_space_shortfall_uses_the_previous_checkpoint_size(tmp_path: Path, monkeypatch) -> None:
    previous = files.iter_dir(tmp_path, 5)
    previous.mkdir()
    (previous / "__0_0.distcp").write_bytes(b"x" * 4_000_000)
    (tmp_path / files.TRACKER).write_text("5\n")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 0, 3_000_000))
    expected = "2.9 MiB free, the checkpoint needs about 4.3 MiB"
    assert guards.space_shortfall(tmp_path, local_state_bytes=1) == expected
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 0, 5_000_000))
    assert guards.space_shortfall(tmp_path, local_state_bytes=10**9) is None


def test_first_nonfinite_names_the_tensor() -> None:
    state = {"model": {"w": torch.ones(3)}, "optimizer": {"exp_avg": torch.tensor([0.0, float("inf")])},
             "rng": {"rank_0": {"cpu": torch.zeros(4, dtype=torch.uint8)}}}
    assert guards.first_nonfinite(state) == "optimizer.exp_avg"
    state["optimizer"]["exp_avg"].zero_()
    assert guards.first_nonfinite(state) is None


@pytest.mark.parametrize("setup,error", [
    ("save-dir-empty", None), ("save-dir-missing", None), ("other-empty", "has no latest_checkpointed"),
    ("other-missing", "does not exist"), ("tracker-dangling", "names iter_0000007, which does not exist"),
])
def test_check_load_target(tmp_path: Path, setup: str, error: str | None) -> None:
    save, other = tmp_path / "ck", tmp_path / "other"
    load = save if setup.startswith("save-dir") else other
    if setup.endswith("empty") or setup == "tracker-dangling":
        load.mkdir()
    if setup == "tracker-dangling":
        (load / files.TRACKER).write_text("7\n")
    cfg = CheckpointConfig(save=str(save), load=f"{load}/")
    if error is None:
        files.check_load_target(cfg)
    else:
        with pytest.raises(ConfigError, match=error):
            files.check_load_target(cfg)


def test_a_failed_save_removes_only_what_it_wrote(tmp_path: Path) -> None:
    part, earlier = files.partial_dir(tmp_path, 10), files.iter_dir(tmp_path, 10)
    for directory in (part, earlier):
        directory.mkdir()
        (directory / "f").write_text("x")
    (tmp_path / files.TRACKER).write_text("15\n")
    files.discard_save(tmp_path, part)  # failed before the rename: an earlier run's iter_10 stays
    assert not part.exists() and earlier.is_dir()
    (tmp_path / f".{files.TRACKER}.tmp").write_text("10")
    files.discard_save(tmp_path, part, earlier)  # failed after the rename, before the tracker moved
    assert not earlier.exists() and not (tmp_path / f".{files.TRACKER}.tmp").exists()
    assert (tmp_path / files.TRACKER).read_text() == "15\n"
