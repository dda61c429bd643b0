"""What a save checks before it writes, and how a failed save or a refused load is explained.

A save refuses non-finite weights or optimizer state, and a disk too small for the checkpoint,
before writing anything; a save that fails anyway names the cause in one line and the checkpoint
that is still the latest. A refused (corrupted, truncated, tampered) checkpoint names the newest
earlier one that verifies, as the ``checkpoint.load=`` to resume from.

Under several ranks, verification is split: each rank checks its ``Share`` of the files (about 1/N of
the bytes) and one collective makes every rank raise the same error, or none.
"""

from __future__ import annotations

import errno
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anneal.checkpoint import files
from anneal.errors import ConfigError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_MARGIN = 1.05  # the estimate is the previous checkpoint's size (or the state's bytes), plus 5%
_METADATA_BYTES = 1 << 18  # DCP's .metadata, state.json, config.yaml, manifest.json of a small model


def flat_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` for every tensor of a nested dict; DTensors as their local shard."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flat_tensors(value, f"{prefix}{key}.")
    elif isinstance(tree, torch.Tensor):
        yield prefix[:-1], tree.to_local() if hasattr(tree, "to_local") else tree


def first_nonfinite(tensors: Any) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in flat_tensors(tensors):
        if tensor.is_floating_point() and tensor.numel():
            low, high = torch.aminmax(tensor)  # one pass, no copy; NaN and +-inf show in the extremes
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                return name
    return None


def state_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in flat_tensors(tensors))


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def space_shortfall(save: Path, local_state_bytes: int) -> str | None:
    """Why the next checkpoint cannot fit in ``save``'s file system, or None when it can (or may).

    The estimate is the latest checkpoint's size when there is one (the same model and optimizer
    write the same bytes), else this rank's state bytes.
    """
    previous = files.latest_complete(save)
    size = directory_bytes(previous) if previous is not None else local_state_bytes
    needed = int(size * _MARGIN) + _METADATA_BYTES
    free = shutil.disk_usage(save).free
    if free >= needed:
        return None
    return f"{_mib(free)} free, the checkpoint needs about {_mib(needed)}"


def is_disk_full(error: BaseException, directory: Path) -> bool:
    """Whether ``error`` (or what it wraps, DCP's per-rank failures included) is a full disk."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    try:  # torch's zip writer can lose the errno ("unexpected pos 704 vs 598")
        return shutil.disk_usage(directory).free < _METADATA_BYTES
    except OSError:
        return False


@contextmanager
def writer_thread_errors() -> Iterator[list[BaseException]]:
    """Collect, instead of printing, the errors of DCP's writer threads.

    DCP joins its writer threads without looking at how they ended: a thread that hits a full
    disk prints a traceback and the save carries on as if its files were written.
    """
    caught: list[BaseException] = []
    previous = threading.excepthook

    def hook(args) -> None:
        if args.thread is not None and "_write_files_from_queue" in args.thread.name:
            caught.append(args.exc_value)
        else:
            previous(args)

    threading.excepthook = hook
    try:
        yield caught
    finally:
        threading.excepthook = previous


def latest_phrase(save: Path) -> str:
    """``iteration M is the latest (DIR/iter_M)``, or that none was saved yet."""
    return _about_latest(save, lambda latest: f"iteration {files.iteration_of(latest)} is the latest ({latest})")


def resume_hint(save: Path) -> str:
    """What to resume from: ``checkpoint.load=DIR/iter_M`` of the latest checkpoint, if any."""
    return _about_latest(save, lambda latest: f"resume from the latest good checkpoint with checkpoint.load={latest}")


def _about_latest(save: Path, say: Callable[[Path], str]) -> str:
    latest = files.latest_complete(save)
    return f"no checkpoint has been saved in {save} yet" if latest is None else say(latest)


def _alone(error: str) -> str:
    return error


@dataclass(frozen=True)
class Share:
    """Which part of a checkpoint's verification this rank does, and how the ranks agree on the outcome.

    ``agree(error)`` takes this rank's error ("" when its files pass) and returns, on every rank, the
    first error of any rank (a collective); alone, it returns its argument.
    """

    rank: int = 0
    world_size: int = 1
    agree: Callable[[str], str] = _alone


ALONE = Share()


def verified(path: Path, share: Share = ALONE) -> dict:
    """``state.json`` of a checkpoint that passes every check (manifest, safe metadata); else ConfigError
    naming the bad file and the earlier checkpoint to fall back to, on every rank of ``share``."""
    return _checked(path, None, share)


def verified_state(path: Path) -> dict:
    """``state.json`` checked against the manifest (that file only: cheap on every rank), with the same
    error as ``verified``, which checks the rest before loading."""
    return _checked(path, {files.STATE}, ALONE)


def _checked(path: Path, only: set[str] | None, share: Share) -> dict:
    error = share.agree(_share_error(path, only, share))
    if error:
        raise ConfigError(f"{error}; {fallback_hint(path, share)}")
    return files.read_state(path)


def _share_error(path: Path, only: set[str] | None, share: Share) -> str:
    """This rank's part of the checks ("" when it passes, else the error naming the file): the size and
    CRC32 of its share of the files, DCP's ``.metadata`` parsed safely by the rank that checks it, and
    ``state.json`` (every rank reads it)."""
    try:
        entries = files.read_manifest(path)
        wanted = {name: entry for name, entry in entries.items() if only is None or name in only}
        shares = files.split_by_bytes(wanted, share.world_size)
        files.check_files(path, {name: wanted[name] for name in shares[share.rank]})
        metadata_rank = next((r for r, names in enumerate(shares) if files.DCP_METADATA in names), 0)
        if only is None and metadata_rank == share.rank:
            _read_metadata(path)
        files.read_state(path)
    except (ConfigError, OSError) as error:  # every rank must reach the collective in ``agree``
        return str(error)
    return ""


def _read_metadata(path: Path) -> None:
    """Parse DCP's ``.metadata`` safely; imported here, as ``torch.distributed.checkpoint`` pulls in DTensor and
    sympy (half a second) that a dry run reading only ``state.json`` has no use for."""
    from anneal.checkpoint.safe_reader import read_metadata_file

    read_metadata_file(path / files.DCP_METADATA)


def fallback_hint(refused: Path, share: Share = ALONE) -> str:
    """Names the newest checkpoint older than ``refused`` (in the same directory) that verifies."""
    good = good_fallback(refused, share)
    if good is None:
        return f"no earlier checkpoint in {refused.parent} passes verification"
    return f"the previous good checkpoint is iteration {files.iteration_of(good)}: checkpoint.load={good}"


def good_fallback(refused: Path, share: Share = ALONE) -> Path | None:
    """Each candidate is verified as ``verified`` does, split among the ranks of ``share``."""
    limit = files.iteration_of(refused)
    for candidate in reversed(files.completed(refused.parent)):
        if candidate == refused or (limit is not None and files.iteration_of(candidate) >= limit):
            continue
        if not share.agree(_share_error(candidate, None, share)):
            return candidate
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
