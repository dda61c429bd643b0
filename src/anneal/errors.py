"""anneal's errors: ``ConfigError`` for bad user input (exit 2), ``RunError`` for a run that failed (exit 1).

Both are ``AnnealError``: their message is complete on its own, so the launcher prints it as one
line without the exception's type (see ``anneal.exits``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AnnealError(Exception):
    """An error whose message alone tells the user what failed (printed as one line)."""


class RunError(AnnealError, RuntimeError):
    """The run failed after it started (divergence, a full disk, a stalled rank): exit code 1.

    The message names what failed, the iteration when there is one, and what to do next
    (for example which checkpoint to resume from).
    """


class ConfigError(AnnealError, ValueError):
    """A configuration value breaks a rule.

    The message starts with the dotted path of the field (``scheduler.lr_warmup_iters``),
    then gives the value and the rule, so a user can fix the override without reading code.
    """


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate that a misspelled ``name`` most likely meant, or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_choice(path: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``; suggest the closest one."""
    if value in choices:
        return
    hint = closest(str(value), choices)
    suggestion = f"; did you mean {hint!r}?" if hint else ""
    raise ConfigError(f"{path} ({value!r}) must be one of {', '.join(map(repr, choices))}{suggestion}")
