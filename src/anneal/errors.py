"""The one error type anneal raises for bad user input."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
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
