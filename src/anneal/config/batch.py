"""Global batch size over the run, with Megatron's ``rampup_batch_size`` rule, in exact samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class BatchRamp:
    """The global batch size as a function of consumed samples.

    Megatron's rule: the batch grows from ``start`` by ``increment`` every
    ``ramp_samples / num_increments`` samples and is ``global_batch_size`` once more than
    ``ramp_samples`` samples are consumed. Without a ramp (``start`` None) it is constant.
    """

    global_batch_size: int
    start: int | None = None
    increment: int = 1
    ramp_samples: int = 0

    def batch_size_at(self, consumed_samples: int) -> int:
        gbs = self.global_batch_size
        if self.start is None or consumed_samples > self.ramp_samples or self.ramp_samples == 0:
            return gbs
        num_increments = (gbs - self.start) // self.increment
        if num_increments == 0:
            return gbs
        steps = int(consumed_samples / (self.ramp_samples / num_increments))
        return min(self.start + steps * self.increment, gbs)

    @cached_property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """(first consumed sample, batch size, iterations) for each ramp level, in order."""
        segments, consumed = [], 0
        while (batch := self.batch_size_at(consumed)) < self.global_batch_size:
            hi = 1  # the smallest n with a different batch after n iterations lies in (hi/2, hi]
            while self.batch_size_at(consumed + hi * batch) == batch:
                hi *= 2
            lo = hi // 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.batch_size_at(consumed + mid * batch) == batch else (lo, mid)
            segments.append((consumed, batch, hi))
            consumed += hi * batch
        return tuple(segments)

    def samples_after(self, iterations: int) -> int:
        """Samples consumed by the first ``iterations`` iterations."""
        consumed = 0
        for start, batch, count in self.segments:
            if iterations <= count:
                return start + iterations * batch
            iterations -= count
            consumed = start + count * batch
        return consumed + iterations * self.global_batch_size

    def iterations_for(self, samples: int) -> int:
        """The fewest iterations that consume at least ``samples`` samples."""
        done = 0
        for start, batch, count in self.segments:
            if samples <= start + count * batch:
                return done + max(0, math.ceil((samples - start) / batch))
            done += count
        ramp_end = self.samples_after(done)
        return done + max(0, math.ceil((samples - ramp_end) / self.global_batch_size))

    def whole_iterations(self, samples: int) -> int:
        """The most iterations that consume at most ``samples`` samples (Megatron's floor)."""
        iterations = self.iterations_for(samples)
        return iterations if self.samples_after(iterations) <= samples else iterations - 1
