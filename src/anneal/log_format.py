"""anneal's one line format, for Hydra's logging config and a Python caller; imports nothing heavy.

Hydra's logging config names ``anneal.log_format.LogFormatter``, and ``anneal.config.trust`` imports it
to check it before anything runs: this module must stay cheap to import (no torch), or every command,
a dry run included, would pay for torch before its first line.
"""

from __future__ import annotations

import logging
import sys


class LogFormatter(logging.Formatter):
    """anneal's one line format: ``[2026-01-31 12:00:00] message``; levels other than INFO are named."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        if record.levelno == logging.INFO:
            return line
        stamp, _, message = line.partition("] ")
        return f"{stamp}] {record.levelname}: {message}"


def console_logging() -> None:
    """Under Hydra, its job logging is already set up; a Python caller gets the same format on stdout."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def human(n: float) -> str:
    """1234567 -> '1.23M': a count of tokens or samples at a glance (the dry run, compare_runs)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.4g}"
