"""The save directory on disk: names, the tracker, the manifest, the lock.

``<save>/iter_0000010/`` holds one checkpoint: DCP's files for tensors, ``state.json`` for the
rest (iteration, consumed samples, scheduler, the resolved config) and ``manifest.json`` (size
and CRC32 of every file, and the rank that checksummed it), written last. A checkpoint is written
under ``.iter_0000010.partial`` and renamed when complete; only then does
``latest_checkpointed_iteration.txt`` (Megatron's name) move to it, by an atomic replace. A crash
mid-save leaves the previous checkpoint as the latest.

The checksums scale with the ranks: each rank checksums the files it wrote and rank 0 merges the
parts (``merge_parts``); a load splits the files among the ranks by bytes (``split_by_bytes``).
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from anneal.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
STATE = "state.json"
DCP_METADATA = ".metadata"
FORMAT = "anneal-checkpoint-1"  # entries without "rank" (older saves) read the same
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def iter_dir(save: Path, iteration: int) -> Path:
    return save / f"iter_{iteration:07d}"


def partial_dir(save: Path, iteration: int) -> Path:
    return save / f".iter_{iteration:07d}.partial"


def engine_of(backend: str) -> str:
    """The engine an optimizer backend belongs to: ``torch`` (FSDP2, per-parameter state) or ``native`` (flat)."""
    return "torch" if backend.startswith("fsdp2") else "native"


def saved_scheduler_state(meta: dict) -> dict:
    """The scheduler's state in a checkpoint's ``state.json``; checkpoints before 2026-12 kept the param-group
    bounds beside it, not in it."""
    return {"param_group_bounds": meta.get("param_group_bounds"), **meta["scheduler"]}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksums(directory: Path, names: Iterable[str]) -> dict[str, dict[str, int]]:
    """``{name: {"bytes": size, "crc32": crc}}`` of the files ``names`` of ``directory``."""
    return {name: {"bytes": (directory / name).stat().st_size, "crc32": _crc32(directory / name)}
            for name in sorted(names)}


def merge_parts(parts: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """One manifest's entries from every rank's ``checksums`` of the files it wrote (``parts[r]`` is rank
    r's), each marked with its rank. ValueError when two ranks claim the same file."""
    merged: dict[str, dict] = {}
    for rank, part in enumerate(parts):
        for name, entry in part.items():
            if name in merged:
                raise ValueError(f"{name} was checksummed by rank {merged[name]['rank']} and by rank {rank}")
            merged[name] = {**entry, "rank": rank}
    return merged


def write_manifest(directory: Path, parts: Sequence[dict[str, dict]] = ()) -> None:
    """Write ``manifest.json`` from the ranks' ``parts``; this process (rank 0) checksums every file
    no part names: its own JSON files, or all of them when there are no parts."""
    entries = merge_parts(parts)
    on_disk = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    rest = checksums(directory, on_disk - set(entries) - {MANIFEST})
    entries.update({name: {**entry, "rank": 0} for name, entry in rest.items()})
    manifest = {"format": FORMAT, "files": dict(sorted(entries.items()))}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's entries, each naming a file inside ``directory``; ConfigError otherwise."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{directory}: not an anneal checkpoint (no {MANIFEST}; incomplete or foreign)")
    try:
        entries = json.loads(manifest_path.read_text())["files"]
        sizes = {name: (entry["bytes"], entry["crc32"]) for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{manifest_path}: unreadable manifest ({error})") from error
    for name, (size, crc) in sizes.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConfigError(f"{manifest_path}: names {name!r}, a file outside the checkpoint (tampered)")
        if not (isinstance(size, int) and isinstance(crc, int)):
            raise ConfigError(f"{manifest_path}: unreadable manifest (entry {name!r})")
    return entries


def check_files(directory: Path, entries: dict[str, dict]) -> None:
    """Each file of ``entries`` has its size and CRC32; ConfigError names the first that does not."""
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            raise ConfigError(f"{path}: missing from the checkpoint")
        if path.stat().st_size != entry["bytes"]:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)")
        if _crc32(path) != entry["crc32"]:
            raise ConfigError(f"{path}: contents differ from the manifest's checksum (corrupted or tampered)")


def read_state(directory: Path) -> dict:
    try:
        state = json.loads((directory / STATE).read_text())
    except ValueError as error:
        raise ConfigError(f"{directory / STATE}: not valid JSON ({error})") from error
    if not isinstance(state, dict):
        raise ConfigError(f"{directory / STATE}: not a JSON object (tampered)")
    return state


def verify(directory: Path, only: set[str] | None = None) -> dict:
    """Check every file (or those in ``only``) against the manifest, in this process; return ``state.json``.

    ConfigError names the bad file.
    """
    entries = read_manifest(directory)
    check_files(directory, {name: e for name, e in entries.items() if only is None or name in only})
    return read_state(directory)


def split_by_bytes(entries: dict[str, dict], ways: int) -> list[list[str]]:
    """The files of ``entries`` in ``ways`` lists of about equal bytes, the same on every rank: largest
    file first, each to the list with the fewest bytes so far (ties: the lower index)."""
    lists: list[list[str]] = [[] for _ in range(ways)]
    lightest = [(0, index) for index in range(ways)]  # a heap of (bytes so far, list index)
    for name in sorted(entries, key=lambda n: (-entries[n]["bytes"], n)):
        size, index = heapq.heappop(lightest)
        lists[index].append(name)
        heapq.heappush(lightest, (size + entries[name]["bytes"], index))
    return lists


def latest(save: Path) -> Path | None:
    """The checkpoint the tracker points to, or None when there is none."""
    tracker = save / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{tracker}: holds {text!r}, not an iteration number")
    return iter_dir(save, int(text))


def iteration_of(path: Path) -> int | None:
    match = _ITER_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_save_dir(load: str, save: str | None) -> bool:
    """Whether ``checkpoint.load`` names the save directory itself (Megatron's ``--load X --save X``)."""
    return save is not None and Path(load).resolve() == Path(save).resolve()


def check_load_target(cfg) -> None:
    """Refuse, before anything is built, a ``checkpoint.load`` that holds no checkpoint to load.

    ``cfg`` is the ``checkpoint`` section. The save directory itself may be empty: that is a
    first run (``Checkpointer.find`` says so), as with Megatron's ``--load DIR --save DIR``.
    """
    if not cfg.load:
        return
    load = Path(cfg.load)
    if is_save_dir(cfg.load, cfg.save) and not (load / TRACKER).is_file():
        return
    if not load.exists():
        raise ConfigError(f"checkpoint.load ({cfg.load}) does not exist")
    target = resolve_load(load)
    if target is None:
        raise ConfigError(f"checkpoint.load ({cfg.load}) has no {TRACKER}: no checkpoint to load (to start "
                          "fresh and save there, set checkpoint.save to the same directory)")
    if not target.is_dir():
        raise ConfigError(f"checkpoint.load ({cfg.load}): {TRACKER} names {target.name}, "
                          "which does not exist")


def resolve_load(path: Path) -> Path | None:
    """``checkpoint.load`` may name a save directory (its latest) or one ``iter_*`` directory."""
    if _ITER_DIR.match(path.name):
        return path
    return latest(path)


def latest_complete(save: Path | None) -> Path | None:
    """The newest complete checkpoint in ``save`` (the tracker's, when its directory exists), or None; an
    unreadable tracker counts as none (for the lines that name what to resume from)."""
    try:
        found = latest(save) if save is not None and save.is_dir() else None
    except ConfigError:
        return None
    return found if found is not None and found.is_dir() else None


def find_checkpoint(load: str | None, save: str | None, *, prefer_own: bool = False) -> Path | None:
    """The one checkpoint lookup: what a run resumes from, or None for a fresh start.

    ``checkpoint.load`` (a save directory's latest, or one ``iter_*``), else the save directory's latest;
    with ``prefer_own`` (a branch restarted after its first save) the save directory's own latest first.
    A ``load`` with nothing in it falls back to the save directory (``check_load_target`` has already
    refused one that is not the save directory).
    """
    own = latest(Path(save)) if save and Path(save).is_dir() else None
    if prefer_own and own is not None:
        return own
    if load:
        path = resolve_load(Path(load))
        return path if path is not None else own
    return own


def completed(save: Path) -> list[Path]:
    dirs = [p for p in save.iterdir() if p.is_dir() and _ITER_DIR.match(p.name)] if save.is_dir() else []
    return sorted(dirs, key=lambda p: int(_ITER_DIR.match(p.name).group(1)))


def prune(save: Path, keep: int, current: Path) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (never ``current``)."""
    for old in completed(save)[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def discard_save(save: Path, part: Path, final: Path | None = None) -> None:
    """Remove what a failed save wrote: its partial directory, and ``final`` (the directory it was
    renamed to) unless the tracker already names it."""
    shutil.rmtree(part, ignore_errors=True)
    tracker = save / TRACKER
    latest_text = tracker.read_text().strip() if tracker.is_file() else ""
    if final is not None and final.is_dir() and latest_text != str(iteration_of(final)):
        shutil.rmtree(final, ignore_errors=True)
    tracker.with_name(f".{TRACKER}.tmp").unlink(missing_ok=True)


def remove_partials(save: Path) -> None:
    for p in save.glob(".iter_*.partial"):
        shutil.rmtree(p, ignore_errors=True)


class SaveDirLock:
    """An exclusive lock on a save directory for the life of the run (released when the process dies)."""

    def __init__(self, save: Path) -> None:
        save.mkdir(parents=True, exist_ok=True)
        self.path = save / ".lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise ConfigError(f"checkpoint.save ({save}) is in use by another run (pid {holder}); "
                              "give this run its own directory") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
