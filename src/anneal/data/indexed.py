"""Megatron-LM's indexed dataset: tokens in ``<prefix>.bin``, their index in ``<prefix>.idx``.

The ``.idx`` layout ("MMIDIDX", version 1), little-endian::

    9 bytes   b"MMIDIDX\\x00\\x00"
    <Q        version, 1
    <B        dtype code of the tokens in .bin (DTYPE_CODES)
    <Q        sequence count S
    <Q        document-index count D (documents + 1)
    S  int32  sequence lengths, in tokens
    S  int64  sequence pointers, byte offsets into .bin
    D  int64  document indices: the sequence index where each document starts, then S

Files written here read in Megatron-Core and the other way round; a multimodal file's trailing
``S`` int8 sequence modes are accepted and ignored. Every document is one sequence here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from anneal.errors import ConfigError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
    8: np.uint16,
}
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # 34


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's choice of token dtype: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _dtype_code(dtype: type[np.number]) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {np.dtype(dtype)} has no Megatron DType code")


class IndexedDatasetWriter:
    """Write documents to ``<prefix>.bin`` as they come; ``finalize()`` writes ``<prefix>.idx``.

    ``with IndexedDatasetWriter(prefix, vocab_size=257) as writer: writer.add_document(tokens)``
    finalizes on a clean exit.
    """

    def __init__(self, prefix: str | Path, *, vocab_size: int | None = None,
                 dtype: type[np.number] | None = None) -> None:
        if (vocab_size is None) == (dtype is None):
            raise ValueError("give exactly one of vocab_size and dtype")
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype if dtype is not None else optimal_dtype(vocab_size))
        self._code = _dtype_code(self.dtype.type)
        self._lengths: list[int] = []
        self._bin = open(self.prefix + ".bin", "wb")  # noqa: SIM115 - closed by finalize()

    def add_document(self, tokens: npt.ArrayLike) -> None:
        """Append one document (any 1-D integer sequence) as one sequence."""
        source = np.asarray(tokens)
        array = source.astype(self.dtype)
        if array.ndim != 1 or (source.size and not np.array_equal(array, source)):
            raise ValueError(f"document does not fit 1-D {self.dtype} tokens "
                             f"(ids {source.min()}..{source.max()})")
        self._bin.write(array.tobytes(order="C"))
        self._lengths.append(int(array.size))

    def finalize(self) -> None:
        """Close ``.bin`` and write ``.idx``."""
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self.prefix + ".idx", "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", INDEX_VERSION))
            idx.write(struct.pack("<B", self._code))
            idx.write(struct.pack("<Q", len(lengths)))
            idx.write(struct.pack("<Q", len(document_indices)))
            for array in (lengths, pointers, document_indices):
                idx.write(array.tobytes(order="C"))

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._bin.close()


class IndexedDataset:
    """Read-only view of ``<prefix>.bin``/``.idx`` through ``np.memmap``.

    ``get(i)`` is sequence ``i``: document ``i`` for files from anneal's writer or from Megatron's
    preprocessing without ``--split-sentences``. ``tokens`` is the whole ``.bin`` as one array.
    Any file that does not hold exactly what its index says is refused with a ConfigError naming it.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        self.dtype, lengths, pointers, self.document_indices = _read_index(self.idx_path)
        self.sequence_lengths = lengths
        self.sequence_pointers = pointers
        self.tokens = _map_tokens(self.bin_path, self.dtype, int(lengths.sum(dtype=np.int64)))
        _check_contiguous(self.idx_path, lengths, pointers, self.dtype.itemsize)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def get(self, index: int) -> np.ndarray:
        """The tokens of sequence ``index`` (a read-only view into the mapped ``.bin``)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences in {self.prefix}")
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[index])]


@dataclass(frozen=True)
class IndexHeader:
    """What an ``.idx`` header says, checked against the sizes of ``.idx`` and ``.bin`` (no data read)."""

    dtype: np.dtype
    sequences: int
    documents: int
    num_tokens: int  # the tokens in .bin: its last sequence's pointer plus its length


def read_header(prefix: str | Path) -> IndexHeader:
    """Check ``<prefix>.idx``'s header and size and ``<prefix>.bin``'s size, reading 46 bytes in all.

    What ``IndexedDataset`` refuses before it maps anything is refused here the same way (ConfigError)."""
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    dtype, sequences, documents = _parse_header(idx_path)
    num_tokens = _last_token_end(idx_path, sequences, dtype.itemsize)
    _check_bin_size(bin_path, dtype, num_tokens)
    return IndexHeader(dtype, sequences, documents, num_tokens)


def _parse_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """The dtype, sequence count and document-index count of an ``.idx``; its size must match them."""
    try:
        with open(idx_path, "rb") as stream:
            header = stream.read(_HEADER_BYTES)
        size = Path(idx_path).stat().st_size
    except OSError as err:
        raise ConfigError(f"{idx_path}: cannot read the index ({err.strerror or err})") from None
    if len(header) < _HEADER_BYTES or header[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise ConfigError(f"{idx_path}: not a Megatron indexed-dataset index (no MMIDIDX header)")
    version, code, sequences, documents = struct.unpack_from("<QBQQ", header, len(INDEX_HEADER))
    if version != INDEX_VERSION:
        raise ConfigError(f"{idx_path}: index version {version} is not the supported {INDEX_VERSION}")
    if code not in DTYPE_CODES:
        raise ConfigError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    expected = _HEADER_BYTES + 12 * sequences + 8 * documents
    if size not in (expected, expected + sequences):  # + sequences: multimodal modes
        raise ConfigError(f"{idx_path}: {size} bytes, but its header promises {expected} "
                          f"({sequences} sequences, {documents} document indices); truncated or corrupted")
    return np.dtype(DTYPE_CODES[code]), sequences, documents


def _last_token_end(idx_path: str, sequences: int, itemsize: int) -> int:
    """Tokens up to the end of the last sequence (its pointer and length: 12 bytes read)."""
    if sequences == 0:
        return 0
    with open(idx_path, "rb") as stream:
        stream.seek(_HEADER_BYTES + 4 * (sequences - 1))
        (length,) = struct.unpack("<i", stream.read(4))
        stream.seek(_HEADER_BYTES + 4 * sequences + 8 * (sequences - 1))
        (pointer,) = struct.unpack("<q", stream.read(8))
    if length < 0 or pointer < 0 or pointer % itemsize:
        raise ConfigError(f"{idx_path}: its last sequence (pointer {pointer}, length {length}) is corrupted")
    return pointer // itemsize + length


def _read_index(idx_path: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and check an ``.idx`` file; returns (dtype, lengths, pointers, document indices)."""
    dtype, sequences, documents = _parse_header(idx_path)
    data = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(data, np.int32, sequences, _HEADER_BYTES)
    pointers = np.frombuffer(data, np.int64, sequences, _HEADER_BYTES + 4 * sequences)
    doc_index = np.frombuffer(data, np.int64, documents, _HEADER_BYTES + 12 * sequences)
    _check_document_indices(idx_path, doc_index, sequences)
    if sequences and lengths.min() < 0:
        raise ConfigError(f"{idx_path}: negative sequence length; corrupted")
    return dtype, lengths, pointers, doc_index


def _check_document_indices(idx_path: str, doc_index: np.ndarray, sequences: int) -> None:
    ok = (len(doc_index) >= 1 and doc_index[0] == 0 and doc_index[-1] == sequences
          and bool(np.all(np.diff(doc_index) >= 0)))
    if not ok:
        raise ConfigError(f"{idx_path}: document indices must rise from 0 to the sequence count "
                          f"({sequences}); corrupted")


def _check_bin_size(bin_path: str, dtype: np.dtype, num_tokens: int) -> None:
    try:
        size = Path(bin_path).stat().st_size
    except OSError as err:
        raise ConfigError(f"{bin_path}: cannot read the token file ({err.strerror or err})") from None
    if size != num_tokens * dtype.itemsize:
        raise ConfigError(f"{bin_path}: {size} bytes, but its index promises {num_tokens} {dtype} tokens "
                          f"({num_tokens * dtype.itemsize} bytes); truncated or not this index's data")


def _map_tokens(bin_path: str, dtype: np.dtype, num_tokens: int) -> np.ndarray:
    _check_bin_size(bin_path, dtype, num_tokens)
    if num_tokens == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))


def _check_contiguous(idx_path: str, lengths: np.ndarray, pointers: np.ndarray, itemsize: int) -> None:
    """Sequences must tile ``.bin`` in order (how Megatron writes them), so ``.bin`` is one token stream."""
    expected = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
    if not np.array_equal(expected, pointers):
        raise ConfigError(f"{idx_path}: sequence pointers do not tile the .bin file in order; corrupted")
