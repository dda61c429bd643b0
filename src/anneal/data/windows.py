"""The shared primitives of every kind of data: token streams, their fixed windows, and opened prefixes.

A ``TokenStream`` reads several token arrays (in memory or memory-mapped) as one. ``TokenWindows`` cuts a
token range of it into windows ``[w * seq_length, w * seq_length + seq_length + 1)`` (inputs plus the labels
shifted by one; a window's last token is the next window's first, as in Megatron's GPTDataset).

Sample ``i`` of a split is window ``perm_e[i % n]`` with ``e = i // n`` the epoch and ``perm_e`` a
permutation of the ``n`` windows seeded by ``(dataset.seed, split, e)`` (plus a salt telling apart the
sources of a blend). So a sample is a pure function of the seed and its index: it does not depend on the
world size, and a run resumed at ``consumed_samples`` sees exactly the samples an uninterrupted run would.

``anneal.data.builtin`` (stdlib, mock) and ``anneal.data.sources`` (indexed) build on this module;
``anneal.data.datasets`` sits on top of both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from anneal.data.indexed import IndexedDataset, IndexHeader, read_header
from anneal.errors import ConfigError

SPLIT_NAMES = ("train", "valid", "test")
_VOCAB_SCAN_TOKENS = 1 << 27  # per indexed prefix at build; every batch is checked again when read


class TokenStream:
    """Several token arrays (in memory or memory-mapped) read as one."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [part for part in parts if len(part)]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` in the parts' dtype: a view unless it crosses parts."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) out of range for a stream of {len(self)}")
        part = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while length > 0:
            offset = start - int(self.starts[part])
            piece = self.parts[part][offset:offset + length]
            pieces.append(piece)
            start, length, part = start + len(piece), length - len(piece), part + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


class TokenWindows:
    """The windows of one split; ``gather(samples)`` returns ``[len(samples), seq_length + 1]`` int64 tokens.

    Sample indices run past ``len(self)`` (the windows per epoch) into later, reshuffled epochs.
    """

    def __init__(self, stream: TokenStream, *, start: int, stop: int, seq_length: int, seed: int,
                 split: int, vocab_size: int, eod: int | None, salt: tuple[int, ...] = ()) -> None:
        self.stream = stream
        self.start = start
        self.num_tokens = stop - start
        self.seq_length = seq_length
        self.seed = seed
        self.split = split
        self.vocab_size = vocab_size
        self.eod = eod
        self.salt = salt  # tells apart the sources of a blend, which share seed and split
        self.num_windows = windows_in(self.num_tokens, seq_length)
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_windows

    def __repr__(self) -> str:
        return (f"TokenWindows({SPLIT_NAMES[self.split]}: {self.num_windows} windows of "
                f"{self.seq_length} + 1 tokens over {self.num_tokens} tokens, seed {self.seed})")

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch`` (the last two are cached)."""
        if epoch not in self._permutations:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.split, epoch, *self.salt]))
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = rng.permutation(self.num_windows)
        return self._permutations[epoch]

    def windows(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        """The window index each sample reads."""
        samples = np.asarray(samples, dtype=np.int64)
        if self.num_windows == 0:
            raise IndexError(f"the {SPLIT_NAMES[self.split]} split has no windows")
        if samples.size and samples.min() < 0:
            raise IndexError(f"sample indices must be >= 0 (got {samples.min()})")
        epochs, positions = np.divmod(samples, self.num_windows)
        out = np.empty_like(samples)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self.permutation(int(epoch))[positions[mask]]
        return out

    def gather(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tokens of ``samples``: ``[len(samples), seq_length + 1]`` int64."""
        starts = self.start + self.windows(samples) * self.seq_length
        width = self.seq_length + 1
        batch = np.empty((len(starts), width), dtype=np.int64)
        for row, start in enumerate(starts):
            batch[row] = self.stream.read(int(start), width)  # the one copy, cast to int64
        if batch.size:  # cheap insurance for data the build only sampled (large indexed prefixes)
            source = f"the {SPLIT_NAMES[self.split]} split"
            check_token_range(int(batch.min()), int(batch.max()), self.vocab_size, source)
        return batch

    def __getitem__(self, sample: int) -> np.ndarray:
        return self.gather([sample])[0]


def split_bounds(num_tokens: int, weights: Sequence[float]) -> list[int]:
    """Token offsets ``[0, end_train, end_valid, num_tokens]`` cutting the stream by ``weights``."""
    total = float(sum(weights))
    cumulative = np.cumsum(weights) / total
    return [0] + [round(num_tokens * fraction) for fraction in cumulative[:-1]] + [num_tokens]


def windows_in(num_tokens: int, seq_length: int) -> int:
    """Windows of ``seq_length + 1`` tokens (sharing one token with the next) in ``num_tokens`` tokens."""
    return max(0, (num_tokens - 1) // seq_length)


def prefix_header(field: str, prefix: str) -> IndexHeader:
    """The checked header of the prefix at ``field`` (its ``.idx`` and ``.bin`` exist, agree and hold integer
    tokens), reading no data; ConfigError naming the field, the prefix and the problem."""
    try:
        header = read_header(prefix)
    except ConfigError as err:
        raise ConfigError(f"{field} ({prefix!r}): {err}") from None
    if header.dtype.kind == "f":
        raise ConfigError(f"{field} ({prefix!r}): {prefix}.idx stores {header.dtype} values, not integer "
                          "token ids")
    return header


def open_prefix(field: str, prefix: str, vocab_size: int) -> IndexedDataset:
    """Open the prefix at ``field`` (e.g. ``dataset.data_path[1]``) and check its tokens fit the vocab."""
    prefix_header(field, prefix)  # the dry run's checks, then the whole index
    try:
        dataset = IndexedDataset(prefix)
    except ConfigError as err:
        raise ConfigError(f"{field} ({prefix!r}): {err}") from None
    info = np.iinfo(dataset.dtype)
    if info.min < 0 or info.max >= vocab_size:  # the dtype alone does not guarantee a fit: look
        low, high = _token_extremes(dataset.tokens[:_VOCAB_SCAN_TOKENS])
        check_token_range(low, high, vocab_size, f"{field} ({prefix!r})")
    return dataset


def _token_extremes(tokens: np.ndarray, chunk: int = 1 << 24) -> tuple[int, int]:
    if len(tokens) == 0:
        return 0, 0
    chunks = [tokens[i:i + chunk] for i in range(0, len(tokens), chunk)]
    return min(int(part.min()) for part in chunks), max(int(part.max()) for part in chunks)


def check_token_range(low: int, high: int, vocab_size: int, source: str) -> None:
    if high >= vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab_size}) must be > the largest token id in the data "
                          f"({high}, from {source})")
    if low < 0:
        raise ConfigError(f"{source}: holds a negative token id ({low}); the data is corrupted")


def no_windows(*, seq_length: int, seed: int, vocab_size: int) -> TokenWindows:
    """A validation split with nothing in it (per-split paths without ``dataset.valid_data_path``)."""
    return TokenWindows(TokenStream([]), start=0, stop=0, seq_length=seq_length, seed=seed, split=1,
                        vocab_size=vocab_size, eod=None)
