"""``scripts/pretrain.py --help``: how to call the launcher, the config groups, and every field explained.

Each field shows its value in the config composed with the given overrides (``--help recipe=qwen3_4b``
shows the recipe's values) and the comment beside it in its dataclass (``anneal.config.docs``).
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

USAGE = """usage: scripts/pretrain.py [KEY=VALUE ...] [GROUP=OPTION ...] [-m] [--cfg job] [--config-path DIR]

  KEY=VALUE        set a field: optimizer.lr=3e-4 train.train_iters=1000
  GROUP=OPTION     pick a config of a group: scheduler=wsd recipe=qwen3_4b
  dry_run=true     print the resolved config, derived schedule and plan; train nothing
  -m A=x,y B=...   sweep (Hydra multirun): one job per combination under multirun/; also choice(), range()
  --cfg job        print the composed config;  --hydra-help: Hydra's own flags and options
  --config-path DIR --config-name NAME   start from another primary config (a run's resolved YAML)
  ANNEAL_FULL_ERROR=1                    show the traceback of an error"""


def help_text(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> str:
    from anneal.config.compose import load

    cfg = load(overrides, config_name, config_dir)
    parts = [USAGE, "", "config groups (conf/):", *_groups(), "",
             "fields (value with these overrides; description):"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        parts += _section(f.name, value) if is_dataclass(value) else [_row(f.name, value, _doc(cfg, f.name))]
    return "\n".join(parts)


def _groups() -> list[str]:
    import anneal.conf

    root = Path(next(iter(anneal.conf.__path__)))
    rows = []
    for group in sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.yaml"))):
        rows.append(f"  {group.name + '=':<14}{', '.join(sorted(y.stem for y in group.glob('*.yaml')))}")
    return rows


def _section(path: str, obj) -> list[str]:
    from anneal.config.docs import field_docs, summary

    docs, lines = field_docs(type(obj)), [f"{path}.  {summary(type(obj))}".rstrip()]
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            lines += _section(f"{path}.{f.name}", value)
            continue
        shown = [_plain(v) for v in value] if isinstance(value, list) else value
        lines.append(_row(f"{path}.{f.name}", shown, docs.get(f.name, "")))
    return lines


def _plain(value):
    return {f.name: getattr(value, f.name) for f in fields(value)} if is_dataclass(value) else value


def _row(path: str, value, doc: str) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return f"  {path:<44} {text:<14} {doc}".rstrip()


def _doc(cfg, name: str) -> str:
    from anneal.config.docs import field_docs

    return field_docs(type(cfg)).get(name, "")
