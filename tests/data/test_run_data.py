"""``anneal.data.datasets.build_data``: the run's data in one call, its validation sets (the main split, its
blend components, the held-out sets of ``dataset.extra_valid_data_path``) and the end-of-document id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anneal.config.dataset import DatasetConfig
from anneal.data.datasets import build_data, build_datasets
from anneal.data.indexed import IndexedDatasetWriter
from anneal.data.metadata import write_metadata
from anneal.data.metadata import check_tokenizers
from anneal.data.sources import check_indexed
from anneal.data.tokenizer import ByteTokenizer
from anneal.data.windows import windows_in
from anneal.errors import ConfigError
from anneal_testing import run_cli
from data_testing import write_sources

SEQ = 8
VOCAB = 400


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three sources, source k's tokens in [100 k, 100 k + 99): a window's first token // 100 names it."""
    return write_sources(tmp_path_factory.mktemp("run_data"), [40, 60, 50], VOCAB)


def _build(cfg: DatasetConfig, vocab_size: int = VOCAB):
    return build_data(cfg, seq_length=SEQ, vocab_size=vocab_size, schedule=None)


def test_a_weighted_validation_blend_names_its_components_and_maps_each_sample(prefixes: list[str]) -> None:
    web, code, _ = prefixes
    cfg = DatasetConfig(kind="indexed", train_data_path=[web], valid_data_path=[0.7, web, 0.3, code])
    (valid,) = _build(cfg).valid
    assert valid.key == "valid_loss" and valid.components == ("valid_loss/s0", "valid_loss/s1")
    samples = np.arange(3000)
    source = valid.data.gather(samples)[:, 0] // 100  # which prefix's tokens each sample holds
    which = valid.component_of(samples)
    assert which.dtype == np.int64 and np.array_equal(which, source)
    assert set(which.tolist()) == {0, 1}


def test_the_main_set_reads_what_build_datasets_reads(prefixes: list[str]) -> None:
    cfg = DatasetConfig(kind="indexed", data_path=[0.5, prefixes[0], 0.5, prefixes[1]], split="90,10,0")
    data = _build(cfg)
    _, valid = build_datasets(cfg, seq_length=SEQ, vocab_size=VOCAB)
    assert [s.key for s in data.valid] == ["valid_loss"]
    assert np.array_equal(data.valid[0].data.gather(np.arange(500)), valid.gather(np.arange(500)))
    one_source = DatasetConfig(kind="indexed", data_path=[prefixes[0], prefixes[1]], split="90,10,0")
    assert _build(one_source).valid[0].components == ()  # an unweighted list is one stream


def test_repeated_basenames_get_their_index(tmp_path: Path, prefixes: list[str]) -> None:
    other = write_sources(tmp_path, [40])[0]  # also named s0
    cfg = DatasetConfig(kind="indexed", train_data_path=[prefixes[0]],
                        valid_data_path=[1, prefixes[0], 1, other, 1, prefixes[1]])
    assert _build(cfg).valid[0].components == ("valid_loss/s0_0", "valid_loss/s0_1", "valid_loss/s1")


def test_held_out_sets_are_read_whole_under_their_own_keys(prefixes: list[str]) -> None:
    web, code, math = prefixes
    cfg = DatasetConfig(kind="indexed", data_path=[web], split="90,10,0",
                        extra_valid_data_path={"code": [code], "mixed": [1, code, 1, math]})
    data = _build(cfg)
    assert [(s.key, s.components) for s in data.valid] == [
        ("valid_loss", ()), ("valid_loss/code", ()),
        ("valid_loss/mixed", ("valid_loss/mixed/s1", "valid_loss/mixed/s2"))]
    code_set = data.valid[1].data
    assert code_set.start == 0 and code_set.num_tokens == len(code_set.stream)  # whole, not cut by split
    assert len(code_set) == windows_in(len(code_set.stream), SEQ)
    assert set((code_set.gather(np.arange(len(code_set)))[:, 0] // 100).tolist()) == {1}
    mixed = data.valid[2]
    assert np.array_equal(mixed.component_of(np.arange(500)) + 1, mixed.data.gather(np.arange(500))[:, 0] // 100)
    alone = _build(DatasetConfig(kind="indexed", data_path=[web], split="90,10,0",
                                 extra_valid_data_path={"mixed": [1, code, 1, math]}))
    assert np.array_equal(alone.valid[1].data.gather(np.arange(500)), mixed.data.gather(np.arange(500)))


def test_held_out_sets_alone_are_validation_data(prefixes: list[str]) -> None:
    cfg = DatasetConfig(kind="indexed", train_data_path=[prefixes[0]], extra_valid_data_path={"code": prefixes[1]})
    cfg.check_against(VOCAB, "cosine", eval_interval=10)  # an evaluation has a set to score
    assert [s.key for s in _build(cfg).valid] == ["valid_loss/code"]
    assert _build(DatasetConfig(kind="indexed", train_data_path=[prefixes[0]])).valid == []


@pytest.mark.parametrize(("extra", "message"), [
    ({"s0": ["/d/x"]}, r"^dataset.extra_valid_data_path \(\{'s0': \['/d/x'\]\}\) gives the metric key "
                       r"'valid_loss/s0' twice \(as a component of valid_loss and as valid_loss/s0\); rename the set$"),
    ({"bad name": ["/d/x"]}, r"^dataset.extra_valid_data_path has a set named 'bad name'; a name must be"),
    ({"": ["/d/x"]}, r"^dataset.extra_valid_data_path has a set named ''; a name must be"),
    ({"wiki": []}, r"^dataset.extra_valid_data_path.wiki \(\[\]\) must name at least one prefix$"),
    ({"wiki": ["/d/x.bin"]}, r"^dataset.extra_valid_data_path.wiki\[0\] \('/d/x.bin'\) must be a prefix without"),
])
def test_bad_held_out_sets_are_refused_naming_the_field(extra: dict, message: str) -> None:
    cfg = DatasetConfig(kind="indexed", train_data_path=["/d/t"], valid_data_path=[1, "/d/s0", 1, "/d/s1"],
                        extra_valid_data_path=extra)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_held_out_sets_are_read_only_for_indexed_data() -> None:
    with pytest.raises(ConfigError, match=r"^dataset.extra_valid_data_path \(\{'w': \['/x'\]\}\) is only read "
                                          r"when dataset.kind is 'indexed'"):
        DatasetConfig(extra_valid_data_path={"w": "/x"}).validate()


def test_a_held_out_set_without_a_window_is_refused_before_the_build(tmp_path: Path, prefixes: list[str]) -> None:
    tiny = str(tmp_path / "tiny")
    with IndexedDatasetWriter(tiny, vocab_size=VOCAB) as writer:
        writer.add_document([1, 2, 3])
    cfg = DatasetConfig(kind="indexed", data_path=[prefixes[0]], extra_valid_data_path={"tiny": [tiny]})
    message = (r"^dataset.extra_valid_data_path.tiny \(\['.*tiny'\]\) gives the held-out set 'tiny' 3 tokens, "
               r"fewer than one window of seq_length \+ 1 = 9$")
    with pytest.raises(ConfigError, match=message):
        check_indexed(cfg, seq_length=SEQ, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=message):
        _build(cfg)


def test_eod_of_each_kind(prefixes: list[str], tmp_path: Path) -> None:
    assert _build(DatasetConfig(kind="stdlib", stdlib_max_bytes=100_000), vocab_size=257).eod == 256
    assert _build(DatasetConfig(kind="mock", mock_num_tokens=20_000), vocab_size=1000).eod == 999
    assert _build(DatasetConfig(kind="indexed", data_path=[prefixes[0]])).eod is None  # no sidecar
    bare = write_sources(tmp_path, [30, 30])
    for prefix in bare:
        write_metadata(prefix, tokenizer=ByteTokenizer().describe(), stats={})
    cfg = DatasetConfig(kind="indexed", data_path=[1, bare[0], 1, bare[1]])
    assert _build(cfg, vocab_size=257).eod == 256
    mixed = DatasetConfig(kind="indexed", data_path=[1, bare[0], 1, prefixes[2]])
    recorded = check_tokenizers(mixed.prefixes(), VOCAB)
    assert recorded.eod is None  # one prefix records none: its documents' ends are unknown
    assert recorded.without_eod == ("dataset.data_path[3]", prefixes[2])


def test_prefixes_recording_different_eods_are_refused(tmp_path: Path) -> None:
    a, b = write_sources(tmp_path, [30, 30])
    tokenizer = ByteTokenizer().describe()
    write_metadata(a, tokenizer=tokenizer, stats={})
    write_metadata(b, tokenizer={**tokenizer, "eod_id": 255}, stats={})
    cfg = DatasetConfig(kind="indexed", data_path=[1, a, 1, b])
    with pytest.raises(ConfigError, match=r"^dataset.data_path\[3\] \('.*s1'\) records end-of-document id 255, "
                                          r"but dataset.data_path\[1\] \('.*s0'\) records 256"):
        cfg.check_against(257, "cosine", eval_interval=None)


def test_a_document_flag_without_an_eod_is_refused_naming_field_and_prefix(prefixes: list[str], compose) -> None:
    message = (rf"^dataset.reset_attention_mask \(True\) needs the data's end-of-document id, but "
               rf"dataset.data_path\[0\] \('{prefixes[0]}'\) records none in {prefixes[0]}.json; preprocess it "
               r"with scripts/preprocess_data.py")
    cfg = compose("dataset=indexed", f"dataset.data_path=[{prefixes[0]}]", "dataset.reset_attention_mask=true",
                  f"model.vocab_size={VOCAB}")
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    with pytest.raises(ConfigError, match=message):
        _build(cfg.dataset)
    for flag in ("reset_position_ids", "eod_mask_loss"):  # the other kinds know their eod
        compose(f"dataset.{flag}=true").validate()
        compose("dataset=mock", f"dataset.{flag}=true").validate()


def test_the_entry_point_refuses_a_document_flag_without_an_eod(prefixes: list[str], tmp_path: Path) -> None:
    result = run_cli("dataset=indexed", f"dataset.data_path=[{prefixes[0]}]", "dataset.reset_attention_mask=true",
                     f"model.vocab_size={VOCAB}", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr == (f"anneal: error: dataset.reset_attention_mask (True) needs the data's "
                             f"end-of-document id, but dataset.data_path[0] ('{prefixes[0]}') records none in "
                             f"{prefixes[0]}.json; preprocess it with scripts/preprocess_data.py\n")


def test_held_out_sets_type_check_through_hydra(compose) -> None:
    cfg = compose("dataset=indexed", "dataset.data_path=[/d/web]", "+dataset.extra_valid_data_path.wiki=[/d/wiki]")
    cfg.validate()
    assert cfg.dataset.extra_valid_data_path == {"wiki": ["/d/wiki"]}
    with pytest.raises(ConfigError, match=r"^dataset.extra_valid_data_path.wiki \(3\) must be a list of strings"):
        compose("dataset=indexed", "dataset.data_path=[/d/web]", "+dataset.extra_valid_data_path.wiki=3").validate()
