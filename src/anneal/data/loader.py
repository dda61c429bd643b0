"""Microbatches with Megatron's pretraining-sampler order (``MegatronPretrainingSampler``).

The global batch that starts at ``consumed_samples`` is read in rounds of ``micro_batch_size * dp_size``
consecutive samples, one round per microbatch; data-parallel rank ``r`` takes the ``r``-th slice of
``micro_batch_size`` samples in each round. Together the ranks read exactly the samples one rank would,
so runs with different ``dp_size`` and the same global batch train on the same data.

``Microbatches`` hands out one iteration's microbatches with the next one's copy already started: the same
code on every device, only the copy differs (``HostCopy`` on the CPU, ``CudaCopy`` on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch


class SampleSource(Protocol):
    """What the loader needs from a dataset (``TokenWindows`` is one)."""

    def gather(self, samples: np.ndarray) -> np.ndarray: ...


def microbatch_samples(*, consumed_samples: int, microbatch: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> np.ndarray:
    """The sample indices rank ``dp_rank`` reads for ``microbatch`` of the batch at ``consumed_samples``."""
    if micro_batch_size < 1 or dp_size < 1:
        raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
    if consumed_samples < 0 or microbatch < 0:
        raise ValueError(f"consumed_samples ({consumed_samples}) and microbatch ({microbatch}) must be >= 0")
    start = consumed_samples + (microbatch * dp_size + dp_rank) * micro_batch_size
    return np.arange(start, start + micro_batch_size, dtype=np.int64)


def get_microbatch(dataset: SampleSource, *, consumed_samples: int, microbatch: int, micro_batch_size: int,
                   dp_rank: int, dp_size: int) -> torch.Tensor:
    """``[micro_batch_size, seq_length + 1]`` int64 tokens: inputs are ``[:, :-1]``, labels ``[:, 1:]``."""
    samples = microbatch_samples(consumed_samples=consumed_samples, microbatch=microbatch,
                                 micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return torch.from_numpy(dataset.gather(samples))


class HostCopy:
    """CPU: the host tensor is the batch; nothing to copy and nothing to wait for."""

    def start(self, host: torch.Tensor) -> torch.Tensor:
        return host

    def ready(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class CudaCopy:
    """CUDA: pinned host memory, copied with ``non_blocking=True`` on a side stream, so that a copy overlaps
    the kernels the compute stream (the current stream when a batch is handed out) is running."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, host: torch.Tensor) -> torch.Tensor:
        # Page-locked, so the copy engine reads it directly and the host does not wait for it. The pinned
        # block may be dropped once the copy is queued: the caching host allocator records an event on the
        # copy's stream and reuses the block only after that event has passed.
        pinned = host.pin_memory()
        with torch.cuda.stream(self.stream):
            # The device block is allocated on the side stream and filled there, in stream order.
            return pinned.to(self.device, non_blocking=True)

    def ready(self, batch: torch.Tensor) -> torch.Tensor:
        compute = torch.cuda.current_stream(self.device)
        # Kernels queued on the compute stream from here on start after every copy queued so far on the
        # side stream, this batch's included; the next batch's copy is queued after this call.
        compute.wait_stream(self.stream)
        # The block belongs to the side stream's pool: when the batch is freed, the allocator must not hand
        # it to the next copy before the compute stream's queued kernels that read it have run.
        batch.record_stream(compute)
        return batch


def device_copy(device: torch.device) -> HostCopy | CudaCopy:
    """How microbatches reach ``device``: decided by the device's type alone (no CUDA call on the CPU)."""
    return CudaCopy(device) if device.type == "cuda" else HostCopy()


class Microbatches:
    """The ``num_microbatches`` microbatches of one iteration in order, on the device: as microbatch ``i`` is
    handed out, the read and copy of ``i + 1`` have already started. Nothing past the iteration is read, so
    what a stopped or checkpointed run has consumed is exactly its finished iterations' samples."""

    def __init__(self, dataset: SampleSource, copy: HostCopy | CudaCopy, *, consumed_samples: int,
                 num_microbatches: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
        self.dataset, self.copy = dataset, copy
        self.consumed_samples, self.num_microbatches = consumed_samples, num_microbatches
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self._host: list[torch.Tensor] | None = None  # read ahead by count()

    def count(self, counted: Callable[[torch.Tensor], int]) -> int:
        """The sum of ``counted`` over the iteration's host batches, read now and kept for the iteration
        (the per-token loss needs the iteration's token count before its first backward)."""
        if self._host is None:
            self._host = [self._read(micro) for micro in range(self.num_microbatches)]
        return sum(counted(host) for host in self._host)

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending = self._start(0) if self.num_microbatches else None
        for micro in range(self.num_microbatches):
            batch = self.copy.ready(pending)  # before the next copy is queued: wait for this one alone
            pending = self._start(micro + 1) if micro + 1 < self.num_microbatches else None
            yield batch

    def _start(self, microbatch: int) -> torch.Tensor:
        return self.copy.start(self._host[microbatch] if self._host is not None else self._read(microbatch))

    def _read(self, microbatch: int) -> torch.Tensor:
        return get_microbatch(self.dataset, consumed_samples=self.consumed_samples, microbatch=microbatch,
                              micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank,
                              dp_size=self.dp_size)
