"""Which config values the user set on the command line, and which are defaults from ``conf/``.

Hydra knows what the user typed: the overrides list. ``UserSet`` carries it to validation, so
an error that involves a default says so and names the override that changes it, and a field the
user set replaces a mutually exclusive default instead of colliding with it. The config itself is
never rewritten: the choice is returned (``in_force``) and shown by the dry run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from anneal.errors import ConfigError

# "section.field (value)" as every ConfigError message writes a field.
_FIELD = re.compile(r"\b([a-z_]+\.[A-Za-z_][\w.\[\]]*) \(([^()]*)\)")
# The value that unsets a field (warmup lengths count 0 as unset); null for the others.
_UNSET = {"lr_warmup_iters": "0", "lr_warmup_samples": "0"}


@dataclass(frozen=True)
class UserSet:
    """Dotted keys set on the command line; ``None`` (a Python caller): every value is the user's."""

    paths: frozenset[str] | None = None

    @classmethod
    def from_overrides(cls, overrides: Iterable[str]) -> UserSet:
        keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o or o.startswith("~"))
        return cls(frozenset(k for k in keys if "." in k and not k.startswith("hydra.")))

    def has(self, path: str) -> bool:
        if self.paths is None:
            return True
        parts = re.sub(r"\[\d+\]", "", path).split(".")  # dataset.data_path[3] is set by dataset.data_path
        return any(".".join(parts[:i]) in self.paths for i in range(2, len(parts) + 1))

    def label(self, path: str, value: object) -> str:
        """``path (value)``, or ``path (value, a default)`` when it was not set on the command line."""
        return f"{path} ({value})" if self.has(path) else f"{path} ({value}, a default)"

    def annotate(self, error: ConfigError) -> ConfigError:
        """``error`` with each default it names marked as one, and how to override it; else itself."""
        text, sections = str(error), _sections()
        defaults = [m for m in _FIELD.finditer(text) if m.group(1).split(".")[0] in sections
                    and not self.has(m.group(1)) and "default" not in m.group(2)]
        if not defaults:
            return error
        for match in reversed(defaults):
            text = f"{text[:match.end(2)]}, a default{text[match.end(2):]}"
        if "override" not in text:
            path = defaults[0].group(1)
            text += f" ({path} was not set on the command line: override it, e.g. {path}=...)"
        return ConfigError(text)


def _sections() -> set[str]:
    from dataclasses import fields

    from anneal.config.container import ConfigContainer

    return {f.name for f in fields(ConfigContainer)}


def in_force(section: str, used: Mapping[str, object],
             user_set: UserSet) -> tuple[str | None, tuple[str, ...]]:
    """Of mutually exclusive fields (those in use, name -> value): the one in force, and the ones set aside.

    One in use: it. Several: the one set on the command line replaces defaults from ``conf/``;
    none or several of them on the command line is an error that names the overrides that fix it.
    """
    names = list(used)
    if len(names) <= 1:
        return (names[0] if names else None), ()
    typed = [n for n in names if user_set.has(f"{section}.{n}")]
    if len(typed) == 1:
        return typed[0], tuple(n for n in names if n != typed[0])
    fields = " and ".join(user_set.label(f"{section}.{n}", used[n]) for n in names)
    pool = names if not typed else typed
    fix = " or ".join(f"{section}.{n}={_UNSET.get(n, 'null')}" for n in pool)
    both = "both" if len(pool) == 2 else "all"
    where = f" and {both} come from conf/" if not typed else f" and {both} are set on the command line"
    where = "" if user_set.paths is None else where
    raise ConfigError(f"{fields} are mutually exclusive{where}: unset one ({fix})")
