"""Resume modes (strict, override, use-checkpoint, finetune) and refusing bad checkpoints, end to end."""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anneal.checkpoint import files
from anneal.checkpoint.files import SaveDirLock
from anneal.checkpoint.safe_reader import read_metadata_file
from anneal.errors import ConfigError
from anneal_testing import metrics_by_iteration
from ckpt_helpers import BASE, error_line, run as _run

pytestmark = pytest.mark.slow


def _records(tmp: Path) -> dict[int, dict]:
    return metrics_by_iteration(tmp / "run")


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file() and p.name != ".lock"}


def _planned_lr(overrides: list[str], iteration: int) -> float:
    from anneal.config.compose import load
    from anneal.plot import planned

    derived = load([*BASE, *overrides]).validate()
    return planned(derived.schedule, derived.ramp, [iteration])[0][0]


def test_strict_mismatch_lists_the_fields_and_leaves_the_save_dir_alone(ck: Path, tmp_path: Path) -> None:
    before = _snapshot(ck)
    result = _run(tmp_path, "train.train_iters=20", "optimizer.lr=1e-3", f"checkpoint.save={ck}")
    assert result.returncode == 2
    assert "max_lr: config 0.001 vs checkpoint 0.003" in result.stderr
    assert _snapshot(ck) == before


def test_override_keeps_the_config_schedule(ck: Path, tmp_path: Path) -> None:
    new = ["train.train_iters=20", "optimizer.lr=1e-3", "scheduler.override_opt_param_scheduler=true"]
    result = _run(tmp_path, *new, f"checkpoint.save={ck}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(override mode)" in result.stdout
    assert _records(tmp_path)[11]["lr"] == _planned_lr(new, 11)


def test_use_checkpoint_takes_the_saved_schedule(ck: Path, tmp_path: Path) -> None:
    new = ["train.train_iters=20", "optimizer.lr=1e-3", "scheduler.use_checkpoint_opt_param_scheduler=true"]
    result = _run(tmp_path, *new, f"checkpoint.save={ck}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _records(tmp_path)[11]["lr"] == _planned_lr(["train.train_iters=20"], 11)  # the lr 3e-3 schedule


def test_finetune_loads_weights_only(ck: Path, tmp_path: Path) -> None:
    (tmp_path / "fresh").mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:  # the untrained reference and the finetune, at once
        fresh = pool.submit(_run, tmp_path / "fresh", "train.train_iters=4")
        result = pool.submit(_run, tmp_path, "train.train_iters=4", f"checkpoint.load={ck}",
                             "checkpoint.finetune=true").result()
    assert fresh.result().returncode == 0
    assert result.returncode == 0, result.stderr[-2000:]
    records = _records(tmp_path)
    assert sorted(records) == [1, 2, 3, 4]  # iteration and scheduler start from zero
    assert records[1]["lr"] == _records(tmp_path / "fresh")[1]["lr"]
    assert records[1]["loss"] < _records(tmp_path / "fresh")[1]["loss"] - 0.3  # trained weights


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_is_refused_naming_the_file(ck: Path, tmp_path: Path, damage: str) -> None:
    data = ck / "iter_0000010" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    data.write_bytes(bytes(raw))
    before = _snapshot(ck)
    result = _run(tmp_path, "train.train_iters=20", f"checkpoint.load={ck}")
    assert result.returncode == 2
    assert str(data) in result.stderr
    assert ("truncated" if damage == "truncate" else "checksum") in result.stderr
    assert f"the previous good checkpoint is iteration 5: checkpoint.load={ck / 'iter_0000005'}" in result.stderr
    assert _snapshot(ck) == before


def test_a_damaged_fallback_is_not_suggested(ck: Path, tmp_path: Path) -> None:
    for iteration in ("0000010", "0000005"):
        data = ck / f"iter_{iteration}" / "__0_0.distcp"
        data.write_bytes(data.read_bytes()[:100])
    result = _run(tmp_path, "train.train_iters=20", f"checkpoint.load={ck}")
    assert result.returncode == 2
    assert error_line(result).endswith(f"(truncated?); no earlier checkpoint in {ck} passes verification")


def test_foreign_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign" / "iter_0000003"
    foreign.mkdir(parents=True)
    (foreign / "model.pt").write_bytes(b"not ours")
    result = _run(tmp_path, "train.train_iters=20", f"checkpoint.load={foreign}")
    assert result.returncode == 2
    assert f"{foreign}: not an anneal checkpoint" in result.stderr


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_metadata_never_runs_pickled_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / ".metadata"
    evil.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ConfigError, match=r"\.metadata: not a valid checkpoint metadata file .*posix.system"):
        read_metadata_file(evil)
    assert not (tmp_path / "PWNED").exists()


def test_a_second_run_on_the_same_save_dir_is_refused(tmp_path: Path) -> None:
    lock = SaveDirLock(tmp_path / "ck")
    try:
        result = _run(tmp_path, "train.train_iters=4", f"checkpoint.save={tmp_path / 'ck'}")
    finally:
        lock.release()
    assert result.returncode == 2
    assert f"checkpoint.save ({tmp_path / 'ck'}) is in use by another run (pid {os.getpid()})" in result.stderr


def test_keeps_the_most_recent_k(tmp_path: Path) -> None:
    result = _run(tmp_path, "train.train_iters=12", f"checkpoint.save={tmp_path / 'ck'}",
                  "checkpoint.save_interval=3", "checkpoint.most_recent_k=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in files.completed(tmp_path / "ck")] == ["iter_0000009", "iter_0000012"]
