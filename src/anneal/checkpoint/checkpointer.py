"""Save and resume a run exactly: model, optimizer shards, scheduler, RNG of every rank, data position.

Tensors go through ``torch.distributed.checkpoint`` (DCP), so a checkpoint saved by N ranks loads
on M; everything else is JSON. Loading verifies the manifest first and reads DCP's metadata with a
restricted unpickler: a truncated, corrupted or foreign checkpoint is refused with the file named and
the earlier checkpoint to fall back to, and a failed load writes nothing. A save writes nothing when
the state is not finite or the disk too small, and a failed save removes what it wrote (``guards``).

No rank reads the whole checkpoint for its checksums: a save's manifest is merged from each rank's
checksums of the files it wrote, and a load splits the files among the ranks by bytes.

With ``checkpoint.async_save`` the write and its completion run in the background (``background``); a
save is marked latest only once written and verified on every rank, and the fault hooks of a save
(``anneal.faults``) then fire on its background thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from anneal.checkpoint import files, guards
from anneal.checkpoint.background import SINGLE_PROCESS_WARNING, Background, Job
from anneal.checkpoint.safe_reader import SafeFileSystemReader
from anneal.config.runtime import CheckpointConfig
from anneal.context import DistContext, TrainState
from anneal.errors import ConfigError, RunError
from anneal.faults import fault_iteration, kill_self, no_space, pause
from anneal.scheduler.protocol import ParamScheduler

log = logging.getLogger(__name__)


def _quiet(fn, *args, **kwargs):
    """Call DCP without its per-call warning that a single process "assumes the intent" (it is the intent)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        return fn(*args, **kwargs)


def split_tensors(tree: Any) -> tuple[Any, Any]:
    """``(tensors, plain)``: the same nesting, tensors on one side and JSON-able values on the other."""
    if isinstance(tree, dict):
        tensors, plain = {}, {}
        for key, value in tree.items():
            t, p = split_tensors(value)
            if t is not None:
                tensors[key] = t
            if p is not None:
                plain[key] = p
        return tensors or None, plain or None
    return (tree, None) if isinstance(tree, torch.Tensor) else (None, tree)


def merge(tensors: Any, plain: Any) -> Any:
    if not isinstance(tensors, dict) and not isinstance(plain, dict):
        return tensors if tensors is not None else plain
    keys = list((tensors or {}).keys()) + [k for k in (plain or {}) if k not in (tensors or {})]
    return {k: merge((tensors or {}).get(k), (plain or {}).get(k)) for k in keys}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_parts(device_type: str, saved: set[str]) -> tuple[tuple[str, ...], str]:
    """Which of a checkpoint's RNG states (``saved``: "cpu", "cuda") load on ``device_type``, and what
    happens to the rest: a checkpoint written on one device resumes on the other (README: Checkpoints).

    Returns the parts to load and a note: "" when every generator this run uses is restored.
    """
    if device_type == "cuda" and "cuda" not in saved:
        return ("cpu",), "RNG: written without CUDA: CPU RNG restored, CUDA RNG reseeded from it"
    if device_type != "cuda" and "cuda" in saved:
        return ("cpu",), "RNG: CPU RNG restored; the checkpoint's CUDA RNG state is not used on this device"
    usable = ("cpu", "cuda") if device_type == "cuda" else ("cpu",)
    return tuple(part for part in usable if part in saved), ""


def _reseed_cuda(device: torch.device) -> None:
    """A CUDA seed derived from the restored CPU state: the same on every resume, no CPU draws consumed."""
    import hashlib

    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).digest()
    torch.cuda.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, *, model: torch.nn.Module, optimizer: Any, scheduler: ParamScheduler,
                 ctx: DistContext, config_yaml: str, report: Any = print, lineage: dict | None = None) -> None:
        self.cfg = cfg
        self.lineage = lineage  # anneal.resume's record of where this run comes from, saved in every checkpoint
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ctx = ctx
        self.config_yaml = config_yaml
        self.report = report  # where rank 0 prints the resume table
        self.save_dir = Path(cfg.save) if cfg.save else None
        self._last_saved: int | None = None
        self._background: Background | None = None  # built at the first save in the background
        self._in_flight: Job | None = None  # the save in the background, until ``wait`` collects it
        self.end_note = ""  # what ``finish`` waited for, for the final line
        self._crash_in_save = fault_iteration("crash_in_save", ctx.rank)
        self._pause_in_save = fault_iteration("pause_in_save", ctx.rank)
        self._enospc_in_save = fault_iteration("enospc_in_save", ctx.rank)
        self._nonfinite_in_save = fault_iteration("nonfinite_in_save", ctx.rank)

    # -- saving ---------------------------------------------------------------------------------
    def due(self, state: TrainState) -> bool:
        """Whether ``maybe_save`` would save at this iteration (without ``force``)."""
        interval = self.cfg.save_interval
        return (self.save_dir is not None and self._last_saved != state.iteration and state.iteration > 0
                and bool(interval) and state.iteration % interval == 0)

    def maybe_save(self, state: TrainState, *, force: bool = False) -> None:
        if self.save_dir is None or self._last_saved == state.iteration or state.iteration == 0:
            return
        if force or self.due(state):
            self.save(state)

    def latest(self) -> Path | None:
        """The newest complete checkpoint in the save directory (the tracker's), or None."""
        return files.latest_complete(self.save_dir)

    def save(self, state: TrainState) -> Path:
        """Write the checkpoint of ``state.iteration`` and mark it latest; prune only after that.

        Nothing is written (and nothing removed) when the state is not finite on some rank or the
        disk is too small; a save that fails midway leaves no partial directory. Both raise
        RunError on every rank, naming the checkpoint that is still the latest. With
        ``checkpoint.async_save`` this returns once the state is staged, after the previous save
        completed (``wait``); the write, its verification and the tracker follow in the background.
        """
        self.wait()  # at most one save in flight: the previous one completes (or raises) first
        it = state.iteration
        if self._nonfinite_in_save == it:
            _poison(self.model)  # test hook: a diverged rank
        tensors, plain = split_tensors(self._state_dict())
        self._check_finite(tensors, it)
        job = Job(it, files.partial_dir(self.save_dir, it), files.iter_dir(self.save_dir, it),
                  meta=self._meta(state, plain))
        self._settle(self._on_main(lambda: self._prepare(job.part, tensors, it), it), job.part)
        self._last_saved = it
        if self.cfg.async_save:
            self._in_flight = self._start_background(job, tensors)
            return job.final
        error = self._complete(job, lambda: self._write_tensors(tensors, job.part, it), group=None)
        if error:
            raise RunError(f"{error}; {guards.latest_phrase(self.save_dir)}")
        return job.final

    def wait(self) -> float | None:
        """Block until the save in flight is complete on every rank and latest; the seconds waited (None when
        no save was in flight). A failed save raises RunError here, on every rank (they agreed on it)."""
        job = self._in_flight
        if job is None:
            return None
        start = time.perf_counter()
        error = job.future.result()
        self._in_flight = None  # only now: a second Ctrl-C meanwhile abandons it (``abandon``)
        if error:
            raise RunError(f"{error}; {guards.latest_phrase(self.save_dir)}")
        return time.perf_counter() - start

    def finish(self, state: TrainState) -> None:
        """The run's last save, at the end or after a stop: the save in flight completes first (``end_note``
        says how long that took), then ``state`` is saved; both are latest before this returns."""
        in_flight = self._in_flight.iteration if self._in_flight is not None else None
        waited_s = self.wait()
        if in_flight is not None:
            self.end_note = f"waited {waited_s:.1f} s for the save of iteration {in_flight} in flight"
        self.maybe_save(state, force=True)
        self.wait()

    def abandon(self, *, wait: bool = True) -> str:
        """After an error (or a second Ctrl-C, ``wait=False``): the save in flight is never marked latest unless
        rank 0 already did; with ``wait``, its thread ends first (before the process group goes). Returns a
        line saying which, or "" when no save was in flight."""
        job = self._in_flight
        if job is None:
            return ""
        with job.lock:  # rank 0 either marked it latest already, or never will
            job.abandoned = True
        if not wait:
            return f"the save of iteration {job.iteration} in flight is abandoned (never marked latest)"
        self._in_flight = None
        if not job.future.result():
            return f"checkpoint: the save of iteration {job.iteration} in flight had completed: {job.final}"
        return (f"checkpoint: abandoned the save of iteration {job.iteration} in flight: never marked latest, its "
                f"partial directory removed; {guards.latest_phrase(self.save_dir)}")

    def _check_finite(self, tensors: Any, it: int) -> None:
        """Every rank checks its own state; one all_reduce agrees (this runs only at save steps)."""
        bad = guards.first_nonfinite(tensors)
        ranks = self._count(bad is not None)
        if ranks:
            where = bad if bad is not None else "on another rank"
            raise RunError(f"iteration {it}: non-finite values in the model or optimizer state ({where}; "
                           f"{ranks} rank(s)): nothing was saved and no checkpoint removed; "
                           f"{guards.resume_hint(self.save_dir)}")

    def _prepare(self, part: Path, tensors: Any, it: int) -> str:
        shutil.rmtree(part, ignore_errors=True)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        short = guards.space_shortfall(self.save_dir, guards.state_bytes(tensors))
        if short:
            return (f"no space left on device while saving iteration {it} to {self.save_dir} "
                    f"({short}; nothing written)")
        part.mkdir(parents=True)
        return ""

    def _start_background(self, job: Job, tensors: Any) -> Job:
        """Stage ``tensors`` and leave the write and its completion (``_complete``) to the background."""
        if self._background is None:
            self._background = Background(self.ctx)  # every rank saves at the same iteration: a collective
        # One writer thread, the save's own: a failed write (a full disk) raises there, into the future.
        writer = _OwnFilesWriter(str(job.part), thread_count=1)
        upload = self._background.write(tensors, writer)
        written = partial(self._written, upload, writer, job.part, job.iteration)
        complete = partial(self._complete, job, written, self._background.group)
        job.future = self._background.executor.submit(_attempt, complete, job.iteration, self.save_dir)
        return job

    def _complete(self, job: Job, write: Callable[[], list[str]], group: Any) -> str:
        """Every rank writes (``write`` returns the names of its files) and checksums its files; one all_gather
        agrees on errors and checksums; rank 0 marks the checkpoint latest; one broadcast agrees on that. Rank 0
        then prunes, or removes what a failed save wrote. Returns the error line of every rank ("" when saved).

        ``group``: the background's own (``Background.group``), or None: the default one, on the main thread.
        """
        sums: dict[str, dict] = {}
        error = _attempt(lambda: sums.update(files.checksums(job.part, write())), job.iteration, self.save_dir)
        gathered = self._all_gather((error, sums), group)
        error = next((e for e, _ in gathered if e), "")
        if self.ctx.is_main and not error:
            error = self._mark_latest(job, [part_sums for _, part_sums in gathered])
        error = self._broadcast(error, group)  # every rank has written; rank 0 has marked it latest, or not
        if self.ctx.is_main and error:
            files.discard_save(self.save_dir, job.part, job.final)
        elif self.ctx.is_main and self.cfg.most_recent_k:
            files.prune(self.save_dir, self.cfg.most_recent_k, job.final)
        if not error:
            log.info("saved checkpoint %s", job.final)
        return error

    def _write_tensors(self, tensors: Any, part: Path, it: int) -> list[str]:
        """Write this rank's tensors (in this thread); return the names of the files it wrote."""
        # Two writer threads; DCP fsyncs every file, so a checkpoint marked latest survives a node crash.
        writer = _OwnFilesWriter(str(part), thread_count=2)
        with guards.writer_thread_errors() as thread_errors:
            _quiet(dcp.save, tensors, storage_writer=writer)
        if thread_errors:
            raise thread_errors[0]
        self._fault_hooks(part, it)
        return writer.own_files(part)

    def _written(self, upload: Future, writer: _OwnFilesWriter, part: Path, it: int) -> list[str]:
        """On the background thread: wait for DCP's write of this rank's tensors; the names of its files."""
        upload.result()  # raises what the write raised
        self._fault_hooks(part, it)
        return writer.own_files(part)

    def _fault_hooks(self, part: Path, it: int) -> None:
        if self._crash_in_save == it:
            kill_self()  # test hook: die with the checkpoint half written
        if self._pause_in_save == it:
            pause()  # test hook: a slow save, to be interrupted
        if self._enospc_in_save == it:
            raise no_space(part)  # test hook: the disk fills up mid-save

    def _meta(self, state: TrainState, plain: Any) -> str:
        """``state.json``'s text, taken as the save starts."""
        meta = {"train": asdict(state), "scheduler": self.scheduler.state_dict(), "plain": plain,
                "world_size": self.ctx.world_size, "layout": self.ctx.parallel.describe(),
                "engine": files.engine_of(self.optimizer.backend), "optimizer_backend": self.optimizer.backend,
                "lineage": self.lineage}  # the param-group bounds are the scheduler's state, saved there
        return json.dumps(meta, indent=1)

    def _mark_latest(self, job: Job, parts: list[dict]) -> str:
        """Rank 0, once every rank wrote: unless abandoned, complete the checkpoint and move the tracker to it;
        the error line, or ""."""
        with job.lock:
            if job.abandoned:
                return f"the save of iteration {job.iteration} was abandoned"
            return _attempt(lambda: self._finish(job, parts), job.iteration, self.save_dir)

    def _finish(self, job: Job, parts: list[dict]) -> None:
        (job.part / files.STATE).write_text(job.meta)
        (job.part / "config.yaml").write_text(self.config_yaml)
        files.write_manifest(job.part, parts)  # rank 0 checksums only its JSON files here
        shutil.rmtree(job.final, ignore_errors=True)
        os.replace(job.part, job.final)
        files.write_atomic(self.save_dir / files.TRACKER, f"{job.iteration}\n")

    def _on_main(self, step, it: int) -> str:
        """Run ``step`` on rank 0; every rank gets its error line ("" when it succeeded)."""
        return self._broadcast(_attempt(step, it, self.save_dir) if self.ctx.is_main else "")

    def _settle(self, error: str, part: Path) -> None:
        """After a failed preparation: remove the partial directory, then raise on every rank."""
        if not error:
            return
        if self.ctx.is_main:
            files.discard_save(self.save_dir, part)
        raise RunError(f"{error}; {guards.latest_phrase(self.save_dir)}")

    def _state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": {f"rank_{self.ctx.rank}": _rng_state(self.ctx.device)}}

    # -- loading --------------------------------------------------------------------------------
    def find(self) -> Path | None:
        """The checkpoint to resume from (``files.find_checkpoint``); the save directory named as
        ``checkpoint.load`` with nothing in it yet is a fresh start, and says so."""
        load, save = self.cfg.load, self.cfg.save
        if load and files.resolve_load(Path(load)) is None and files.is_save_dir(load, save):
            self.report(f"checkpoint.load ({load}) is the save directory and holds no checkpoint yet: "
                        "starting a fresh run")
        return files.find_checkpoint(load, save)

    def load(self) -> TrainState:
        """Restore what the config asks for; a fresh run (nothing to load) starts at iteration 0."""
        path = self.find()
        if path is None:
            return TrainState()
        meta = self._verified(path)
        reader = SafeFileSystemReader(str(path))
        available = set(reader.read_metadata().state_dict_metadata)
        if self.cfg.finetune:
            self._load_tensors({"model": self.model.state_dict()}, reader, available, path)
            self.optimizer.reload_model_params()  # masters from the loaded weights, not the initial ones
            self.report(f"finetune: loaded model weights from {path}; iteration, optimizer and scheduler start fresh")
            return TrainState()
        target: dict[str, Any] = {"model": self.model.state_dict()}
        optim_tensors, _ = split_tensors(self.optimizer.state_dict())
        if self.cfg.load_optim:
            target["optimizer"] = optim_tensors
        rng_key = f"rank_{self.ctx.rank}"
        load_rng = self.cfg.load_rng and f"rng.{rng_key}.cpu" in available
        saved_rng = {part for part in ("cpu", "cuda") if f"rng.{rng_key}.{part}" in available}
        rng_load, rng_note = rng_parts(self.ctx.device.type, saved_rng)
        if load_rng:
            now = _rng_state(self.ctx.device)
            target["rng"] = {rng_key: {part: now[part] for part in rng_load}}
        if self.cfg.load_optim:
            self._check_optimizer_format(meta, _flat_keys({"optimizer": optim_tensors}), available, path)
        self._load_tensors(target, reader, available, path)
        if self.cfg.load_optim:
            self.optimizer.load_state_dict(merge(target["optimizer"], meta["plain"].get("optimizer")))
        else:
            self.optimizer.reload_model_params()  # masters from the loaded weights, not the initial ones
        if load_rng:
            self._restore_rng(target["rng"][rng_key])
            if rng_note and self.ctx.device.type == "cuda":
                _reseed_cuda(self.ctx.device)
        # The restored optimizer state carries no param-group bounds: they are the scheduler's state and
        # follow its rule, so nothing overrides its decision (Megatron's override bug).
        scheduler_state = files.saved_scheduler_state(meta)
        table = self.scheduler.load_state_dict(scheduler_state).table()
        self.scheduler.step(0)  # rewrite lr/wd with the settled bounds and the loaded wd settings
        state = TrainState(**meta["train"])
        self.report(f"resumed from {path} at iteration {state.iteration} ({state.consumed_samples} samples)"
                    f"{'' if self.cfg.load_optim else '; optimizer state not loaded'}"
                    f"{'' if load_rng else '; RNG state not loaded'}"
                    f"{f'; {rng_note}' if load_rng and rng_note else ''}\n{table}")
        self._last_saved = state.iteration
        return state

    def _verified(self, path: Path) -> dict:
        """``state.json`` once every file verifies; each rank checks about 1/N of the bytes, and a
        refusal (corrupted, truncated, tampered; naming the file and the fallback) is raised on every rank."""
        return guards.verified(path, guards.Share(self.ctx.rank, self.ctx.world_size, self._gathered))

    def _check_optimizer_format(self, meta: dict, wanted: list[str], available: set[str], path: Path) -> None:
        """The native flat state and FSDP2's per-parameter state do not load into each other: say so."""
        if all(k in available for k in wanted):
            return
        saved_backend = meta.get("optimizer_backend", "a native backend")
        saved_engine = meta.get("engine") or files.engine_of(saved_backend)  # older ones: by backend
        if saved_engine == files.engine_of(self.optimizer.backend):
            return  # the same engine: a different model, which _load_tensors names
        saved_layout = meta.get("layout", f"data parallel {meta.get('world_size', '?')} (native)")
        raise ConfigError(
            f"{path}: its optimizer state was saved by {saved_backend} ({saved_layout}) and does not load "
            f"into {self.optimizer.backend} ({self.ctx.parallel.describe()}): the native engine keeps one flat "
            "buffer, FSDP2 one tensor per parameter. Load the weights alone with checkpoint.load_optim=false "
            "(Adam's moments restart; the schedule continues), or resume on the layout it was saved on")

    def _load_tensors(self, target: dict, reader: SafeFileSystemReader, available: set[str], path: Path) -> None:
        flat = _flat_keys(target)
        missing = sorted(k for k in flat if k not in available)
        if missing:
            raise ConfigError(f"{path}: has no {missing[0]!r} ({len(missing)} missing): it was saved for a "
                              "different model or optimizer")
        try:
            _quiet(dcp.load, target, storage_reader=reader)
        except Exception as error:  # DCP wraps shape and size mismatches in its own exceptions
            raise ConfigError(f"{path}: cannot be loaded into this run: {str(error).splitlines()[0][:300]}") from error

    def _restore_rng(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.ctx.device)

    def _broadcast(self, text: str, group: Any = None) -> str:
        """Rank 0's ``text`` on every rank (``group``: None for the default one)."""
        if self.ctx.backend is None:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def _gathered(self, text: str) -> str:
        """The first non-empty ``text`` of any rank (all ranks get the same)."""
        return next((t for t in self._all_gather(text) if t), "")

    def _all_gather(self, obj: Any, group: Any = None) -> list[Any]:
        """Every rank's ``obj``, in rank order (``group``: None for the default one)."""
        if self.ctx.backend is None:
            return [obj]
        gathered: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, obj, group=group)
        return gathered

    def _count(self, flag: bool) -> int:
        """How many ranks raise ``flag`` (one all_reduce)."""
        if self.ctx.backend is None:
            return int(flag)
        total = torch.tensor([int(flag)], device=self.ctx.device)
        dist.all_reduce(total)
        return int(total.item())


class _OwnFilesWriter(dcp.FileSystemWriter):
    """DCP's writer, remembering which files this rank wrote: the data files named by the prefix the
    coordinator gave this rank's plan (``__N_``), and ``.metadata`` on the coordinator."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._prefix: str | None = None
        self._wrote_metadata = False

    def write_data(self, plan, planner):
        self._prefix = plan.storage_data.prefix
        return super().write_data(plan, planner)

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)
        self._wrote_metadata = True

    def own_files(self, directory: Path) -> list[str]:
        # By prefix, not by DCP's write results: a writer thread with nothing to write leaves an empty file.
        data = sorted(p.name for p in directory.glob(f"{self._prefix}*.distcp")) if self._prefix else []
        return data + ([files.DCP_METADATA] if self._wrote_metadata else [])


def _attempt(step, it: int, save: Path) -> str:
    """``step()``'s error line ("" on success); a full disk, or any other failure, becomes one line."""
    try:
        return step() or ""
    except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
        if guards.is_disk_full(error, save):
            return f"no space left on device while saving iteration {it} to {save}"
        first = (str(error).strip().splitlines() or [""])[0][:300]
        return f"saving iteration {it} to {save} failed ({type(error).__name__}: {first})"


def _poison(model: torch.nn.Module) -> None:
    with torch.no_grad():
        param = next(model.parameters())
        (param.to_local() if hasattr(param, "to_local") else param).view(-1)[0] = float("nan")


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        keys += _flat_keys(value, f"{name}.") if isinstance(value, dict) else [name]
    return keys
