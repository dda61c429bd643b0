"""The JSON sidecar ``<prefix>.json`` that ``scripts/preprocess_data.py`` writes next to ``.bin``/``.idx``.

It records the tokenizer (its path, type, vocabulary size, end-of-document and beginning-of-sequence ids and
a sha256 of its file) so the launcher can check the model's vocabulary against it before training and refuse
a blend of prefixes tokenized differently. Prefixes without a sidecar (Megatron's own preprocessing) are
read as they are; their token ids are still checked against ``model.vocab_size`` when they are loaded.

Pure Python (json, hashlib): the config validation imports it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from anneal.errors import ConfigError

METADATA_VERSION = 1
_TOKENIZER_KEYS = ("type", "path", "sha256", "vocab_size", "eod_id", "bos_id")


def metadata_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_metadata(prefix: str | Path, *, tokenizer: dict, stats: dict) -> Path:
    """Write ``<prefix>.json``: the tokenizer's description and what was written."""
    missing = [key for key in _TOKENIZER_KEYS if key not in tokenizer]
    if missing:
        raise ValueError(f"tokenizer description lacks {missing}")
    path = metadata_path(prefix)
    record = {"format": "anneal-indexed-metadata", "version": METADATA_VERSION, "tokenizer": tokenizer,
              **stats}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def read_tokenizer(prefix: str, field: str) -> dict | None:
    """The tokenizer recorded for ``prefix``, None without a sidecar; ConfigError naming ``field`` if bad."""
    path = metadata_path(prefix)
    if not path.is_file():
        return None
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))["tokenizer"]
        vocab_size = tokenizer["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{field} ({prefix!r}): {path} is not an anneal metadata file ({err!r}); "
                          "preprocess again or delete it") from None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"{field} ({prefix!r}): {path} records a tokenizer vocab_size of {vocab_size!r}")
    return tokenizer


@dataclass(frozen=True)
class Recorded:
    """What the sidecars of a run's prefixes record in common (``check_tokenizers``)."""

    eod: int | None  # the end-of-document id every prefix records; None when one records none
    without_eod: tuple[str, str] | None  # the first ``(field, prefix)`` recording none (or no sidecar)


def check_tokenizers(prefixes: list[tuple[str, str]], vocab_size: int) -> Recorded:
    """Refuse a model vocabulary below a recorded tokenizer's, a blend of different tokenizers, and of
    different end-of-document ids; return the id they share. Each sidecar is read once.

    ``prefixes`` holds ``(dotted field, prefix)`` pairs; prefixes without a sidecar are skipped, but leave the
    end-of-document id unknown (Megatron's own preprocessing records none).
    """
    first: tuple[str, str, dict] | None = None
    first_eod: tuple[str, str, int] | None = None
    without_eod: tuple[str, str] | None = None
    for field, prefix in prefixes:
        tokenizer = read_tokenizer(prefix, field)
        if tokenizer is None or tokenizer.get("eod_id") is None:
            without_eod = without_eod or (field, prefix)
        if tokenizer is None:
            continue
        needed = tokenizer["vocab_size"]
        if vocab_size < needed:
            raise ConfigError(
                f"model.vocab_size ({vocab_size}) must be >= the tokenizer's vocabulary ({needed} ids, "
                f"{_describe(tokenizer)}) recorded in {metadata_path(prefix)} for {field}; Megatron pads it "
                f"to a multiple of 128: {padded_vocab_size(needed)}")
        if first is None:
            first = (field, prefix, tokenizer)
        elif tokenizer.get("sha256") != first[2].get("sha256"):
            raise ConfigError(f"{field} ({prefix!r}) was tokenized with {_describe(tokenizer)}, but "
                              f"{first[0]} ({first[1]!r}) with {_describe(first[2])}; one run needs one "
                              "tokenizer")
        if tokenizer.get("eod_id") is None:
            continue
        eod = _eod_id(field, prefix, tokenizer)
        if first_eod is None:
            first_eod = (field, prefix, eod)
        elif eod != first_eod[2]:
            raise ConfigError(f"{field} ({prefix!r}) records end-of-document id {eod}, but {first_eod[0]} "
                              f"({first_eod[1]!r}) records {first_eod[2]}; one run needs one tokenizer")
    eod = first_eod[2] if first_eod is not None and without_eod is None else None
    return Recorded(eod, without_eod)


def _eod_id(field: str, prefix: str, tokenizer: dict) -> int:
    eod = tokenizer["eod_id"]
    if isinstance(eod, bool) or not isinstance(eod, int) or not 0 <= eod < tokenizer["vocab_size"]:
        raise ConfigError(f"{field} ({prefix!r}): {metadata_path(prefix)} records an eod_id of {eod!r}, "
                          f"not a token id below its vocab_size ({tokenizer['vocab_size']})")
    return eod


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128) -> int:
    """Megatron's padding of a tokenizer's vocabulary (with tensor parallelism 1)."""
    multiple = make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


def _describe(tokenizer: dict) -> str:
    path = f" {tokenizer['path']}" if tokenizer.get("path") else ""
    return f"{tokenizer.get('type', '?')} tokenizer{path} sha256 {(tokenizer.get('sha256') or '?')[:12]}"
