#!/usr/bin/env python
"""Generate conf/recipe/<name>.yaml from the Python recipes (``anneal.recipes.RECIPES``), their source.

Each overlay selects the shipped group option closest to the recipe's section (``override /model:
qwen3_4b``) and sets only the values that differ from what that composes to, so
``recipe=<name>`` composes to a config equal to ``<name>()``; tests check both.

    python scripts/export_recipes.py           # rewrite conf/recipe/*.yaml
    python scripts/export_recipes.py --check   # exit 1 when a committed overlay is not a fresh export
"""

from __future__ import annotations

import functools
import sys
import textwrap
from importlib.resources import files
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parents[1] / "conf" / "recipe"
HEADER = ("# @package _global_\n"
          "# Generated from anneal.recipes.{name}() by scripts/export_recipes.py; do not edit.\n")


def main(argv: list[str] | None = None) -> int:
    from anneal.recipes import RECIPES

    check = "--check" in (sys.argv[1:] if argv is None else argv)
    fresh = {f"{name}.yaml": render(name, fn(), summary(fn)) for name, fn in RECIPES.items()}
    stale = [n for n, text in fresh.items() if _read(RECIPE_DIR / n) != text]
    orphans = sorted(p.name for p in RECIPE_DIR.glob("*.yaml") if p.name not in fresh)
    if check and (stale or orphans):
        print(f"out of date: {', '.join(stale + orphans)}; run scripts/export_recipes.py"
              + (" and delete the overlays without a recipe" if orphans else ""), file=sys.stderr)
        return 1
    for name in [] if check else stale:
        RECIPE_DIR.mkdir(parents=True, exist_ok=True)
        (RECIPE_DIR / name).write_text(fresh[name])
    print(f"up to date: {len(fresh)} recipes" if check else f"wrote: {', '.join(stale) or 'nothing'}")
    if orphans:
        print(f"no recipe behind {', '.join(orphans)}: delete it", file=sys.stderr)
    return 0


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def summary(fn) -> str:
    """The first paragraph of the recipe's docstring, as YAML comment lines."""
    first = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
    return "".join(f"# {line}\n" for line in textwrap.wrap(first, width=100))


def render(name: str, recipe, comment: str = "") -> str:
    """The overlay YAML that composes (on top of conf/config.yaml) to exactly ``recipe``."""
    from omegaconf import OmegaConf

    from anneal.config.compose import load, to_dict

    choices = {group: closest_option(group, getattr(recipe, group)) for group in root_defaults()}
    base = flatten(to_dict(load([f"{g}={c}" for g, c in choices.items()])))
    changed = {key: value for key, value in flatten(to_dict(recipe)).items() if base.get(key) != value}
    overrides = [{f"override /{g}": c} for g, c in choices.items() if c != root_defaults()[g]]
    body = OmegaConf.to_yaml(OmegaConf.create(nest(changed))) if changed else ""
    defaults = OmegaConf.to_yaml(OmegaConf.create({"defaults": overrides})) if overrides else ""
    return HEADER.format(name=name) + comment + defaults + ("\n" if defaults and body else "") + body


@functools.cache
def root_defaults() -> dict[str, str]:
    """The group options conf/config.yaml selects, in its order (``recipe`` and Hydra's own left out)."""
    from omegaconf import OmegaConf

    entries = OmegaConf.load(files("anneal.conf") / "config.yaml").defaults
    pairs = [next(iter(e.items())) for e in entries if not isinstance(e, str)]
    return {group: option for group, option in pairs
            if option is not None and "recipe" not in group and not group.startswith("override ")}


@functools.cache
def shipped_options(group: str) -> dict[str, dict]:
    """Each conf/<group>/<option>.yaml, instantiated and flattened, by option name."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from anneal.config.compose import to_dict

    paths = sorted(p for p in files("anneal.conf").joinpath(group).iterdir() if p.name.endswith(".yaml"))
    return {p.name[:-5]: flatten(to_dict(instantiate(OmegaConf.load(p), _convert_="all"))) for p in paths}


def closest_option(group: str, section) -> str:
    """The shipped option of ``group`` with the fewest fields differing from ``section``."""
    from anneal.config.compose import to_dict

    wanted = flatten(to_dict(section))
    scores = {name: sum(option.get(k) != v for k, v in wanted.items())
              for name, option in shipped_options(group).items()}
    default = root_defaults()[group]
    return min(scores, key=lambda name: (scores[name], name != default, name))


def flatten(node, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


if __name__ == "__main__":
    sys.exit(main())
