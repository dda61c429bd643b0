"""``anneal.data.sources.check_indexed``: what a run checks before it builds indexed data, read from the files'
headers and metadata only. The dry run calls it too, so the two refuse the same data with the same line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anneal.config.dataset import DatasetConfig
from anneal.data.datasets import build_datasets
from anneal.data.indexed import IndexedDatasetWriter
from anneal.data.sources import check_indexed
from anneal.errors import ConfigError
from anneal_testing import run_cli

SEQ = 16


def _prefix(root: Path, name: str = "web", tokens: int = 400, **writer) -> str:
    prefix = str(root / name)
    with IndexedDatasetWriter(prefix, **(writer or {"vocab_size": 300})) as out:
        for start in range(0, tokens, 100):
            out.add_document(np.arange(start, min(start + 100, tokens)) % 255)
    return prefix


def _sidecar(prefix: str, vocab_size: int, sha256: str) -> None:
    tokenizer = {"type": "huggingface", "path": "t.json", "sha256": sha256, "vocab_size": vocab_size,
                 "eod_id": 0, "bos_id": None}
    Path(f"{prefix}.json").write_text(json.dumps({"tokenizer": tokenizer}))


def _missing_idx(root: Path) -> DatasetConfig:
    return DatasetConfig(kind="indexed", data_path=[str(root / "nothere")])


def _missing_bin(root: Path) -> DatasetConfig:
    prefix = _prefix(root)
    Path(f"{prefix}.bin").unlink()
    return DatasetConfig(kind="indexed", data_path=[0.5, _prefix(root, "code"), 0.5, prefix])


def _truncated_bin(root: Path) -> DatasetConfig:
    prefix = _prefix(root)
    with open(f"{prefix}.bin", "r+b") as stream:
        stream.truncate(100)
    return DatasetConfig(kind="indexed", train_data_path=[prefix])


def _not_an_index(root: Path) -> DatasetConfig:
    prefix = _prefix(root)
    Path(f"{prefix}.idx").write_bytes(b"GARBAGE" * 10)
    return DatasetConfig(kind="indexed", data_path=[prefix])


def _truncated_idx(root: Path) -> DatasetConfig:
    prefix = _prefix(root)
    data = Path(f"{prefix}.idx").read_bytes()
    Path(f"{prefix}.idx").write_bytes(data[:-8])
    return DatasetConfig(kind="indexed", data_path=[prefix])


def _float_tokens(root: Path) -> DatasetConfig:
    return DatasetConfig(kind="indexed", data_path=[_prefix(root, dtype=np.float32)])


def _vocab_below_the_tokenizer(root: Path) -> DatasetConfig:
    prefix = _prefix(root)
    _sidecar(prefix, 400, "a" * 64)  # the model's 300 ids are too few
    return DatasetConfig(kind="indexed", data_path=[prefix])


def _two_tokenizers(root: Path) -> DatasetConfig:
    web, code = _prefix(root), _prefix(root, "code")
    _sidecar(web, 256, "a" * 64)
    _sidecar(code, 256, "b" * 64)
    return DatasetConfig(kind="indexed", data_path=[1, web, 1, code])


def _too_small_for_valid(root: Path) -> DatasetConfig:
    return DatasetConfig(kind="indexed", data_path=[_prefix(root, tokens=200)], split="95,5,0")


def _too_small_anneal_blend(root: Path) -> DatasetConfig:
    return DatasetConfig(kind="indexed", data_path=[_prefix(root)], split="1,0,0",
                         anneal_data_path=[1, _prefix(root, "code"), 1, _prefix(root, "hq", tokens=10)])


BROKEN = {
    "missing .idx": (_missing_idx, r"^dataset.data_path\[0\] \('.*nothere'\): .*nothere.idx: cannot read the index "
                                   r"\(No such file or directory\)$"),
    "missing .bin": (_missing_bin, r"^dataset.data_path\[3\] \('.*web'\): .*web.bin: cannot read the token file"),
    "truncated .bin": (_truncated_bin, r"^dataset.train_data_path\[0\] .*web.bin: 100 bytes, but its index promises "
                                       r"400 uint16 tokens"),
    "not an index": (_not_an_index, r"^dataset.data_path\[0\] .*no MMIDIDX header"),
    "truncated .idx": (_truncated_idx, r"^dataset.data_path\[0\] .*web.idx: \d+ bytes, but its header promises"),
    "float tokens": (_float_tokens, r"^dataset.data_path\[0\] .*stores float32 values, not integer token ids$"),
    "vocab below the tokenizer": (_vocab_below_the_tokenizer, r"^model.vocab_size \(300\) must be >= the "
                                                              r"tokenizer's vocabulary \(400 ids"),
    "two tokenizers": (_two_tokenizers, r"^dataset.data_path\[3\] \('.*code'\) was tokenized with"),
    "valid split too small": (_too_small_for_valid, r"^dataset.data_path \(\['.*web'\]\) gives the valid split 10 "
                                                    r"tokens \(dataset.split '95,5,0'\), fewer than one window"),
    "anneal source too small": (_too_small_anneal_blend, r"^dataset.anneal_data_path\[3\] \('.*hq'\) gives the "
                                                         r"train split 10 tokens \(dataset.split '1,0,0'\), fewer than one window"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_the_check_refuses_what_the_build_refuses_with_the_same_line(tmp_path: Path, case: str) -> None:
    make, message = BROKEN[case]
    cfg = make(tmp_path)
    with pytest.raises(ConfigError, match=message) as checked:
        check_indexed(cfg, seq_length=SEQ, vocab_size=300)
    with pytest.raises(ConfigError) as built:
        build_datasets(cfg, seq_length=SEQ, vocab_size=300, anneal_start=0)
    assert str(built.value) == str(checked.value)


def test_the_check_passes_data_the_build_accepts(tmp_path: Path) -> None:
    web, code = _prefix(tmp_path), _prefix(tmp_path, "code", tokens=300, vocab_size=70_000)  # int32 tokens
    _sidecar(web, 257, "a" * 64)
    cfg = DatasetConfig(kind="indexed", data_path=[0.7, web, 0.3, code], split="90,10,0")
    check_indexed(cfg, seq_length=SEQ, vocab_size=300)
    build_datasets(cfg, seq_length=SEQ, vocab_size=300)


@pytest.mark.parametrize("data_path", ["[data/tinyy]", "data/tinyy"])  # one prefix, with or without brackets
def test_dry_run_refuses_a_data_path_that_does_not_exist(tmp_path: Path, data_path: str) -> None:
    result = run_cli("dataset=indexed", f"dataset.data_path={data_path}", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr == ("anneal: error: dataset.data_path[0] ('data/tinyy'): data/tinyy.idx: cannot read the "
                             "index (No such file or directory)\n")
    assert "# derived" not in result.stdout  # refused before any table, as the run is before building
