"""Microbatches with Megatron's pretraining-sampler order (``MegatronPretrainingSampler``).

The global batch that starts at ``consumed_samples`` is read in rounds of ``micro_batch_size * dp_size``
consecutive samples, one round per microbatch; data-parallel rank ``r`` takes the ``r``-th slice of
``micro_batch_size`` samples in each round. Together the ranks read exactly the samples one rank would,
so runs with different ``dp_size`` and the same global batch train on the same data.
"""

from __future__ import annotations

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
