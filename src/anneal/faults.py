"""Fault injection for anneal's own tests of crash safety (read from the environment when asked).

``ANNEAL_FAULT=kill_at_iteration:N[:RANK]`` kills the process with SIGKILL as iteration N starts;
``ANNEAL_FAULT=crash_in_save:N`` kills it after the checkpoint of iteration N is half written;
``ANNEAL_FAULT=stop_at_iteration:N[:RANK]`` freezes it with SIGSTOP as iteration N starts (a stalled
rank); ``ANNEAL_FAULT=pause_in_save:N`` sleeps ``PAUSE_S`` with the checkpoint of iteration N half
written (a slow save, to interrupt); ``ANNEAL_FAULT=enospc_in_save:N[:RANK]`` fails the save of
iteration N with ENOSPC after its tensors are written (a full disk); ``nonfinite_in_save:N[:RANK]``
puts a NaN in the model's weights just before the save of iteration N (a diverged rank).
Both fire only on a job's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), so a restart recovers.
"""

from __future__ import annotations

import errno
import os
import signal
import time

PAUSE_S = 4.0


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


def stop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def pause() -> None:
    time.sleep(PAUSE_S)


def no_space(path: object) -> OSError:
    """The error a write to a full disk raises."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
