"""Megatron's indexed dataset format: writer -> reader round trips, the byte layout, refusing bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from anneal.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from anneal.errors import ConfigError

# Megatron-Core's DType codes (megatron/core/datasets/indexed_dataset.py).
MEGATRON_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def _random_documents(rng: np.random.Generator, count: int, high: int, low: int = 0) -> list[np.ndarray]:
    lengths = rng.integers(0, 50, size=count)  # includes empty documents
    return [rng.integers(low, high, size=length) for length in lengths]


def _write(prefix: Path, documents: list, **kwargs) -> None:
    with IndexedDatasetWriter(prefix, **kwargs) as writer:
        for document in documents:
            writer.add_document(document)


@pytest.mark.parametrize(("dtype", "low", "high"), [
    (np.uint8, 0, 256), (np.int8, -128, 128), (np.uint16, 0, 65536), (np.int32, 0, 2**31 - 1),
    (np.int64, 0, 2**40),
])
def test_round_trip_many_documents(tmp_path: Path, dtype: type, low: int, high: int) -> None:
    documents = _random_documents(np.random.default_rng(0), 500, high, low)
    _write(tmp_path / "data", documents, dtype=dtype)
    dataset = IndexedDataset(tmp_path / "data")
    assert len(dataset) == 500 and dataset.dtype == np.dtype(dtype)
    assert dataset.sequence_lengths.tolist() == [len(d) for d in documents]
    for index, document in enumerate(documents):
        assert dataset.get(index).dtype == np.dtype(dtype)
        assert dataset.get(index).tolist() == document.tolist()
    assert dataset.tokens.tolist() == np.concatenate(documents).tolist()  # the .bin is one stream


def test_file_layout_is_megatrons_mmidx(tmp_path: Path) -> None:
    """Parse the .idx by hand, independently of the reader."""
    documents = [[1, 2, 3], [], [7, 8]]
    _write(tmp_path / "data", documents, dtype=np.int32)
    raw = (tmp_path / "data.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, sequences, doc_count = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, sequences, doc_count) == (1, MEGATRON_CODES[np.int32], 3, 4)
    offset = 34
    assert struct.unpack_from("<3i", raw, offset) == (3, 0, 2)
    assert struct.unpack_from("<3q", raw, offset + 12) == (0, 12, 12)  # byte pointers
    assert struct.unpack_from("<4q", raw, offset + 36) == (0, 1, 2, 3)  # document indices
    assert len(raw) == offset + 36 + 32
    assert np.fromfile(tmp_path / "data.bin", dtype=np.int32).tolist() == [1, 2, 3, 7, 8]


@pytest.mark.parametrize(("vocab_size", "dtype"),
                         [(257, np.uint16), (65499, np.uint16), (65500, np.int32), (151936, np.int32)])
def test_writer_picks_megatrons_dtype_for_the_vocabulary(tmp_path: Path, vocab_size: int,
                                                         dtype: type) -> None:
    assert optimal_dtype(vocab_size) is dtype
    _write(tmp_path / "data", [[0, vocab_size - 1]], vocab_size=vocab_size)
    dataset = IndexedDataset(tmp_path / "data")
    assert dataset.dtype == np.dtype(dtype) and dataset.get(0).tolist() == [0, vocab_size - 1]


def test_writer_refuses_tokens_that_do_not_fit_the_dtype(tmp_path: Path) -> None:
    writer = IndexedDatasetWriter(tmp_path / "data", dtype=np.uint16)
    with pytest.raises(ValueError, match="does not fit"):
        writer.add_document([1, 70000])
    with pytest.raises(ValueError, match="does not fit"):
        writer.add_document([-1])


def _corrupt_truncate_idx(prefix: Path) -> Path:
    idx = prefix.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-3])
    return idx


def _corrupt_header(prefix: Path) -> Path:
    idx = prefix.with_suffix(".idx")
    idx.write_bytes(b"NOTMMIDX\x00" + idx.read_bytes()[9:])
    return idx


def _corrupt_foreign(prefix: Path) -> Path:
    idx = prefix.with_suffix(".idx")
    idx.write_text('{"this": "is json"}\n')
    return idx


def _corrupt_dtype_code(prefix: Path) -> Path:
    idx = prefix.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[17] = 42
    idx.write_bytes(bytes(raw))
    return idx


def _corrupt_document_indices(prefix: Path) -> Path:
    idx = prefix.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[-8:] = struct.pack("<q", 999)  # last document index must equal the sequence count
    idx.write_bytes(bytes(raw))
    return idx


def _corrupt_pointers(prefix: Path) -> Path:
    idx = prefix.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[34 + 4 * 20: 34 + 4 * 20 + 8] = struct.pack("<q", 2)  # first sequence pointer must be 0
    idx.write_bytes(bytes(raw))
    return idx


def _corrupt_truncate_bin(prefix: Path) -> Path:
    path = prefix.with_suffix(".bin")
    path.write_bytes(path.read_bytes()[:-1])
    return path


def _missing_bin(prefix: Path) -> Path:
    path = prefix.with_suffix(".bin")
    path.unlink()
    return path


@pytest.mark.parametrize(("corrupt", "reason"), [
    (_corrupt_truncate_idx, "truncated"), (_corrupt_header, "MMIDIDX"), (_corrupt_foreign, "MMIDIDX"),
    (_corrupt_dtype_code, "dtype code 42"), (_corrupt_document_indices, "document indices"),
    (_corrupt_pointers, "pointers"), (_corrupt_truncate_bin, "truncated"), (_missing_bin, "cannot read"),
])
def test_bad_files_are_refused_naming_the_file(tmp_path: Path, corrupt, reason: str) -> None:
    prefix = tmp_path / "data"
    _write(prefix, _random_documents(np.random.default_rng(1), 20, 257), vocab_size=257)
    IndexedDataset(prefix)  # intact first
    bad_file = corrupt(prefix)
    with pytest.raises(ConfigError) as caught:
        IndexedDataset(prefix)
    assert str(caught.value).startswith(f"{bad_file}: ") and reason in str(caught.value)


def test_missing_index_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothing\.idx"):
        IndexedDataset(tmp_path / "nothing")


def test_empty_dataset_reads_back_empty(tmp_path: Path) -> None:
    _write(tmp_path / "data", [], vocab_size=257)
    dataset = IndexedDataset(tmp_path / "data")
    assert len(dataset) == 0 and dataset.num_tokens == 0
