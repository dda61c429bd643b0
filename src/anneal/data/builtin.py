"""The two kinds that need no files: ``stdlib`` (the interpreter's standard-library sources, byte-tokenized)
and ``mock`` (seeded random tokens, like Megatron's MockGPTDataset).

Each is one token stream of documents ending in the end-of-document token, cut by the ``dataset.split``
weights into contiguous train / valid / test token ranges (``anneal.data.windows``).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

from anneal.data.spec import BYTE_EOD, split_weights
from anneal.data.windows import TokenStream, TokenWindows, check_token_range, split_bounds
from anneal.errors import ConfigError

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_MOCK_MAX_DOCUMENT_LENGTH = 4096  # Megatron's MockGPTLowLevelDataset.max_sequence_length


def build_builtin(cfg, *, seq_length: int, vocab_size: int) -> tuple[TokenWindows, TokenWindows]:
    """The (train, valid) windows of a ``stdlib`` or ``mock`` section ``cfg``; ConfigError when its tokens do
    not fit ``vocab_size`` or a split with weight gets less than one window."""
    stream, eod, size_field = _load_stream(cfg, vocab_size)
    weights = split_weights(cfg.split)
    bounds = split_bounds(len(stream), weights)
    train, valid = (
        TokenWindows(stream, start=bounds[i], stop=bounds[i + 1], seq_length=seq_length,
                     seed=cfg.seed, split=i, vocab_size=vocab_size, eod=eod)
        for i in (0, 1)
    )
    if len(train) == 0:
        value = getattr(cfg, size_field.removeprefix("dataset."))
        raise ConfigError(f"{size_field} ({value!r}) gives the train split {train.num_tokens} tokens, "
                          f"fewer than one window of seq_length + 1 = {seq_length + 1}")
    if len(valid) == 0 and weights[1] > 0:
        raise ConfigError(f"dataset.split ({cfg.split!r}) gives the valid split {valid.num_tokens} "
                          f"tokens, fewer than one window of seq_length + 1 = {seq_length + 1}; raise "
                          "its weight or set it to 0")
    return train, valid


def _load_stream(cfg, vocab_size: int) -> tuple[TokenStream, int | None, str]:
    """The token stream of ``cfg``, its end-of-document id, and the field that sets its size."""
    if cfg.kind == "stdlib":
        check_token_range(0, BYTE_EOD, vocab_size, "dataset.kind 'stdlib' (byte tokens)")
        return TokenStream([stdlib_tokens(cfg.stdlib_max_bytes)]), BYTE_EOD, "dataset.stdlib_max_bytes"
    if cfg.kind == "mock":
        if vocab_size < 2:
            raise ConfigError(f"model.vocab_size ({vocab_size}) must be >= 2 for dataset.kind 'mock'")
        tokens = mock_tokens(cfg.mock_num_tokens, vocab_size=vocab_size, seed=cfg.seed)
        return TokenStream([tokens]), vocab_size - 1, "dataset.mock_num_tokens"
    raise ValueError(f"dataset.kind {cfg.kind!r} is not built here (anneal.data.sources builds 'indexed')")


def stdlib_sources(max_bytes: int, root: str | Path | None = None) -> list[bytes]:
    """The standard library's ``.py`` sources in a fixed order, cut off after ``max_bytes`` in all.

    Directories and files are visited in sorted order, skipping third-party (``site-packages``) and test
    directories and empty files; the last file is truncated so the total is ``min(max_bytes, what there
    is)``.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    sources: list[bytes] = []
    budget = max_bytes
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if name not in _SKIPPED_DIRS)
        for name in sorted(filenames):
            data = (Path(directory) / name).read_bytes()[:budget] if name.endswith(".py") else b""
            if not data:  # not Python, or an empty __init__.py: no document
                continue
            sources.append(data)
            budget -= len(data)
            if budget == 0:
                return sources
    return sources


def stdlib_tokens(max_bytes: int, root: str | Path | None = None) -> np.ndarray:
    """Byte tokens of the stdlib sources, each followed by the end-of-document token (uint16)."""
    eod = np.array([BYTE_EOD], dtype=np.uint16)
    pieces = []
    for source in stdlib_sources(max_bytes, root):
        pieces += [np.frombuffer(source, dtype=np.uint8), eod]
    if not pieces:
        where = root or sysconfig.get_paths()["stdlib"]
        raise ConfigError(f"dataset.kind 'stdlib': no .py files under {where}")
    return np.concatenate(pieces, dtype=np.uint16)


def mock_tokens(num_tokens: int, *, vocab_size: int, seed: int) -> np.ndarray:
    """Seeded random tokens in ``[0, vocab_size - 1)`` cut into documents of 1-4095 tokens, each ending in
    the end-of-document id ``vocab_size - 1`` (Megatron's mock document lengths, random token ids)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6D6F636B]))  # "mock"
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    tokens = rng.integers(0, vocab_size - 1, size=num_tokens, dtype=np.int64).astype(dtype)
    ends = _mock_document_ends(rng, num_tokens)
    tokens[ends - 1] = vocab_size - 1
    return tokens


def _mock_document_ends(rng: np.random.Generator, num_tokens: int) -> np.ndarray:
    """Document end offsets up to ``num_tokens``, drawn in blocks so memory follows the document count."""
    blocks, total = [], 0
    while total < num_tokens:
        block = total + np.cumsum(rng.integers(1, _MOCK_MAX_DOCUMENT_LENGTH, size=1024))
        blocks.append(block)
        total = int(block[-1])
    ends = np.concatenate(blocks)
    return ends[ends <= num_tokens]
