"""Process-group setup under torchrun (or none in a single process), and a clean exit.

Two gloo pitfalls measured on these machines (shared/PLATFORM.md) shape this module:
restarted workers must not read the previous attempt's addresses from the shared store, so the
store is prefixed by the restart count; and a worker can crash at interpreter exit after a
collective, so ``shutdown`` destroys the group and ``anneal.exits.leave`` then exits with
``os._exit``, keeping the run's exit code.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from anneal.config.runtime import DistributedConfig
from anneal.errors import ConfigError
from anneal.context import DistContext
from anneal.parallel import ParallelDims, with_mesh

_joined = False  # set once this process has joined a process group


def resolve_device(cfg: DistributedConfig, local_rank: int) -> torch.device:
    device = pick_device(cfg.device, local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def set_matmul_precision(tf32: bool, device: torch.device) -> str:
    """Let fp32 matmuls on CUDA use TF32 (``optimizer.tf32``); the precision in force, for the banner and MFU."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return torch.get_float32_matmul_precision()


def pick_device(setting: str, local_rank: int, gpus: int) -> torch.device:
    """The device of local rank ``local_rank`` for ``dist.device`` ``setting`` on a node with ``gpus`` GPUs."""
    if setting == "cpu" or (setting == "auto" and gpus == 0):
        return torch.device("cpu")
    if local_rank >= gpus:  # CUDA's own word for this is "invalid device ordinal"
        raise ConfigError(f"dist.device ({setting!r}) runs one process per GPU: local rank {local_rank} has none "
                          f"({gpus} visible); start at most {gpus} per node (--nproc-per-node) or set "
                          "dist.device=cpu")
    return torch.device("cuda", local_rank)


def job_store(timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, prefixed by the restart attempt so a restart never reads stale keys."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"anneal_attempt_{attempt}/", store)


def agree_on_run_dir(timeout_s: float = 300) -> str:
    """Rank 0's timestamped run directory, shared with every rank through torchrun's store."""
    store = job_store(datetime.timedelta(seconds=timeout_s))
    if int(os.environ.get("RANK", "0")) == 0:
        store.set("run_dir", datetime.datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S"))
    return store.get("run_dir").decode()


def init_distributed(cfg: DistributedConfig, layout: ParallelDims) -> DistContext:
    """Join the torchrun job of ``layout`` (``anneal.parallel.plan_layout``); a lone process gets no group."""
    world_size, rank = layout.world_size, layout.rank
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg, local_rank)
    if world_size == 1 and not layout.fsdp:
        return DistContext(0, 1, 0, device, None, layout)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
    # FSDP2 on one process still needs a (one-rank) group: its checkpoints then load on any layout.
    store = job_store(timeout) if world_size > 1 else dist.HashStore()
    global _joined
    _joined = True
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return DistContext(rank, world_size, local_rank, device, backend, with_mesh(layout, device.type),
                       timeout_s=timeout.total_seconds())


def joined_a_group() -> bool:
    """True once this process joined a process group: it must leave through ``os._exit``."""
    return _joined


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group (a no-op for a single process); the caller then leaves with its code."""
    if ctx.backend is None or not dist.is_initialized():
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def all_reduce_mean(value: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The mean of ``value`` over the data-parallel ranks (``value`` itself on one rank)."""
    if dims.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=dims.dp_group)
        value /= dims.dp_size
    return value
