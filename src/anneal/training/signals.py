"""SIGTERM and Ctrl-C: the first stops the run cleanly after the current iteration, with a save.

A second Ctrl-C aborts at once (no save, no traceback, exit code 130); the previous checkpoint
stays the latest. Under torchrun a terminal's Ctrl-C reaches each worker twice within
milliseconds (from the terminal and forwarded by the agent), so a repeat within
``REPEAT_WINDOW_S`` of the first counts as the same press.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from anneal import exits

REPEAT_WINDOW_S = 1.0
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
