"""``checkpoint.async_save`` in one process: what a save in the background writes, and when it becomes latest.

The save's fault hook ``pause_in_save`` holds the background write here until the test releases it.
The end-to-end runs (1 and 2 ranks, signals, SIGKILL) are in tests/training/test_async_save_e2e.py.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest
import torch

from anneal.checkpoint import checkpointer as checkpointer_module
from anneal.checkpoint import files
from anneal.checkpoint.checkpointer import Checkpointer
from anneal.config.runtime import CheckpointConfig
from anneal.context import DistContext, TrainState
from anneal.errors import RunError


class _Stub:
    """The optimizer and scheduler parts a checkpoint records, holding no state."""

    backend = "none"

    def state_dict(self) -> dict:
        return {}


def _model() -> torch.nn.Module:
    model = torch.nn.Module()
    model.register_buffer("w", torch.arange(1000, dtype=torch.float32))
    return model


@pytest.fixture
def gate(monkeypatch) -> threading.Event:
    """Set it to let the paused background write (``pause_in_save``) go on (by itself after 10 s)."""
    event = threading.Event()
    monkeypatch.setattr(checkpointer_module, "pause", lambda: event.wait(10))
    return event


def _checkpointer(save: Path, model: torch.nn.Module, monkeypatch, fault: str | None = None,
                  async_save: bool = True) -> Checkpointer:
    if fault:
        monkeypatch.setenv("ANNEAL_FAULT", fault)
    cfg = CheckpointConfig(save=str(save), async_save=async_save, most_recent_k=1)
    return Checkpointer(cfg, model=model, optimizer=_Stub(), scheduler=_Stub(),
                        ctx=DistContext(0, 1, 0, torch.device("cpu"), None), config_yaml="", report=lambda _: None)


def _saved_weights(path: Path) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    target = {"model": {"w": torch.zeros(1000)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)))
    return target["model"]["w"]


def test_the_save_returns_while_it_writes_and_is_latest_only_once_complete(tmp_path, gate, monkeypatch) -> None:
    model = _model()
    ck = _checkpointer(tmp_path / "ck", model, monkeypatch, fault="pause_in_save:2")
    ck.save(TrainState(iteration=1))
    ck.save(TrainState(iteration=2))  # returns with its write held by the gate
    model.w.add_(1.0)  # the loop moves on: the save in flight must not see it
    assert ck.latest() == files.iter_dir(tmp_path / "ck", 1)
    assert files.partial_dir(tmp_path / "ck", 2).is_dir()
    gate.set()
    assert ck.wait() is not None
    latest = files.iter_dir(tmp_path / "ck", 2)
    assert ck.latest() == latest and files.verify(latest)["train"]["iteration"] == 2
    assert torch.equal(_saved_weights(latest), torch.arange(1000, dtype=torch.float32))  # the staged copy
    assert [p.name for p in files.completed(tmp_path / "ck")] == ["iter_0000002"]  # pruned once complete


def test_an_abandoned_save_is_never_marked_latest(tmp_path, gate, monkeypatch) -> None:
    ck = _checkpointer(tmp_path / "ck", _model(), monkeypatch, fault="pause_in_save:2")
    ck.save(TrainState(iteration=1))
    ck.save(TrainState(iteration=2))
    threading.Timer(0.2, gate.set).start()  # the write ends after the abandonment
    line = ck.abandon()
    assert line.startswith("checkpoint: abandoned the save of iteration 2 in flight: never marked latest")
    assert ck.latest() == files.iter_dir(tmp_path / "ck", 1)
    assert not list((tmp_path / "ck").glob(".iter_*")) and ck.abandon() == ""


def test_a_failed_background_write_stops_the_run_at_the_next_save(tmp_path, monkeypatch) -> None:
    ck = _checkpointer(tmp_path / "ck", _model(), monkeypatch, fault="enospc_in_save:2")
    ck.save(TrainState(iteration=1))
    ck.save(TrainState(iteration=2))  # fails in the background
    with pytest.raises(RunError) as stopped:
        ck.save(TrainState(iteration=3))
    assert str(stopped.value) == (f"no space left on device while saving iteration 2 to {tmp_path / 'ck'}; "
                                  f"iteration 1 is the latest ({files.iter_dir(tmp_path / 'ck', 1)})")
    assert not list((tmp_path / "ck").glob(".iter_*"))


@pytest.mark.parametrize("async_save", [False, True])
def test_sync_and_async_saves_write_the_same_checkpoint(tmp_path, monkeypatch, async_save: bool) -> None:
    ck = _checkpointer(tmp_path / "ck", _model(), monkeypatch, async_save=async_save)
    ck.finish(TrainState(iteration=4, consumed_samples=32))
    latest = files.iter_dir(tmp_path / "ck", 4)
    assert ck.latest() == latest and files.verify(latest)["train"]["consumed_samples"] == 32
    assert torch.equal(_saved_weights(latest), torch.arange(1000, dtype=torch.float32))


def test_nonfinite_state_is_refused_before_it_is_staged(tmp_path, monkeypatch) -> None:
    ck = _checkpointer(tmp_path / "ck", torch.nn.Linear(4, 4), monkeypatch, fault="nonfinite_in_save:2")
    ck.save(TrainState(iteration=1))
    with pytest.raises(RunError, match=r"^iteration 2: non-finite values in the model or optimizer state"):
        ck.save(TrainState(iteration=2))  # the save of iteration 1 completes first
    assert ck.latest() == files.iter_dir(tmp_path / "ck", 1) and not list((tmp_path / "ck").glob(".iter_*"))
