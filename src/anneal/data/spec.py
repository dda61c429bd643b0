"""What the ``dataset.`` values mean: Megatron's blend lists and split string, the prefixes the path fields
name, the validation sets' metric keys and the data's end-of-document id.

The config (``anneal.config.dataset``) holds the values and validates them through this module; the builders
(``anneal.data.sources``, ``anneal.data.datasets``) read the section through it too. It takes the section as
the object it is (anything with ``DatasetConfig``'s fields) and never imports ``anneal.config``, so the
dependency runs one way: config -> data.

Pure Python (no numpy): the dry run validates with it before numpy or torch is imported.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from anneal.data.metadata import Recorded, metadata_path
from anneal.errors import ConfigError

# The byte tokenizer of the ``stdlib`` kind (and the preprocessor's default): bytes 0-255 plus one
# end-of-document token, so a model needs ``model.vocab_size >= 257`` to train on it.
BYTE_VOCAB_SIZE = 257
BYTE_EOD = 256

PATH_FIELDS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "anneal_data_path")
EXTRA_VALID = "extra_valid_data_path"  # name -> blend: held-out sets read whole, scored at each evaluation
# Megatron's GPTDatasetConfig flags that need the end-of-document id (the model and the loss apply them).
DOCUMENT_FIELDS = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
VALID_KEY = "valid_loss"  # the main validation set's metric key; extra sets and components go below it
_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PREFIX_SUFFIXES = (".bin", ".idx")


@dataclass(frozen=True)
class Blend:
    """One parsed path field: its prefixes and, for a weighted blend, their weights (summing to 1)."""

    field: str  # dotted path, e.g. "dataset.data_path"
    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None  # None: the prefixes are read as one concatenated stream

    def prefix_field(self, i: int) -> str:
        """The dotted path of prefix ``i`` in the user's list (weights take every other slot)."""
        return f"{self.field}[{2 * i + 1 if self.weights is not None else i}]"

    @property
    def num_sources(self) -> int:
        """Each prefix of a weighted blend is a source; an unweighted list is one concatenated source."""
        return len(self.prefixes) if self.weights is not None else 1


def split_weights(split: str) -> tuple[float, float, float]:
    """Parse Megatron's ``"969,30,1"`` into three weights; raise ConfigError naming ``dataset.split``."""
    rule = "must be three comma-separated non-negative weights with a positive sum"
    parts = str(split).split(",")
    try:
        weights = tuple(float(part) for part in parts)
    except ValueError:
        raise ConfigError(f"dataset.split ({split!r}) {rule}") from None
    if len(weights) != 3 or min(weights) < 0 or not sum(weights) > 0:
        raise ConfigError(f"dataset.split ({split!r}) {rule}")
    if not weights[0] > 0:
        raise ConfigError(f"dataset.split ({split!r}) must give the train split (the first weight) a "
                          "positive weight")
    return weights  # type: ignore[return-value]


def parse_blend(path: str, items: list) -> Blend | None:
    """Megatron's blend list: ``[prefix, ...]`` or ``[w1, prefix1, w2, prefix2, ...]`` (weights > 0)."""
    if not items:
        return None
    numeric = [_is_number(item) for item in items]
    weighted = len(items) > 1 and len(items) % 2 == 0 and all(numeric[0::2])
    if any(numeric) and not weighted:
        i = _first_misplaced(numeric)
        raise ConfigError(f"{path}[{i}] ({items[i]!r}) breaks the blend: give prefixes only, or alternate "
                          "weight and prefix as in Megatron ([w1, prefix1, w2, prefix2, ...])")
    prefixes = items[1::2] if weighted else items
    blend = Blend(path, tuple(prefixes), _normalized(path, items[0::2]) if weighted else None)
    for i, prefix in enumerate(prefixes):
        _check_prefix(blend.prefix_field(i), prefix)
    return blend


# The section, read -------------------------------------------------------------------------------------

def uses_split(cfg) -> bool:
    """True when ``dataset.data_path`` is cut by ``dataset.split``; False with per-split paths."""
    return bool(cfg.data_path)


def blend_of(cfg, name: str) -> Blend | None:
    """The parsed ``dataset.<name>`` (one of PATH_FIELDS), or None when it is empty."""
    return parse_blend(f"dataset.{name}", list(getattr(cfg, name)))


def extra_blends(cfg) -> dict[str, Blend]:
    """The parsed ``dataset.extra_valid_data_path``: each held-out set's name and blend, in order."""
    blends = {}
    for name, items in (cfg.extra_valid_data_path or {}).items():
        if not isinstance(name, str) or not _SET_NAME.fullmatch(name):
            raise ConfigError(f"dataset.{EXTRA_VALID} has a set named {name!r}; a name must be non-empty "
                              "letters, digits, '_', '.' or '-' (it becomes the metric key "
                              "valid_loss/<name>)")
        blend = parse_blend(f"dataset.{EXTRA_VALID}.{name}", list(items or []))
        if blend is None:
            raise ConfigError(f"dataset.{EXTRA_VALID}.{name} ([]) must name at least one prefix")
        blends[name] = blend
    return blends


def prefixes(cfg) -> list[tuple[str, str]]:
    """Every ``(dotted field, prefix)`` pair in the path fields, the held-out sets' included."""
    blends = [blend_of(cfg, name) for name in PATH_FIELDS] + list(extra_blends(cfg).values())
    return [(blend.prefix_field(i), prefix) for blend in blends if blend is not None
            for i, prefix in enumerate(blend.prefixes)]


def main_valid_blend(cfg) -> Blend | None:
    """The blend the main validation set reads: ``data_path``'s valid split, or ``valid_data_path``."""
    return blend_of(cfg, "data_path" if uses_split(cfg) else "valid_data_path")


# Validation sets and their metric keys ------------------------------------------------------------------

def valid_keys(cfg) -> list[tuple[str, tuple[str, ...]]]:
    """``(key, component keys)`` of each validation set the run scores: the main one (when its split has
    weight), then the held-out sets; ConfigError naming the field when two keys would be the same."""
    sets = []
    if _has_main_valid(cfg):
        blend = main_valid_blend(cfg) if cfg.kind == "indexed" else None
        sets.append((VALID_KEY, component_keys(VALID_KEY, blend)))
    sets += [(f"{VALID_KEY}/{name}", component_keys(f"{VALID_KEY}/{name}", blend))
             for name, blend in extra_blends(cfg).items()]
    seen: dict[str, str] = {}
    for key, components in sets:
        for k in (key, *components):
            if k in seen:
                raise ConfigError(f"dataset.{EXTRA_VALID} ({dict(cfg.extra_valid_data_path)!r}) gives the "
                                  f"metric key {k!r} twice (as {seen[k]} and as {key}); rename the set")
            seen[k] = key if k == key else f"a component of {key}"
    return sets


def component_keys(set_key: str, blend: Blend | None) -> tuple[str, ...]:
    """``<set_key>/<prefix basename>`` for each source of a weighted blend; () for one source. Basenames
    that repeat get their source's index (``web_0``, ``web_1``), so the keys are unique and stable."""
    if blend is None or blend.num_sources < 2:
        return ()
    bases = [os.path.basename(prefix.rstrip("/")) or prefix for prefix in blend.prefixes]
    names = [f"{base}_{k}" if bases.count(base) > 1 else base for k, base in enumerate(bases)]
    for k, name in enumerate(names):
        if names.index(name) != k:
            first = blend.prefix_field(names.index(name))
            raise ConfigError(f"{blend.prefix_field(k)} ({blend.prefixes[k]!r}) gives the metric key "
                              f"{set_key}/{name} as {first} does; rename a prefix")
    return tuple(f"{set_key}/{name}" for name in names)


def _has_main_valid(cfg) -> bool:
    if cfg.kind == "indexed" and not uses_split(cfg):
        return bool(cfg.valid_data_path)
    return split_weights(cfg.split)[1] > 0


# The end-of-document id -------------------------------------------------------------------------------

def check_document_fields(cfg, vocab_size: int, recorded: Recorded | None) -> int | None:
    """The data's end-of-document id, which ``dataset.reset_position_ids`` / ``reset_attention_mask`` /
    ``eod_mask_loss`` find documents by: the byte EOD (stdlib), ``vocab_size - 1`` (mock), or the ``eod_id``
    every indexed prefix's sidecar records (``recorded``: ``check_tokenizers``'s reading; None when one
    records none). ConfigError naming the field and the prefix without one when one of them is set."""
    builtin = {"stdlib": BYTE_EOD, "mock": vocab_size - 1}
    eod = builtin[cfg.kind] if cfg.kind in builtin else recorded.eod if recorded is not None else None
    wanted = [name for name in DOCUMENT_FIELDS if getattr(cfg, name)]
    if not wanted or eod is not None:
        return eod
    field, prefix = (recorded.without_eod if recorded is not None else None) or ("dataset.data_path", "?")
    raise ConfigError(f"dataset.{wanted[0]} (True) needs the data's end-of-document id, but {field} "
                      f"({prefix!r}) records none in {metadata_path(prefix)}; preprocess it with "
                      "scripts/preprocess_data.py")


# Parsing helpers --------------------------------------------------------------------------------------

def _first_misplaced(numeric: list[bool]) -> int:
    """The first item out of place: a number among prefixes, or a break in weight/prefix alternation."""
    if not numeric[0]:
        return numeric.index(True)
    wrong = [i for i, is_number in enumerate(numeric) if is_number != (i % 2 == 0)]
    return wrong[0] if wrong else len(numeric) - 1  # an odd count: the last weight has no prefix


def _normalized(path: str, raw: list) -> tuple[float, ...]:
    weights = [float(w) for w in raw]
    for i, weight in enumerate(weights):
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{path}[{2 * i}] ({raw[i]!r}) must be a blend weight > 0")
    total = sum(weights)
    return tuple(weight / total for weight in weights)


def _check_prefix(path: str, prefix: object) -> None:
    if not isinstance(prefix, str) or not prefix.strip():
        raise ConfigError(f"{path} ({prefix!r}) must be a non-empty path prefix")
    if prefix.endswith(_PREFIX_SUFFIXES):
        raise ConfigError(f"{path} ({prefix!r}) must be a prefix without the .bin/.idx suffix")


def _is_number(item: object) -> bool:
    if isinstance(item, bool):
        return False
    if isinstance(item, (int, float)):
        return True
    try:
        float(str(item))
    except ValueError:
        return False
    return True
