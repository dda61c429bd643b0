"""One checkpoint lookup, and what a checkpoint records about itself (its engine; the param-group bounds
once, in the scheduler's state), with older checkpoints still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anneal.checkpoint import files
from anneal.context import TrainState
from checkpoint.test_rng_devices import _checkpointer


def _save_dir(root: Path, *iterations: int) -> Path:
    for it in iterations:
        files.iter_dir(root, it).mkdir(parents=True)
    if iterations:
        files.write_atomic(root / files.TRACKER, f"{iterations[-1]}\n")
    return root


@pytest.mark.parametrize(("load", "prefer_own", "expected"), [
    (None, False, "own/iter_0000004"),  # nothing to load: the save directory's latest
    ("parent", False, "parent/iter_0000006"),  # a directory: its latest
    ("parent/iter_0000002", False, "parent/iter_0000002"),  # one checkpoint, named
    ("parent", True, "own/iter_0000004"),  # a restarted branch continues its own
    ("empty", False, "own/iter_0000004"),  # load names nothing yet: the save directory's
])
def test_one_lookup_for_the_resume_plan_and_the_checkpointer(tmp_path: Path, load, prefer_own, expected) -> None:
    _save_dir(tmp_path / "own", 2, 4)
    _save_dir(tmp_path / "parent", 2, 6)
    _save_dir(tmp_path / "empty")
    found = files.find_checkpoint(str(tmp_path / load) if load else None, str(tmp_path / "own"),
                                  prefer_own=prefer_own)
    assert found == tmp_path / expected


def test_nothing_anywhere_is_a_fresh_start(tmp_path: Path) -> None:
    assert files.find_checkpoint(None, str(tmp_path / "new")) is None
    assert files.latest_complete(tmp_path / "new") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / files.TRACKER).write_text("garbage\n")
    assert files.latest_complete(tmp_path / "broken") is None  # the lines naming what to resume from say none


def test_a_checkpoint_records_its_engine_and_its_bounds_once(tmp_path: Path) -> None:
    _checkpointer(tmp_path / "ck", []).save(TrainState(iteration=1))
    meta = json.loads((files.iter_dir(tmp_path / "ck", 1) / files.STATE).read_text())
    assert meta["engine"] == "native" and meta["optimizer_backend"] == "torch-adamw-fused"
    assert "param_group_bounds" not in meta  # only in the scheduler's state
    assert [set(b) for b in meta["scheduler"]["param_group_bounds"]] == [{"max_lr", "min_lr"}] * 2


def test_an_older_checkpoint_with_bounds_beside_the_scheduler_still_loads(tmp_path: Path) -> None:
    _checkpointer(tmp_path / "ck", []).save(TrainState(iteration=1))
    directory = files.iter_dir(tmp_path / "ck", 1)
    meta = json.loads((directory / files.STATE).read_text())
    meta["param_group_bounds"] = meta["scheduler"].pop("param_group_bounds")  # as saved before 2026-12
    del meta["engine"]
    (directory / files.STATE).write_text(json.dumps(meta))
    files.write_manifest(directory)
    assert files.saved_scheduler_state(meta)["param_group_bounds"] == meta["param_group_bounds"]
    lines: list[str] = []
    assert _checkpointer(tmp_path / "ck", lines).load().iteration == 1
    assert lines[0].startswith(f"resumed from {directory} at iteration 1")
