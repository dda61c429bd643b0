"""Weighted blends of datasets: which source, and which of its samples, blended sample ``n`` reads.

The samples are cut into blocks of ``block`` consecutive indices. The first ``n`` samples at a block
boundary hold exactly ``round(W_k n) - round(W_{k-1} n)`` samples of source ``k`` (``W`` the cumulative
weights), so every source stays within one sample of its weight there; inside a block the sources' samples
are shuffled by a generator seeded with (seed, split, phase, block). Source ``k``'s ``j``-th sample is
the ``j``-th it is asked for, and its own windows run into later epochs when ``j`` passes their count.

So a blended sample is a pure function of the seed and its index: the same on 1 and N data-parallel
ranks, after a resume and after resharding. Blocks are at least ``3 / min(weight)`` long so each block
gives every source a non-negative share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BLOCK = 1024
_SALT = 0x626C656E  # "blen"


class BlendIndex:
    """Maps blended sample indices to ``(source, source_sample)``; needs only the weights and a seed."""

    def __init__(self, weights: Sequence[float], *, seed: Sequence[int]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.all(w > 0):
            raise ValueError(f"weights ({list(weights)}) must be a non-empty list of positive numbers")
        self.weights = w / w.sum()
        self.cumulative = np.concatenate([[0.0], np.cumsum(self.weights)])
        self.cumulative[-1] = 1.0  # exact, so the quotas of n samples add up to n
        self.block = max(BLOCK, math.ceil(3 / self.weights.min()))
        self.seed = tuple(int(s) for s in seed)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.weights)

    def quota(self, n: int) -> np.ndarray:
        """Samples of each source among the first ``n`` when ``n`` is a block boundary."""
        return np.diff(np.floor(self.cumulative * n + 0.5).astype(np.int64))

    def counts_before(self, n: int) -> np.ndarray:
        """Samples of each source among blended samples ``[0, n)``, for any ``n``."""
        block, offset = divmod(int(n), self.block)
        counts = self.quota(block * self.block)
        if offset:
            counts = counts + np.bincount(self._block(block)[0][:offset], minlength=len(self))
        return counts

    def lookup(self, samples: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(source, source_sample)`` arrays for ``samples`` (non-negative blended indices)."""
        samples = np.asarray(samples, dtype=np.int64)
        if samples.size and samples.min() < 0:
            raise IndexError(f"sample indices must be >= 0 (got {samples.min()})")
        blocks, offsets = np.divmod(samples, self.block)
        sources, source_samples = np.empty_like(samples), np.empty_like(samples)
        for block in np.unique(blocks):
            mask = blocks == block
            block_sources, block_samples = self._block(int(block))
            sources[mask] = block_sources[offsets[mask]]
            source_samples[mask] = block_samples[offsets[mask]]
        return sources, source_samples

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Each position's source and source sample in ``block`` (the last two blocks are cached)."""
        if block not in self._blocks:
            if len(self._blocks) >= 2:
                self._blocks.pop(min(self._blocks))
            self._blocks[block] = self._build_block(block)
        return self._blocks[block]

    def _build_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.quota(block * self.block)
        share = self.quota((block + 1) * self.block) - start
        if share.min() < 0:  # cannot happen with block >= 3 / min(weight); refuse rather than repeat data
            raise RuntimeError(f"blend block {block} gives a source {share.min()} samples")
        rng = np.random.default_rng(np.random.SeedSequence([*self.seed, _SALT, block]))
        sources = rng.permutation(np.repeat(np.arange(len(self)), share))
        order = np.argsort(sources, kind="stable")
        rank = np.empty(self.block, dtype=np.int64)
        rank[order] = np.arange(self.block) - np.repeat(np.cumsum(share) - share, share)
        return sources, start[sources] + rank


class Blended:
    """Samples drawn from several sources (each with ``gather``) as ``index`` says."""

    def __init__(self, sources: Sequence, index: BlendIndex) -> None:
        if len(sources) != len(index):
            raise ValueError(f"{len(sources)} sources for a blend of {len(index)} weights")
        self.sources = list(sources)
        self.index = index
        self.seq_length = self.sources[0].seq_length

    def __len__(self) -> int:
        """Windows in one pass over every source (samples run past it into later epochs)."""
        return sum(len(source) for source in self.sources)

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.3g}" for w in self.index.weights)
        return f"Blended([{weights}] over {self.sources!r})"

    def gather(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        sources, source_samples = self.index.lookup(samples)
        batch = np.empty((len(sources), self.seq_length + 1), dtype=np.int64)
        for k in np.unique(sources):
            mask = sources == k
            batch[mask] = self.sources[int(k)].gather(source_samples[mask])
        return batch

    def __getitem__(self, sample: int) -> np.ndarray:
        return self.gather([sample])[0]


class Phased:
    """Samples ``[0, switch)`` from ``before``; sample ``n >= switch`` is ``after``'s ``n - switch``."""

    def __init__(self, before, after, switch: int) -> None:
        if before.seq_length != after.seq_length or switch < 0:
            raise ValueError(f"cannot switch at sample {switch} between different sequence lengths")
        self.before, self.after, self.switch = before, after, int(switch)
        self.seq_length = before.seq_length

    def __len__(self) -> int:
        return len(self.before)

    def __repr__(self) -> str:
        return f"Phased({self.before!r}, then from sample {self.switch} {self.after!r})"

    def gather(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.int64)
        late = samples >= self.switch
        batch = np.empty((len(samples), self.seq_length + 1), dtype=np.int64)
        if (~late).any():
            batch[~late] = self.before.gather(samples[~late])
        if late.any():
            batch[late] = self.after.gather(samples[late] - self.switch)
        return batch

    def __getitem__(self, sample: int) -> np.ndarray:
        return self.gather([sample])[0]


def anneal_start_sample(schedule) -> int | None:
    """Where ``Phased`` switches to the anneal blend: the first sample of the WSD anneal of Megatron's
    ``Schedule``; None for any other schedule."""
    if getattr(schedule, "lr_decay_style", None) != "WSD":
        return None
    return int(schedule.lr_decay_steps - schedule.wsd_decay_steps)
