"""ByteTokenizer and the local Hugging Face tokenizer.json wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest

from anneal.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from anneal.errors import ConfigError


def test_byte_tokenizer_encodes_utf8_bytes_with_eod_256() -> None:
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eod) == (257, 256)
    assert tokenizer.encode("aé✓") == list("aé✓".encode()) == [97, 195, 169, 226, 156, 147]
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_hf_tokenizer_reads_local_file_and_finds_endoftext(tokenizer_file: Path) -> None:
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tokenizer_file))
    tokenizer = load_tokenizer(tokenizer_file)
    text = "def add(a, b): return the fox"
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.eod == reference.token_to_id("<|endoftext|>")
    assert tokenizer.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert max(tokenizer.encode(text)) < tokenizer.vocab_size


def test_hf_tokenizer_without_the_named_eod_token_is_refused(tokenizer_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--eod-token \('<eot>'\).*tokenizer.json"):
        HFTokenizer(tokenizer_file, eod_token="<eot>")


def test_missing_tokenizer_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--tokenizer-file .*nope.json"):
        HFTokenizer(tmp_path / "nope.json")
