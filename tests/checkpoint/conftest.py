"""A saved checkpoint shared by the checkpoint tests (copied per test, so each may damage its own)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ckpt_helpers import run


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> Path:
    """A save directory with the checkpoints of iterations 5 and 10 of a 20-iteration cosine run (lr 3e-3)."""
    tmp = tmp_path_factory.mktemp("saved")
    result = run(tmp, "train.train_iters=20", "train.exit_interval=10", "checkpoint.save_interval=5",
                 f"checkpoint.save={tmp / 'ck'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "ck"


@pytest.fixture
def ck(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ck"
    shutil.copytree(saved, copy)
    return copy
