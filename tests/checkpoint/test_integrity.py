"""Checksums that scale: each rank checksums the files it wrote, a load splits the files among the ranks,
and a damaged file is refused on every rank as before (README: Checkpoints and exact resume)."""

from __future__ import annotations

import json
import shutil
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from anneal.checkpoint import files
from anneal.errors import ConfigError

CHECKSUM_ERROR = "contents differ from the manifest's checksum (corrupted or tampered)"


def _write_old_manifest(directory: Path) -> None:
    """``manifest.json`` as anneal wrote it before each rank checksummed its own files (no "rank" entries)."""
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != files.MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "crc32": zlib.crc32(p.read_bytes())}
               for p in paths}
    manifest = {"format": "anneal-checkpoint-1", "files": entries}
    (directory / files.MANIFEST).write_text(json.dumps(manifest, indent=1))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- the merge and the split, on their own ----

def test_the_manifest_marks_each_entry_with_the_rank_that_checksummed_it(tmp_path: Path) -> None:
    written = {"__0_0.distcp": "zero", "__1_0.distcp": "one", ".metadata": "m", "state.json": "{}"}
    for name, text in written.items():
        (tmp_path / name).write_text(text)
    parts = [files.checksums(tmp_path, ["__0_0.distcp", ".metadata"]),  # rank 0's part
             files.checksums(tmp_path, ["__1_0.distcp"])]  # rank 1's
    files.write_manifest(tmp_path, parts)  # state.json, named by no part, is checksummed by this process
    entries = files.read_manifest(tmp_path)
    assert {name: entry["rank"] for name, entry in entries.items()} == {
        "__0_0.distcp": 0, "__1_0.distcp": 1, ".metadata": 0, "state.json": 0}
    assert entries["__1_0.distcp"] == {"bytes": 3, "crc32": zlib.crc32(b"one"), "rank": 1}
    files.verify(tmp_path)
    with pytest.raises(ValueError, match="__1_0.distcp was checksummed by rank 0 and by rank 1"):
        files.merge_parts([parts[1], parts[1]])


def test_the_load_split_gives_every_file_to_one_rank_with_about_equal_bytes() -> None:
    sizes = {"__0_0.distcp": 900, "__0_1.distcp": 700, "__1_0.distcp": 800, "__1_1.distcp": 600,
             ".metadata": 40, "state.json": 5, "config.yaml": 3}
    entries = {name: {"bytes": size, "crc32": 0} for name, size in sizes.items()}
    shares = files.split_by_bytes(entries, 2)
    assert sorted(sum(shares, [])) == sorted(sizes)  # each file once
    assert [sum(sizes[name] for name in share) for share in shares] == [1540, 1508]
    assert files.split_by_bytes(entries, 3) == files.split_by_bytes(dict(reversed(entries.items())), 3)
    assert files.split_by_bytes(entries, 9)[8] == []  # more ranks than files: some check nothing


# ---- two real gloo processes verifying one checkpoint ----

_TENSOR_BYTES = 8 << 20


def _synthetic_checkpoint(directory: Path) -> None:
    """DCP's ``.metadata`` and four 8 MiB data files, a ``state.json`` and a manifest in the old format."""
    import torch.distributed.checkpoint as dcp

    tensors = {f"w{i}": torch.full((_TENSOR_BYTES // 4,), float(i)) for i in range(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(directory), thread_count=4))
    (directory / files.STATE).write_text(json.dumps({"train": {"iteration": files.iteration_of(directory)}}))
    _write_old_manifest(directory)


def _bytes_read() -> int:
    """What this process has read through read() since it started (Linux's ``rchar``)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def _verify_on_two_ranks(rank: int, world_size: int, save: str) -> None:
    from anneal.checkpoint.checkpointer import Checkpointer
    from anneal.config.runtime import CheckpointConfig
    from anneal.context import DistContext

    ctx = DistContext(rank, world_size, rank, torch.device("cpu"), "gloo")
    checkpointer = Checkpointer(CheckpointConfig(), model=None, optimizer=None, scheduler=None, ctx=ctx,
                                config_yaml="")
    good, damaged = files.iter_dir(Path(save), 2), files.iter_dir(Path(save), 3)
    before = _bytes_read()
    assert checkpointer._verified(good) == {"train": {"iteration": 2}}
    read = _bytes_read() - before
    data = 4 * _TENSOR_BYTES
    assert 0.4 * data < read < 0.75 * data, f"rank {rank} read {read} bytes of a {data}-byte checkpoint"
    victim = damaged / files.split_by_bytes(files.read_manifest(damaged), world_size)[1][0]
    if rank == 0:
        _flip_byte(victim)  # a file rank 1 checks: rank 0 learns of it through the collective
    dist.barrier()
    with pytest.raises(ConfigError) as refused:
        checkpointer._verified(damaged)
    assert str(refused.value) == (f"{victim}: {CHECKSUM_ERROR}; the previous good checkpoint is iteration 2: "
                                  f"checkpoint.load={good}")


@pytest.mark.slow
def test_two_ranks_split_the_verification_and_both_refuse_a_file_rank_1_checked(tmp_path: Path) -> None:
    """A manifest in the old format (no "rank" entries) verifies; neither rank reads the whole checkpoint."""
    from optim.optim_helpers import run_distributed

    good = files.iter_dir(tmp_path, 2)
    _synthetic_checkpoint(good)
    assert files.verify(good) == {"train": {"iteration": 2}}  # one process still checks every file
    shutil.copytree(good, files.iter_dir(tmp_path, 3))
    run_distributed(_verify_on_two_ranks, 2, str(tmp_path))


# ---- the real entry point under torchrun, 2 ranks ----

RESUME = ("train.train_iters=6", "optimizer=distributed_fused_adam")


@pytest.fixture(scope="module")
def saved_by_two_ranks(tmp_path_factory) -> Path:
    """Iterations 2 and 4 of a 6-iteration run, saved by 2 ranks with the sharded optimizer (each rank
    writes its own optimizer state)."""
    from ckpt_helpers import run

    tmp = tmp_path_factory.mktemp("two_ranks")
    result = run(tmp, f"checkpoint.save={tmp / 'ck'}", "checkpoint.save_interval=2", *RESUME,
                 "train.exit_interval=4", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "ck"


@pytest.mark.slow
def test_each_rank_checksums_the_files_it_wrote(saved_by_two_ranks: Path) -> None:
    checkpoint = saved_by_two_ranks / "iter_0000004"
    entries = json.loads((checkpoint / files.MANIFEST).read_text())["files"]
    by_rank = {name: entry.get("rank") for name, entry in entries.items()}
    assert by_rank == {name: int(name[2]) if name.endswith(".distcp") else 0 for name in entries}
    assert {".metadata", "state.json", "config.yaml", "__0_0.distcp", "__1_0.distcp"} <= set(by_rank)
    assert by_rank.keys() == {p.name for p in checkpoint.iterdir()} - {files.MANIFEST}
    files.verify(checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("writer", [1, 0])
def test_a_flipped_byte_in_a_rank_s_file_is_refused_on_every_rank(saved_by_two_ranks: Path, tmp_path: Path,
                                                                    writer: int) -> None:
    from ckpt_helpers import run

    ck = tmp_path / "ck"
    shutil.copytree(saved_by_two_ranks, ck)
    checkpoint = ck / "iter_0000004"
    entries = json.loads((checkpoint / files.MANIFEST).read_text())["files"]
    # the largest data file that ``writer`` wrote and checksummed, by the manifest's record
    written = [checkpoint / name for name, entry in entries.items()
               if entry.get("rank") == writer and name.endswith(".distcp")]
    victim = max(written, key=lambda p: p.stat().st_size)
    _flip_byte(victim)
    result = run(tmp_path, f"checkpoint.save={ck}", *RESUME, nproc=2)
    assert result.returncode != 0
    refusal = (f"{victim}: {CHECKSUM_ERROR}; the previous good checkpoint is iteration 2: "
               f"checkpoint.load={ck / 'iter_0000002'}")
    for rank in ("", "[rank 1] "):
        assert f"anneal: error: {rank}{refusal}" in result.stderr, result.stderr[-3000:]
    assert (ck / files.TRACKER).read_text().strip() == "4"


@pytest.mark.slow
def test_a_checkpoint_with_the_old_manifest_resumes_on_two_ranks(saved_by_two_ranks: Path,
                                                                  tmp_path: Path) -> None:
    from ckpt_helpers import run

    ck = tmp_path / "ck"
    shutil.copytree(saved_by_two_ranks, ck)
    _write_old_manifest(ck / "iter_0000004")
    result = run(tmp_path, f"checkpoint.save={ck}", *RESUME, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {ck / 'iter_0000004'} at iteration 4" in result.stdout
    resaved = json.loads((ck / "iter_0000006" / files.MANIFEST).read_text())["files"]
    assert resaved["__1_0.distcp"]["rank"] == 1
