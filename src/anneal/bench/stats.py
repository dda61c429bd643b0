"""Timing helpers: medians after warm-up, with min and max, and ratios taken pair by pair."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float
    unit: str

    @classmethod
    def of(cls, values: list[float], unit: str) -> Stat:
        return cls(statistics.median(values), min(values), max(values), unit)

    def as_dict(self) -> dict:
        return asdict(self)


def interleaved(cases: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run the cases round-robin ``repeats`` times after ``warmup`` rounds; seconds per call.

    A case may return its own measurement as a float (a subprocess that times itself); any other
    return value is ignored and the call is timed here. Round-robin makes a drifting machine hit every case alike.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            own = fn()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - start)
    return times


def ratios(numerator: list[float], denominator: list[float]) -> Stat:
    """Pairwise ratios of runs taken side by side (round i of one over round i of the other)."""
    return Stat.of([a / b for a, b in zip(numerator, denominator)], "ratio")
