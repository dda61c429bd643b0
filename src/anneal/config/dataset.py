"""``dataset.``: where training tokens come from, how sources blend, and how they split.

Pure Python (no torch, no numpy) so a dry run can import and validate it in milliseconds.

Paths follow Megatron: ``data_path`` is either prefixes (read as one concatenated stream) or a blend
``[w1, prefix1, w2, prefix2, ...]``; it is cut into train/valid/test by ``split``. Alternatively
``train_data_path`` / ``valid_data_path`` / ``test_data_path`` give each split its own blend and
``split`` is not used. ``anneal_data_path`` is a blend for the training samples from the WSD anneal on
(data annealing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from anneal.data.metadata import check_tokenizers
from anneal.errors import ConfigError, check_choice

DATASET_KINDS = ("stdlib", "mock", "indexed")
PATH_FIELDS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "anneal_data_path")

# The byte tokenizer of the ``stdlib`` kind (and the preprocessor's default): bytes 0-255 plus one
# end-of-document token, so a model needs ``model.vocab_size >= 257`` to train on it.
BYTE_VOCAB_SIZE = 257
BYTE_EOD = 256

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


@dataclass
class DatasetConfig:
    """One dataset section.

    ``stdlib``: the running interpreter's standard-library ``.py`` sources, byte-tokenized (real text,
    present on every machine). ``mock``: seeded random tokens, like Megatron's MockGPTDataset.
    ``indexed``: Megatron indexed datasets (``.bin`` + ``.idx``) named by prefix in the path fields.
    """

    kind: str = "stdlib"  # one of DATASET_KINDS: stdlib, mock, indexed
    data_path: list[str | float] = field(default_factory=list)  # prefixes, or [w1, prefix1, w2, ...]
    split: str = "969,30,1"  # Megatron's train,valid,test weights (data_path only)
    train_data_path: list[str | float] = field(default_factory=list)  # per-split blends, no split
    valid_data_path: list[str | float] = field(default_factory=list)  # validation blend
    test_data_path: list[str | float] = field(default_factory=list)  # test blend
    anneal_data_path: list[str | float] = field(default_factory=list)  # train blend from the WSD anneal
    seed: int = 1234  # sample order and the mock tokens
    stdlib_max_bytes: int = 8 * 1024 * 1024  # how much stdlib source the stdlib kind reads
    mock_num_tokens: int = 4 * 1024 * 1024  # length of the mock kind's token stream

    def __post_init__(self) -> None:
        for name in PATH_FIELDS:  # one prefix without brackets (dataset.data_path=/data/web) is a list of one
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])

    def validate(self) -> None:
        check_choice("dataset.kind", self.kind, DATASET_KINDS)
        split_weights(self.split)
        _check_paths(self)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"dataset.seed ({self.seed!r}) must be a non-negative integer")
        for name in ("stdlib_max_bytes", "mock_num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset.{name} ({value!r}) must be a positive integer")

    def known_max_token(self) -> int | None:
        """The largest token id the data can hold, when known without reading it (stdlib only)."""
        return BYTE_EOD if self.kind == "stdlib" else None

    def blend(self, name: str) -> Blend | None:
        """The parsed ``dataset.<name>`` (one of PATH_FIELDS), or None when it is empty."""
        return parse_blend(f"dataset.{name}", list(getattr(self, name)))

    def check_against(self, vocab_size: int, lr_decay_style: str | None, *,
                      eval_interval: int | None) -> None:
        """Rules across sections: the recorded tokenizers fit ``model.vocab_size``, an anneal blend has
        WSD, and an evaluation (``train.eval_interval``, None when off) has validation data."""
        check_anneal_blend(self, lr_decay_style)
        if eval_interval and not self.has_valid_data():
            where = (f"dataset.split ({self.split!r}) gives the valid split no weight" if self.uses_split
                     or self.kind != "indexed" else "dataset.valid_data_path is empty")
            raise ConfigError(f"train.eval_interval ({eval_interval}) needs validation data, but {where}; "
                              "give it some, or set train.eval_interval=null")
        check_tokenizers(self.prefixes(), vocab_size)  # reads each prefix's small .json sidecar, if any

    def prefixes(self) -> list[tuple[str, str]]:
        """Every ``(dotted field, prefix)`` pair in the path fields."""
        pairs = []
        for name in PATH_FIELDS:
            blend = self.blend(name)
            if blend is not None:
                pairs += [(blend.prefix_field(i), prefix) for i, prefix in enumerate(blend.prefixes)]
        return pairs

    def has_valid_data(self) -> bool:
        if self.kind == "indexed" and not self.uses_split:
            return bool(self.valid_data_path)
        return split_weights(self.split)[1] > 0

    @property
    def uses_split(self) -> bool:
        """True when ``data_path`` is cut by ``split``; False with per-split paths."""
        return bool(self.data_path)


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


def _check_paths(cfg: DatasetConfig) -> None:
    given = [name for name in PATH_FIELDS if getattr(cfg, name)]
    if cfg.kind != "indexed":
        if given:
            name = given[0]
            raise ConfigError(f"dataset.{name} ({getattr(cfg, name)!r}) is only read when dataset.kind is "
                              f"'indexed' (got {cfg.kind!r}); pick dataset=indexed or drop the paths")
        return
    for name in given:
        cfg.blend(name)
    per_split = [name for name in given if name in PATH_FIELDS[1:4]]
    if cfg.data_path and per_split:
        raise ConfigError(f"dataset.{per_split[0]} cannot be combined with dataset.data_path: give one "
                          "blend cut by dataset.split, or a blend per split (as in Megatron)")
    if not cfg.data_path and not cfg.train_data_path:
        what = f"; dataset.{per_split[0]} needs dataset.train_data_path" if per_split else ""
        raise ConfigError(f"dataset.data_path ({list(cfg.data_path)!r}) must name at least one prefix when "
                          f"dataset.kind is 'indexed'{what}")


def check_anneal_blend(cfg: DatasetConfig, lr_decay_style: str | None) -> None:
    """``dataset.anneal_data_path`` starts at the WSD anneal, so it needs a WSD schedule."""
    if cfg.anneal_data_path and lr_decay_style != "WSD":
        raise ConfigError(f"dataset.anneal_data_path ({list(cfg.anneal_data_path)!r}) needs "
                          f"scheduler.lr_decay_style 'WSD' (got {lr_decay_style!r}): the anneal blend "
                          "takes over where the WSD anneal starts")


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
