"""Fault injection for anneal's own tests of crash safety (read from the environment when asked).

``ANNEAL_FAULT=kill_at_iteration:N[:RANK]`` kills the process with SIGKILL as iteration N starts;
``ANNEAL_FAULT=crash_in_save:N`` kills it after the checkpoint of iteration N is half written.
Both fire only on a job's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), so a restart recovers.
"""

from __future__ import annotations

import os
import signal


def fault_iteration(kind: str, rank: int = 0) -> int | None:
    spec = os.environ.get("ANNEAL_FAULT", "")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or not spec.startswith(kind + ":"):
        return None
    parts = spec.split(":")
    if len(parts) > 2 and int(parts[2]) != rank:
        return None
    return int(parts[1])


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
