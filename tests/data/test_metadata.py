"""The tokenizer sidecar <prefix>.json: the model's vocabulary and a blend's tokenizers are checked by it."""

from __future__ import annotations

from pathlib import Path

import pytest

from anneal.data.metadata import check_tokenizers, padded_vocab_size, write_metadata
from anneal.data.tokenizer import ByteTokenizer, HFTokenizer
from anneal.errors import ConfigError


def _sidecar(prefix: Path, tokenizer) -> str:
    write_metadata(prefix, tokenizer=tokenizer.describe(), stats={})
    return str(prefix)


def test_a_model_vocabulary_below_the_tokenizers_is_refused(tmp_path: Path, tokenizer_file: Path) -> None:
    prefix = _sidecar(tmp_path / "corpus", HFTokenizer(tokenizer_file))
    check_tokenizers([("dataset.data_path[0]", prefix)], 320)
    with pytest.raises(ConfigError, match=r"^model.vocab_size \(319\) must be >= the tokenizer's "
                                          r"vocabulary \(320 ids, huggingface tokenizer .*tokenizer.json "
                                          r"sha256 \w{12}\) .*corpus.json for dataset.data_path\[0\]; "
                                          r".* 384$"):
        check_tokenizers([("dataset.data_path[0]", prefix)], 319)


def test_the_root_config_refuses_it_before_training(tmp_path: Path, tokenizer_file: Path, compose) -> None:
    prefix = _sidecar(tmp_path / "corpus", HFTokenizer(tokenizer_file))
    data = f"dataset.data_path=[0.5,/elsewhere/x,0.5,{prefix}]"
    with pytest.raises(ConfigError, match=r"^model.vocab_size \(300\) .*for dataset.data_path\[3\]"):
        compose("dataset=indexed", data, "model.vocab_size=300").validate()
    compose("dataset=indexed", data, "model.vocab_size=384").validate()  # /elsewhere/x: no sidecar, no check


def test_a_blend_of_different_tokenizers_is_refused(tmp_path: Path, tokenizer_file: Path) -> None:
    hf = _sidecar(tmp_path / "hf", HFTokenizer(tokenizer_file))
    byte = _sidecar(tmp_path / "byte", ByteTokenizer())
    with pytest.raises(ConfigError, match=r"^dataset.data_path\[3\] \('.*byte'\) was tokenized with byte "
                                          r"tokenizer .* but dataset.data_path\[1\] \('.*hf'\) with "
                                          r"huggingface"):
        check_tokenizers([("dataset.data_path[1]", hf), ("dataset.data_path[3]", byte)], 1000)


def test_a_damaged_sidecar_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "corpus.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^dataset.train_data_path\[0\] \('.*corpus'\): .*corpus.json is "):
        check_tokenizers([("dataset.train_data_path[0]", str(tmp_path / "corpus"))], 1000)


def test_megatron_padding() -> None:
    assert [padded_vocab_size(n) for n in (257, 320, 384, 50257, 151665)] == [384, 384, 384, 50304, 151680]
