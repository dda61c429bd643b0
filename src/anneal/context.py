"""What every layer of a run shares: where it is (``TrainState``) and where it runs (``DistContext``).

Both live below ``checkpoint/`` and ``training/``, which each use them: the checkpointer saves and
restores a ``TrainState`` over the ranks of a ``DistContext``; the trainer advances one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anneal.parallel import ParallelDims


@dataclass
class TrainState:
    """Where the run is; saved in checkpoints so a resumed run continues at the exact sample."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0
    wandb_run_id: str | None = None  # the W&B run this run logs to; a resume continues it


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group
    # The parallel layout (data-parallel rank, size, group); None: pure data parallel over every rank,
    # without a mesh (a context built by hand for a checkpointer or a benchmark).
    parallel: ParallelDims | None = None
    timeout_s: float | None = None  # dist.timeout_minutes: groups made later wait as long; None: torch's default

    def __post_init__(self) -> None:
        if self.parallel is None:
            object.__setattr__(self, "parallel", ParallelDims(self.world_size, self.rank, self.world_size,
                                                              self.rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0
