"""A profiling window (``profiling.``): ``torch.profiler`` and, on CUDA, the allocator's memory history.

As in Megatron, the steps count completed iterations: the window opens once ``profile_step_start``
iterations are done and closes once ``profile_step_end`` are, so it covers iterations
``profile_step_start + 1`` .. ``profile_step_end``. The trainer calls ``step(iteration)`` after each
iteration (an integer comparison; no host sync). Files go to ``<run dir>/profile``, tagged with the
window and the rank: ``trace_iters11-12_rank0.json`` (Chrome trace: chrome://tracing or
ui.perfetto.dev) and, on CUDA, ``memory_snapshot_iters11-12_rank0.pickle`` (pytorch.org/memory_viz).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from anneal.config.runtime import ProfilingConfig

log = logging.getLogger(__name__)

MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept; older ones are dropped


class ProfilerWindow:
    def __init__(self, cfg: ProfilingConfig, out_dir: Path, *, rank: int, device: torch.device,
                 iteration: int = 0) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.rank = rank
        self.device = device
        wanted = cfg.use_pytorch_profiler or cfg.record_memory_history
        self.enabled = wanted and (not cfg.profile_ranks or rank in cfg.profile_ranks)
        self._profiler: torch.profiler.profile | None = None
        self._recording_memory = False
        self.written: list[Path] = []  # every file written, for the caller and tests
        self.step(iteration)  # a window that opens where this (possibly resumed) run starts

    def step(self, iteration: int) -> None:
        """Called with the number of completed iterations; opens or closes the window on its edges."""
        if not self.enabled:
            return
        if iteration == self.cfg.profile_step_start:
            self._open()
        elif iteration == self.cfg.profile_step_end:
            self.close()

    def _open(self) -> None:
        if self.cfg.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities,
                                                    record_shapes=self.cfg.record_shapes)
            self._profiler.start()
        if self.cfg.record_memory_history and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES, device=self.device)
            self._recording_memory = True
        elif self.cfg.record_memory_history:
            log.info(f"profiling.record_memory_history needs CUDA; no memory snapshot on {self.device}")

    def close(self) -> None:
        """Stop an open window and write its files; also called at the end of the run (a window that
        reaches past the last iteration, or a run stopped inside it, still writes what it recorded)."""
        paths = []
        if self._profiler is not None:
            self._profiler.stop()
            path = self._path("trace", "json")
            self._profiler.export_chrome_trace(str(path))
            self._profiler = None
            paths.append(path)
        if self._recording_memory:
            path = self._path("memory_snapshot", "pickle")
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None, device=self.device)  # stop recording
            self._recording_memory = False
            paths.append(path)
        for path in paths:
            log.info(f"profile: {path}")
        self.written += paths

    def _path(self, kind: str, suffix: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        window = f"iters{self.cfg.profile_step_start + 1}-{self.cfg.profile_step_end}"
        return self.out_dir / f"{kind}_{window}_rank{self.rank}.{suffix}"
