"""``dataset.``: where training tokens come from, and how they split into train and validation.

Pure Python (no torch, no numpy) so a dry run can import and validate it in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anneal.errors import ConfigError, check_choice

DATASET_KINDS = ("stdlib", "mock", "indexed")

# The byte tokenizer of the ``stdlib`` kind (and the preprocessor's default): bytes 0-255 plus one
# end-of-document token, so a model needs ``model.vocab_size >= 257`` to train on it.
BYTE_VOCAB_SIZE = 257
BYTE_EOD = 256

_PREFIX_SUFFIXES = (".bin", ".idx")


@dataclass
class DatasetConfig:
    """One dataset section.

    ``stdlib``: the running interpreter's standard-library ``.py`` sources, byte-tokenized (real text,
    present on every machine). ``mock``: seeded random tokens, like Megatron's MockGPTDataset.
    ``indexed``: Megatron indexed datasets (``.bin`` + ``.idx``) named by prefix in ``data_path``.
    """

    kind: str = "stdlib"
    data_path: list[str] = field(default_factory=list)  # prefixes, without .bin/.idx (indexed only)
    split: str = "969,30,1"  # Megatron's train,valid,test weights
    seed: int = 1234
    stdlib_max_bytes: int = 8 * 1024 * 1024  # how much stdlib source the stdlib kind reads
    mock_num_tokens: int = 4 * 1024 * 1024  # length of the mock kind's token stream

    def validate(self) -> None:
        check_choice("dataset.kind", self.kind, DATASET_KINDS)
        split_weights(self.split)
        _check_data_path(self.kind, list(self.data_path))
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"dataset.seed ({self.seed!r}) must be a non-negative integer")
        for name in ("stdlib_max_bytes", "mock_num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset.{name} ({value!r}) must be a positive integer")

    def known_max_token(self) -> int | None:
        """The largest token id the data can hold, when known without reading it (stdlib only)."""
        return BYTE_EOD if self.kind == "stdlib" else None


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


def _check_data_path(kind: str, prefixes: list[str]) -> None:
    if kind != "indexed":
        if prefixes:
            raise ConfigError(f"dataset.data_path ({prefixes!r}) is only read when dataset.kind is 'indexed' "
                              f"(got {kind!r}); pick dataset=indexed or drop the paths")
        return
    if not prefixes:
        raise ConfigError(f"dataset.data_path ({prefixes!r}) must name at least one prefix when dataset.kind "
                          "is 'indexed'")
    for i, prefix in enumerate(prefixes):
        path = f"dataset.data_path[{i}]"
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"{path} ({prefix!r}) must be a non-empty path prefix")
        if _is_number(prefix):
            raise ConfigError(f"{path} ({prefix!r}) looks like a blend weight; anneal takes prefixes only "
                              "(Megatron's weighted blends are not supported)")
        if prefix.endswith(_PREFIX_SUFFIXES):
            raise ConfigError(f"{path} ({prefix!r}) must be a prefix without the .bin/.idx suffix")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
