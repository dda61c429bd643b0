"""Save and resume a run exactly: model, optimizer shards, scheduler, RNG of every rank, data position.

Tensors go through ``torch.distributed.checkpoint`` (DCP), so a checkpoint saved by N ranks loads
on M; everything else is JSON. Loading verifies the manifest first and reads DCP's metadata with a
restricted unpickler: a truncated, corrupted or foreign checkpoint is refused with the file named,
and a failed load writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from anneal.checkpoint import files
from anneal.checkpoint.safe_reader import SafeFileSystemReader
from anneal.config.runtime import CheckpointConfig
from anneal.errors import ConfigError
from anneal.faults import fault_iteration, kill_self
from anneal.training.distributed import DistContext
from anneal.training.trainer import TrainState

log = logging.getLogger(__name__)


def _quiet(fn, *args, **kwargs):
    """Call DCP without its per-call warning that a single process "assumes the intent" (it is the intent)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
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


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 ctx: DistContext, config_yaml: str, report: Any = print) -> None:
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ctx = ctx
        self.config_yaml = config_yaml
        self.report = report  # where rank 0 prints the resume table
        self.save_dir = Path(cfg.save) if cfg.save else None
        self._last_saved: int | None = None
        self._crash_in_save = fault_iteration("crash_in_save", ctx.rank)

    # -- saving ---------------------------------------------------------------------------------
    def maybe_save(self, state: TrainState, *, force: bool = False) -> None:
        if self.save_dir is None or self._last_saved == state.iteration or state.iteration == 0:
            return
        interval = self.cfg.save_interval
        if force or (interval and state.iteration % interval == 0):
            self.save(state)

    def save(self, state: TrainState) -> Path:
        save, it, main = self.save_dir, state.iteration, self.ctx.is_main
        part, final = files.partial_dir(save, it), files.iter_dir(save, it)
        if main:
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
        self._barrier()
        tensors, plain = split_tensors(self._state_dict())
        # Two writer threads; DCP fsyncs every file, so a checkpoint marked latest survives a node crash.
        _quiet(dcp.save, tensors, storage_writer=dcp.FileSystemWriter(str(part), thread_count=2))
        if self._crash_in_save == it:
            kill_self()  # test hook: die with the checkpoint half written
        if main:
            meta = {"train": asdict(state), "scheduler": self.scheduler.state_dict(), "plain": plain,
                    "param_group_bounds": _group_bounds(self.optimizer.param_groups),
                    "world_size": self.ctx.world_size}
            (part / files.STATE).write_text(json.dumps(meta, indent=1))
            (part / "config.yaml").write_text(self.config_yaml)
            files.write_manifest(part)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(part, final)
            files.write_atomic(save / files.TRACKER, f"{it}\n")
            if self.cfg.most_recent_k:
                files.prune(save, self.cfg.most_recent_k, final)
        self._barrier()
        self._last_saved = it
        log.info("saved checkpoint %s", final)
        return final

    def _state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": {f"rank_{self.ctx.rank}": _rng_state(self.ctx.device)}}

    # -- loading --------------------------------------------------------------------------------
    def find(self) -> Path | None:
        """The checkpoint to resume from: ``checkpoint.load``, else the save directory's latest."""
        if self.cfg.load:
            path = files.resolve_load(Path(self.cfg.load))
            if path is None:
                raise ConfigError(f"checkpoint.load ({self.cfg.load}) has no {files.TRACKER}: no checkpoint to load")
            return path
        if self.save_dir is not None and self.save_dir.is_dir():
            return files.latest(self.save_dir)
        return None

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
            self.report(f"finetune: loaded model weights from {path}; iteration, optimizer and scheduler start fresh")
            return TrainState()
        target: dict[str, Any] = {"model": self.model.state_dict()}
        optim_tensors, _ = split_tensors(self.optimizer.state_dict())
        if self.cfg.load_optim:
            target["optimizer"] = optim_tensors
        rng_key = f"rank_{self.ctx.rank}"
        load_rng = self.cfg.load_rng and f"rng.{rng_key}.cpu" in available
        if load_rng:
            target["rng"] = {rng_key: _rng_state(self.ctx.device)}
        self._load_tensors(target, reader, available, path)
        if self.cfg.load_optim:
            self.optimizer.load_state_dict(merge(target["optimizer"], meta["plain"].get("optimizer")))
        if load_rng:
            self._restore_rng(target["rng"][rng_key])
        # The restored optimizer state carries no param-group bounds; they follow the scheduler's own
        # rule below, so nothing overrides the scheduler's decision (Megatron's override bug).
        table = self.scheduler.load_state_dict(meta["scheduler"]).table()
        self._settle_group_bounds(meta.get("param_group_bounds"), path)
        self.scheduler.step(0)  # rewrite lr/wd with the settled bounds and the loaded wd settings
        state = TrainState(**meta["train"])
        self.report(f"resumed from {path} at iteration {state.iteration} ({state.consumed_samples} samples)"
                    f"{'' if self.cfg.load_optim else '; optimizer state not loaded'}"
                    f"{'' if load_rng else '; RNG state not loaded'}\n{table}")
        self._last_saved = state.iteration
        return state

    def _settle_group_bounds(self, saved: list[dict] | None, path: Path) -> None:
        """Per-group max_lr/min_lr follow the scheduler's mode, like the scheduler's own values.

        Megatron keeps whatever the param groups carry, so its override (or use-checkpoint) flag is
        silently ignored for them: the group bounds, not the scheduler's, decide the lr.
        """
        current = _group_bounds(self.optimizer.param_groups)
        if saved is None or saved == current or self.scheduler.mode == "override":
            return
        if len(saved) != len(current):
            raise ConfigError(f"{path}: has {len(saved)} param groups, this run {len(current)}")
        if self.scheduler.mode == "strict":
            diffs = [f"group {i}: config {c} vs checkpoint {s}" for i, (c, s) in enumerate(zip(current, saved))
                     if c != s]
            raise ConfigError(f"param-group lr bounds differ from the checkpoint's ({'; '.join(diffs)}). Set "
                              "scheduler.use_checkpoint_opt_param_scheduler=true or "
                              "scheduler.override_opt_param_scheduler=true")
        for group, bounds in zip(self.optimizer.param_groups, saved):
            group.update(bounds)

    def _verified(self, path: Path) -> dict:
        error = ""
        meta: dict = {}
        if self.ctx.is_main:
            try:
                meta = files.verify(path)
            except ConfigError as e:
                error = str(e)
        error = self._broadcast(error)
        if error:
            raise ConfigError(error)
        return meta if self.ctx.is_main else json.loads((path / files.STATE).read_text())

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

    def _barrier(self) -> None:
        if self.ctx.backend is not None:
            dist.barrier()

    def _broadcast(self, text: str) -> str:
        if self.ctx.backend is None:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _group_bounds(groups: list[dict]) -> list[dict[str, float]]:
    return [{k: float(g[k]) for k in ("max_lr", "min_lr") if k in g} for g in groups]


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        keys += _flat_keys(value, f"{name}.") if isinstance(value, dict) else [name]
    return keys
