"""Weighted blends: the realised mix, purity in the sample index, ranks, resume, splits, the anneal blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anneal.config.dataset import DatasetConfig
from anneal.data.blend import BlendIndex, Phased
from anneal.data.datasets import build_datasets
from anneal.data.indexed import IndexedDatasetWriter
from anneal.data.loader import get_microbatch
from anneal.errors import ConfigError
from data_testing import write_sources

SEQ = 8
VOCAB = 400
SOURCES = ("web", "code", "math", "books")  # their tokens in [0, 99), [100, 199), ...


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    written = write_sources(tmp_path_factory.mktemp("blend"), [40, 70, 100, 130], VOCAB)  # different sizes
    return dict(zip(SOURCES, written, strict=True))


def _source_of(batch: np.ndarray) -> np.ndarray:
    return batch[:, 0] // 100


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.25, 0.15, 0.1), (0.01, 0.99), (3, 1, 1)])
def test_realised_mix_is_within_one_percent_of_the_weights(weights) -> None:
    index = BlendIndex(weights, seed=(1234, 0, 0))
    sources, _ = index.lookup(np.arange(10_000))
    share = np.bincount(sources, minlength=len(weights)) / 10_000
    expected = np.asarray(weights) / sum(weights)
    assert np.abs(share - expected).max() <= 0.01, (share, expected)
    for n in (index.block, 7 * index.block, 10**9 * index.block):  # at block boundaries: within one sample
        assert np.abs(index.counts_before(n) - expected * n).max() <= 1
        assert index.counts_before(n).sum() == n


def test_each_source_reads_its_samples_in_order_without_gaps_or_repeats() -> None:
    index = BlendIndex([0.6, 0.3, 0.1], seed=(7, 0, 0))
    n = 5 * index.block + 123
    sources, source_samples = index.lookup(np.arange(n))
    for k in range(3):
        assert source_samples[sources == k].tolist() == list(range(int((sources == k).sum())))
    assert index.counts_before(n).tolist() == np.bincount(sources, minlength=3).tolist()
    assert index.counts_before(1000).tolist() == np.bincount(sources[:1000], minlength=3).tolist()


def test_lookup_is_a_pure_function_of_seed_and_index() -> None:
    samples = np.array([10**7 + 3, 5, 2048, 5, 999_999, 0])
    first = BlendIndex([0.5, 0.3, 0.2], seed=(1, 0, 0))
    expected = first.lookup(samples)
    for order in (np.arange(len(samples)), np.arange(len(samples))[::-1]):  # fresh object, other order
        fresh = BlendIndex([0.5, 0.3, 0.2], seed=(1, 0, 0))
        got = [fresh.lookup(samples[[i]]) for i in order]
        assert [int(g[0][0]) for g in got] == expected[0][order].tolist()
        assert [int(g[1][0]) for g in got] == expected[1][order].tolist()
    other = BlendIndex([0.5, 0.3, 0.2], seed=(2, 0, 0)).lookup(np.arange(1024))
    assert not np.array_equal(other[0], first.lookup(np.arange(1024))[0])


def test_tiny_weights_get_blocks_long_enough_for_a_share() -> None:
    index = BlendIndex([1, 999], seed=(0, 0, 0))
    assert index.block >= 3000
    sources, _ = index.lookup(np.arange(4 * index.block))
    assert 8 <= int((sources == 0).sum()) <= 16  # 0.1% of ~12k samples


def _blend_cfg(prefixes: dict[str, str], **kwargs) -> DatasetConfig:
    data = [0.6, prefixes["web"], 0.3, prefixes["code"], 0.1, prefixes["math"]]
    return DatasetConfig(kind="indexed", data_path=data, split="90,10,0", **kwargs)


def test_built_blend_reads_the_weights_and_only_the_train_split(prefixes: dict[str, str]) -> None:
    train, valid = build_datasets(_blend_cfg(prefixes), seq_length=SEQ, vocab_size=VOCAB)
    share = np.bincount(_source_of(train.gather(np.arange(10_000))), minlength=3) / 10_000
    assert np.abs(share - [0.6, 0.3, 0.1]).max() <= 0.01
    assert np.bincount(_source_of(valid.gather(np.arange(300))), minlength=3).min() > 0
    for source in train.sources:  # each source is cut by dataset.split on its own
        assert source.start == 0 and source.num_tokens == round(0.9 * len(source.stream))
    for source in valid.sources:
        assert source.start == round(0.9 * len(source.stream))


def test_sample_i_is_the_same_on_one_and_two_ranks_and_after_a_resume(prefixes: dict[str, str]) -> None:
    train, _ = build_datasets(_blend_cfg(prefixes), seq_length=SEQ, vocab_size=VOCAB)
    global_batch, consumed = 16, 16 * 37
    one = np.concatenate([get_microbatch(train, consumed_samples=consumed, microbatch=m, micro_batch_size=4,
                                         dp_rank=0, dp_size=1).numpy() for m in range(4)])
    resumed, _ = build_datasets(_blend_cfg(prefixes), seq_length=SEQ, vocab_size=VOCAB)  # a new process
    two = {(m, r): get_microbatch(resumed, consumed_samples=consumed, microbatch=m, micro_batch_size=4,
                                  dp_rank=r, dp_size=2).numpy() for m in range(2) for r in range(2)}
    rounds = np.concatenate([two[(m, r)] for m in range(2) for r in range(2)])
    assert np.array_equal(one, rounds)
    assert np.array_equal(one, train.gather(np.arange(consumed, consumed + global_batch)))


def test_anneal_blend_takes_over_at_the_anneal_start(prefixes: dict[str, str]) -> None:
    cfg = _blend_cfg(prefixes, anneal_data_path=[1, prefixes["math"], 1, prefixes["books"]])
    train, _ = build_datasets(cfg, seq_length=SEQ, vocab_size=VOCAB, anneal_start=3000)
    assert isinstance(train, Phased)
    before, after = _source_of(train.gather(np.arange(3000))), _source_of(train.gather(np.arange(3000, 6000)))
    assert set(before.tolist()) == {0, 1, 2} and set(after.tolist()) == {2, 3}
    assert abs(float(np.mean(after == 3)) - 0.5) <= 0.01
    plain, _ = build_datasets(_blend_cfg(prefixes), seq_length=SEQ, vocab_size=VOCAB)
    assert np.array_equal(train.gather(np.arange(3000)), plain.gather(np.arange(3000)))
    with pytest.raises(ConfigError, match=r"^dataset.anneal_data_path .* needs a WSD schedule"):
        build_datasets(cfg, seq_length=SEQ, vocab_size=VOCAB)


def test_per_split_blends_read_whole_prefixes(prefixes: dict[str, str]) -> None:
    cfg = DatasetConfig(kind="indexed", train_data_path=[1, prefixes["web"], 1, prefixes["code"]],
                        valid_data_path=[prefixes["books"]])
    train, valid = build_datasets(cfg, seq_length=SEQ, vocab_size=VOCAB)
    assert set(_source_of(train.gather(np.arange(2000))).tolist()) == {0, 1}
    assert set(_source_of(valid.gather(np.arange(len(valid)))).tolist()) == {3}
    assert all(source.num_tokens == len(source.stream) for source in train.sources)
    no_valid = DatasetConfig(kind="indexed", train_data_path=[prefixes["web"]])
    assert len(build_datasets(no_valid, seq_length=SEQ, vocab_size=VOCAB)[1]) == 0


def test_unweighted_prefixes_keep_the_concatenated_stream(prefixes: dict[str, str]) -> None:
    cfg = DatasetConfig(kind="indexed", data_path=[prefixes["web"], prefixes["code"]], split="1,0,0")
    train, _ = build_datasets(cfg, seq_length=SEQ, vocab_size=VOCAB)
    assert type(train).__name__ == "TokenWindows" and len(train.stream.parts) == 2


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_blend_prefix_is_refused_naming_field_and_file(
        prefixes: dict[str, str], tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad"
    if damage == "truncated":
        for suffix in (".bin", ".idx"):
            Path(f"{bad}{suffix}").write_bytes(Path(prefixes["code"] + suffix).read_bytes())
        Path(f"{bad}.bin").write_bytes(Path(f"{bad}.bin").read_bytes()[:-2])
    cfg = DatasetConfig(kind="indexed", data_path=[0.5, prefixes["web"], 0.5, str(bad)])
    expected = "bad.idx: cannot read" if damage == "missing" else "bad.bin: .* truncated"
    with pytest.raises(ConfigError, match=rf"^dataset.data_path\[3\] \('{bad}'\): .*{expected}"):
        build_datasets(cfg, seq_length=SEQ, vocab_size=VOCAB)


def test_a_blend_source_too_small_for_a_window_is_named(prefixes: dict[str, str], tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "tiny", vocab_size=VOCAB) as writer:
        writer.add_document([1, 2, 3])
    cfg = DatasetConfig(kind="indexed", data_path=[0.5, prefixes["web"], 0.5, str(tmp_path / "tiny")])
    with pytest.raises(ConfigError, match=r"^dataset.data_path\[3\] \('.*tiny'\) gives the train split 3 "):
        build_datasets(cfg, seq_length=SEQ, vocab_size=VOCAB)
