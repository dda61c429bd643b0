"""Saves written in the background (``checkpoint.async_save``): what the loop waits for, and where.

The loop blocks while the state is staged: copied off the live tensors by DCP's ``DefaultStager`` into
buffers kept from one save to the next (pinned on CUDA). ``dcp.async_save`` then writes on a thread of its
own, and the thread of ``Background.executor`` completes the save as a synchronous one is completed: each
rank checksums its files, one all_gather agrees on errors and checksums, rank 0 writes the manifest, renames
the directory and moves the tracker, one broadcast agrees on the outcome. Only then is the save latest.

Those collectives, and the ones DCP itself runs in torch 2.13's ``async_save`` (the whole ``dcp.save``,
planning included, runs on its thread), use a gloo group of their own, created once: collectives issued
from two threads on one group may pair up in a different order on each rank. The loop keeps the default
group, and never waits on the background except at the next save (at most one in flight), at the end or
after a stop: every rank's future then holds the same outcome, so no per-iteration collective is needed.
"""

from __future__ import annotations

import datetime
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from anneal.context import DistContext

# DCP's warning at every save without a process group; a single process is the intent.
SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@dataclass
class Job:
    """One save, from its partial directory to the tracker (``future``: when written in the background)."""

    iteration: int
    part: Path  # written here, renamed to ``final`` once complete
    final: Path
    meta: str  # state.json's text, taken when the save started: the loop moves on before it is written
    future: Future | None = None  # the error line every rank agrees on ("" once complete and latest)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while rank 0 marks it latest
    abandoned: bool = False  # set under ``lock``: rank 0 will not mark it latest


class Background:
    """What a run's background saves share, built at the first one (on every rank at the same iteration)."""

    def __init__(self, ctx: DistContext) -> None:
        # A group of the ranks' background threads only; gloo, as DCP's async path requires a CPU backend.
        timeout = datetime.timedelta(seconds=ctx.timeout_s) if ctx.timeout_s else None  # dist.timeout_minutes
        self.group = dist.new_group(backend="gloo", timeout=timeout) if ctx.backend is not None else None
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=ctx.device.type == "cuda",
                                                   use_shared_memory=False, use_async_staging=False,
                                                   use_non_blocking_copy=False))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anneal-save")
        if self.group is None:  # DCP warns on its own thread, out of reach of a local catch_warnings
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)

    def write(self, tensors: Any, writer: dcp.FileSystemWriter) -> Future:
        """Stage ``tensors`` (this blocks) and start DCP's write; the future is done once this rank wrote."""
        return dcp.async_save(tensors, storage_writer=writer, process_group=self.group,
                              async_stager=self.stager, no_dist=self.group is None)
