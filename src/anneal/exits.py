"""What a run's exit code means, and the one way a process reports a failure and leaves.

| code | meaning                                                                  | requeue? |
|------|--------------------------------------------------------------------------|----------|
| 0    | finished: ``train.train_iters`` reached (or nothing left to do)          | no       |
| 1    | failed: an error during the run (divergence, I/O, a stalled rank, ...)   | no       |
| 2    | bad configuration: refused before anything was built or changed          | no       |
| 130  | stopped by Ctrl-C (SIGINT) after saving a checkpoint                     | yes      |
| 143  | stopped by SIGTERM (preemption) after saving a checkpoint                | yes      |

Every failure prints one line, ``anneal: error: ...`` on stderr (with ``[rank N]`` on ranks > 0),
on every rank. torchrun turns any failed worker into its own exit code 1, so rank 0 also writes
the code to ``<run dir>/exit_code``; ``scripts/slurm_pretrain.sbatch`` requeues on 130 or 143. A process that joined a process group leaves with ``os._exit`` after the group is
destroyed (the gloo crash at interpreter exit, shared/PLATFORM.md), keeping the exit code.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

OK = 0
FAILED = 1
CONFIG = 2
INTERRUPTED = 128 + signal.SIGINT  # 130, as shells report Ctrl-C
TERMINATED = 128 + signal.SIGTERM  # 143

STOP_CODES = {signal.SIGINT: INTERRUPTED, signal.SIGTERM: TERMINATED}


def full_error_requested() -> bool:
    return os.environ.get("ANNEAL_FULL_ERROR") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def error_line(error: BaseException | str) -> str:
    """``anneal: error: <first line of the message>``, naming the rank when it is not rank 0."""
    text = str(error) if not isinstance(error, BaseException) else (str(error) or type(error).__name__)
    if isinstance(error, BaseException) and not _is_ours(error):
        text = f"{type(error).__name__}: {text}"
    rank = int(os.environ.get("RANK", "0"))
    where = f"[rank {rank}] " if rank else ""
    return f"anneal: error: {where}{text}"


def report(error: BaseException | str) -> None:
    """The one line on stderr, in one write: ranks sharing a pipe never interleave inside a line."""
    sys.stderr.write(error_line(error) + "\n")  # one write call (print makes two), flushed as one line
    sys.stderr.flush()


def record(code: int, run_dir: Path | None) -> int:
    """Write ``code`` to ``<run dir>/exit_code`` on rank 0 when that directory exists; return it."""
    if run_dir is not None and run_dir.is_dir() and int(os.environ.get("RANK", "0")) == 0:
        try:
            (run_dir / "exit_code").write_text(f"{code}\n")
        except OSError:  # a full or read-only disk must not hide the error being reported
            pass
    return code


def leave(code: int) -> None:
    """Exit with ``code``; after a process group, without running interpreter teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    from anneal.training import distributed

    if distributed.joined_a_group():
        os._exit(code)
    sys.exit(code)


def _is_ours(error: BaseException) -> bool:
    from anneal.errors import AnnealError

    return isinstance(error, AnnealError)
