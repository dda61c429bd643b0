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


def _with_bos_template(tokenizer_file: Path):
    """The fixture's tokenizer plus <s>/</s>, its post-processor putting <s> first (as Llama 3's does)."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return tokenizer


def test_hf_directory_from_transformers_honours_its_eos_and_bos(tmp_path: Path, tokenizer_file: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_object=_with_bos_template(tokenizer_file), bos_token="<s>",
                                        eos_token="</s>")
    reference.save_pretrained(tmp_path / "hf")
    tokenizer = load_tokenizer(tmp_path / "hf")
    text = "def add(a, b): return the fox"
    # Megatron's HuggingFaceTokenizer: the tokenizer's input_ids (special tokens included), then the EOS
    assert tokenizer.document(text) == [*reference(text).input_ids, reference.eos_token_id]
    assert tokenizer.document(text)[0] == reference.bos_token_id == tokenizer.bos
    assert tokenizer.eod == reference.eos_token_id != reference.convert_tokens_to_ids("<|endoftext|>")
    info = tokenizer.describe()
    assert (info["eod_token"], info["bos_token"], info["vocab_size"]) == ("</s>", "<s>", len(reference))


def test_add_bos_token_prepends_bos_once(tmp_path: Path, tokenizer_file: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_text(tokenizer_file.read_text())
    (plain / "tokenizer_config.json").write_text(
        '{"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|endoftext|>", "add_bos_token": true}')
    tokenizer = load_tokenizer(plain)
    ids = HFTokenizer(tokenizer_file).encode("the fox")
    assert tokenizer.document("the fox") == [tokenizer.bos, *ids, tokenizer.eod]
    templated = tmp_path / "templated"
    templated.mkdir()
    _with_bos_template(tokenizer_file).save(str(templated / "tokenizer.json"))
    (templated / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
    document = load_tokenizer(templated).document("the fox")
    assert document[:2] != [document[0]] * 2 and document.count(document[0]) == 1  # not doubled


def test_directory_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--tokenizer-file .*has no tokenizer.json"):
        HFTokenizer(tmp_path)


def test_a_hub_id_is_read_from_the_cache_and_a_missing_one_refused_offline(tmp_path: Path,
                                                                          tokenizer_file: Path,
                                                                          monkeypatch) -> None:
    from hf_cache import add_repo, offline_hub

    hub = offline_hub(monkeypatch, tmp_path / "home")
    snapshot = add_repo(hub, "Tiny-Org/Tok", tokenizer_file.parent)
    tokenizer = load_tokenizer("Tiny-Org/Tok")
    assert tokenizer.file == snapshot / "tokenizer.json" and tokenizer.encode("the fox") == \
        load_tokenizer(tokenizer_file).encode("the fox")
    refusal = r"^--tokenizer-file \('Tiny-Org/Other'\) is neither a directory nor a hub id in .*HF_HUB_OFFLINE"
    with pytest.raises(ConfigError, match=refusal):
        load_tokenizer("Tiny-Org/Other")
