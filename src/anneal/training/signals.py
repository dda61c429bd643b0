"""SIGTERM and Ctrl-C: the first stops the run cleanly after the current iteration, with a save.

A second Ctrl-C aborts at once (no save, no traceback, exit code 130); the previous checkpoint
stays the latest. Under torchrun a terminal's Ctrl-C reaches each worker twice within
milliseconds (from the terminal and forwarded by the agent), so a repeat within
``REPEAT_WINDOW_S`` of the first counts as the same press.

Under torchrun the ranks act on a stop together: ``StopSchedule`` says at which iterations they agree
on it, about every ``AGREE_EVERY_S`` seconds, and every rank picks the same iterations without asking.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from anneal import exits

REPEAT_WINDOW_S = 1.0
AGREE_EVERY_S = 5.0  # under torchrun a stop is agreed (one tiny all-reduce) about this often
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class StopSignals:
    """A context manager: ``signum`` is the first stop signal received, or None."""

    def __init__(self, abort_line: Callable[[], str]) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._abort_line = abort_line  # what a second Ctrl-C prints before leaving
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in NAMES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return exits.STOP_CODES.get(self.signum, exits.OK) if self.signum else exits.OK

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, "a signal")

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if signum == signal.SIGINT and now - self._first_at > REPEAT_WINDOW_S:
            os.write(2, (exits.error_line(self._abort_line()) + "\n").encode())
            os._exit(exits.INTERRUPTED)  # not sys.exit: no traceback, no teardown that could hang


class StopSchedule:
    """The iterations at which the ranks agree on a stop: about one every ``interval_s`` seconds.

    The window (iterations from one agreement to the next) changes only at an agreement, from numbers that
    agreement made equal on every rank: the iterations since the previous one and the slowest rank's seconds
    over them. So every rank picks the same iterations, without communication. The window starts at one
    iteration (warm-up, compilation) and at most doubles at each agreement, up to what took ``interval_s``
    at the pace just measured. At a steady pace a stop is acted on within ``interval_s`` plus the iteration
    under way (with its evaluation or save); steps that turn k times slower stretch one window k times.
    """

    def __init__(self, interval_s: float = AGREE_EVERY_S, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock  # this rank's seconds; ranks' clocks need not agree
        self.start(iteration=0)

    def start(self, iteration: int) -> None:
        """The loop starts (or resumes) after ``iteration``: the first window is one iteration."""
        self.window = 1  # iterations from one agreement to the next
        self._since_iteration = iteration  # the iteration of the previous agreement (or of the loop's start)
        self._since = self._clock()  # and this rank's clock then

    def due(self, iteration: int) -> bool:
        """An integer comparison: no clock read, no communication."""
        return iteration - self._since_iteration >= self.window

    def elapsed_s(self) -> float:
        """This rank's seconds since the previous agreement, for the next one to take the slowest of."""
        return self._clock() - self._since

    def agreed(self, iteration: int, slowest_s: float) -> None:
        """The ranks agreed after ``iteration``, ``slowest_s`` seconds after the previous agreement on the
        slowest rank: the next window covers ``interval_s`` at that pace, at most twice this one."""
        iterations = iteration - self._since_iteration
        fits = int(self.interval_s * iterations / max(slowest_s, 1e-9))  # the same on every rank: same inputs
        self.window = max(1, min(2 * self.window, fits))
        self._since_iteration, self._since = iteration, self._clock()
