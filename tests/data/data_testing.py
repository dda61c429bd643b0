"""Helpers for the data tests (importable: tests/data is on sys.path through its conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anneal.data.indexed import IndexedDatasetWriter


def write_sources(root: Path, documents: list[int], vocab_size: int = 400) -> list[str]:
    """Indexed prefixes ``root/s<k>`` of ``documents[k]`` random documents each, source k's tokens in
    ``[100 k, 100 k + 99)``: a window's first token // 100 names the source it came from."""
    rng = np.random.default_rng(0)
    prefixes = []
    for k, count in enumerate(documents):
        prefixes.append(str(root / f"s{k}"))
        with IndexedDatasetWriter(prefixes[-1], vocab_size=vocab_size) as writer:
            for length in rng.integers(5, 60, size=count):
                writer.add_document(100 * k + rng.integers(0, 99, size=length))
    return prefixes
