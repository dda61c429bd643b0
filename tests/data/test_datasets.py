"""Fixed-window GPT datasets: determinism, epochs, splits, the three kinds and their errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from anneal.config.dataset import DatasetConfig
from anneal.data import windows
from anneal.data.builtin import stdlib_sources, stdlib_tokens
from anneal.data.datasets import build_datasets
from anneal.data.windows import TokenStream, split_bounds
from anneal.data.indexed import IndexedDatasetWriter
from anneal.errors import ConfigError

SEQ = 16


def _mock(seed: int = 1234, num_tokens: int = 20_000, split: str = "969,30,1") -> DatasetConfig:
    return DatasetConfig(kind="mock", seed=seed, mock_num_tokens=num_tokens, split=split)


def _indexed(tmp_path: Path, documents: list[list[list[int]]], **kwargs) -> DatasetConfig:
    prefixes = []
    for i, docs in enumerate(documents):
        prefix = str(tmp_path / f"part{i}")
        with IndexedDatasetWriter(prefix, vocab_size=kwargs.pop("vocab_size", 257)) as writer:
            for doc in docs:
                writer.add_document(doc)
        prefixes.append(prefix)
    return DatasetConfig(kind="indexed", data_path=prefixes, **kwargs)


def test_sample_is_a_pure_function_of_seed_and_index() -> None:
    first, _ = build_datasets(_mock(), seq_length=SEQ, vocab_size=100)
    second, _ = build_datasets(_mock(), seq_length=SEQ, vocab_size=100)
    samples = np.arange(3 * len(first))  # three epochs
    assert np.array_equal(first.gather(samples), second.gather(samples))
    # order of access and cache state do not matter
    later = [second[i] for i in (2 * len(first) + 5, 7, len(first) + 3)]
    assert np.array_equal(np.stack(later), first.gather([2 * len(first) + 5, 7, len(first) + 3]))


def test_different_seeds_give_different_orders() -> None:
    a, _ = build_datasets(_mock(seed=1), seq_length=SEQ, vocab_size=100)
    b, _ = build_datasets(_mock(seed=2), seq_length=SEQ, vocab_size=100)
    assert not np.array_equal(a.windows(np.arange(len(a))), b.windows(np.arange(len(b))))
    assert not np.array_equal(a.gather(np.arange(8)), b.gather(np.arange(8)))


def test_each_epoch_visits_every_window_once_in_a_new_order() -> None:
    train, _ = build_datasets(_mock(), seq_length=SEQ, vocab_size=100)
    n = len(train)
    epoch0, epoch1 = train.windows(np.arange(n)), train.windows(np.arange(n, 2 * n))
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)
    # a batch straddling the boundary takes the end of epoch 0 and the start of epoch 1
    assert train.windows([n - 1, n]).tolist() == [epoch0[-1], epoch1[0]]


def test_windows_are_consecutive_slices_of_the_concatenated_documents(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [[[*rng.integers(0, 256, size=n).tolist(), 256] for n in rng.integers(1, 40, size=30)]
             for _ in range(2)]  # two prefixes: windows cross the file boundary
    cfg = _indexed(tmp_path, parts, split="1,0,0")
    train, valid = build_datasets(cfg, seq_length=SEQ, vocab_size=257)
    stream = np.array([token for part in parts for doc in part for token in doc])
    assert len(valid) == 0 and len(train) == (len(stream) - 1) // SEQ
    for sample in range(len(train)):
        window = int(train.windows([sample])[0])
        assert train[sample].tolist() == stream[window * SEQ: window * SEQ + SEQ + 1].tolist()


def test_train_and_valid_read_disjoint_token_ranges_by_split_weights() -> None:
    train, valid = build_datasets(_mock(num_tokens=100_000, split="90,10,0"), seq_length=SEQ, vocab_size=100)
    assert split_bounds(100_000, (90, 10, 0)) == [0, 90_000, 100_000, 100_000]
    assert (train.start, train.num_tokens, valid.start, valid.num_tokens) == (0, 90_000, 90_000, 10_000)
    assert len(train) == (90_000 - 1) // SEQ and len(valid) == (10_000 - 1) // SEQ
    assert not np.array_equal(train.permutation(0)[:50], valid.permutation(0)[:50])


def test_mock_tokens_are_in_vocab_with_documents_ending_in_eod() -> None:
    train, _ = build_datasets(_mock(num_tokens=50_000), seq_length=SEQ, vocab_size=1000)
    tokens = train.gather(np.arange(len(train)))
    assert tokens.min() >= 0 and tokens.max() == 999 and train.eod == 999
    assert 5 < (tokens[:, :-1] == 999).sum() < 100  # documents of ~2000 tokens


def test_vocab_too_small_for_the_data_names_model_vocab_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model.vocab_size \(256\) must be > the largest token id .*256"):
        build_datasets(DatasetConfig(kind="stdlib"), seq_length=SEQ, vocab_size=256)
    cfg = _indexed(tmp_path, [[[1, 2, 3] * 20 + [900]]], vocab_size=1000, split="1,0,0")
    with pytest.raises(ConfigError, match=r"^model.vocab_size \(500\) .*\(900, from dataset.data_path\[0\]"):
        build_datasets(cfg, seq_length=SEQ, vocab_size=500)


def test_tokens_past_the_build_scan_are_caught_when_read(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(windows, "_VOCAB_SCAN_TOKENS", 10)  # stands in for a prefix too big to scan
    cfg = _indexed(tmp_path, [[[1, 2, 3] * 5 + [900] + [1, 2, 3] * 15]], vocab_size=1000, split="1,0,0")
    train, _ = build_datasets(cfg, seq_length=SEQ, vocab_size=500)
    with pytest.raises(ConfigError, match=r"^model.vocab_size \(500\) .*\(900, from the train split\)"):
        train.gather(np.arange(len(train)))


def test_too_little_data_for_one_window_names_the_size_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^dataset.stdlib_max_bytes \(100\) gives the train split"):
        build_datasets(DatasetConfig(stdlib_max_bytes=100), seq_length=4096, vocab_size=257)
    with pytest.raises(ConfigError, match=r"^dataset.data_path \(\[.*part0'\]\) gives the train split"):
        build_datasets(_indexed(tmp_path, [[[1, 2, 256]]]), seq_length=SEQ, vocab_size=257)
    with pytest.raises(ConfigError, match=r"^dataset.split \('969,1,0'\) gives the valid split"):
        build_datasets(_mock(num_tokens=2000, split="969,1,0"), seq_length=SEQ, vocab_size=100)


def test_corrupted_prefix_is_refused_naming_field_and_file(tmp_path: Path) -> None:
    cfg = _indexed(tmp_path, [[[1, 2, 3] * 40]])
    idx = tmp_path / "part0.idx"
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(ConfigError, match=rf"^dataset.data_path\[0\] .*{idx}"):
        build_datasets(cfg, seq_length=SEQ, vocab_size=257)


def test_stream_reads_across_parts() -> None:
    stream = TokenStream([np.arange(5), np.array([], dtype=np.int64), np.arange(5, 12, dtype=np.uint16)])
    assert len(stream) == 12
    assert stream.read(3, 6).tolist() == [3, 4, 5, 6, 7, 8]
    assert stream.read(1, 3).tolist() == [1, 2, 3] and np.shares_memory(stream.read(1, 3), stream.parts[0])
    with pytest.raises(IndexError):
        stream.read(10, 3)


def test_stdlib_sources_are_sorted_and_skip_tests_third_party_and_empty_files(tmp_path: Path) -> None:
    for name, text in {"b.py": "bb", "a.py": "a", "notes.txt": "x", "pkg/c.py": "ccc", "test/t.py": "t",
                       "site-packages/s.py": "s", "pkg/tests/u.py": "u", "pkg/__init__.py": ""}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert stdlib_sources(100, tmp_path) == [b"a", b"bb", b"ccc"]
    assert stdlib_sources(4, tmp_path) == [b"a", b"bb", b"c"]  # cut off at the byte budget
    assert stdlib_tokens(4, tmp_path).tolist() == [97, 256, 98, 98, 256, 99, 256]


def test_stdlib_dataset_is_real_python_of_a_sane_size() -> None:
    cfg = DatasetConfig()  # the shipped default size
    start = time.perf_counter()
    train, valid = build_datasets(cfg, seq_length=1024, vocab_size=257)
    seconds = time.perf_counter() - start
    print(f"\nstdlib build: {seconds:.3f} s, {len(train.stream)} tokens, {len(train)} + {len(valid)} windows")
    num_tokens = len(train.stream)
    files = int(np.count_nonzero(train.stream.parts[0] == 256))
    assert num_tokens == cfg.stdlib_max_bytes + files  # the stdlib holds more than 8 MiB of sources
    assert files > 100 and len(train) > 7000 and len(valid) > 200
    head = train.stream.read(0, 200_000)
    first_file = head[: int(np.argmax(head == 256))].astype(np.uint8).tobytes()
    compile(first_file.decode("utf-8"), "<first stdlib file>", "exec")  # real, whole Python source
