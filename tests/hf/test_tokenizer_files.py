"""The tokenizer an export carries: anneal's byte tokenizer as a byte-level tokenizer.json, or none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hf_helpers import build, model_config, save_checkpoint  # noqa: E402

from anneal.data.tokenizer import ByteTokenizer  # noqa: E402
from anneal.hf.exporter import export_checkpoint  # noqa: E402
from anneal.hf.tokenizer_files import byte_tokenizer, run_tokenizer  # noqa: E402

TEXTS = ["plain ASCII, with  two spaces\tand a tab\n", "Zwölf Boxkämpfer jagen Viktor über den Deich",
         "日本語のテキスト 🙂🚀", " leading space", "", "\x00\x7f control bytes", "a" * 300]


@pytest.fixture(scope="module")
def stdlib_export(tmp_path_factory) -> Path:
    """The export of a checkpoint of a ``dataset.kind=stdlib`` run (byte-level, no metadata file)."""
    root = tmp_path_factory.mktemp("stdlib_export")
    cfg = model_config(True)
    save_checkpoint(root / "ck", build(cfg), cfg, {"dataset": {"kind": "stdlib"}})
    export_checkpoint(root / "ck", root / "hf", max_shard_bytes=10**9)
    return root / "hf"


@pytest.mark.parametrize("text", TEXTS)
def test_autotokenizer_on_a_byte_runs_export_gives_the_byte_ids_and_decodes_back(stdlib_export, text) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stdlib_export)
    ids = tokenizer.encode(text)
    assert ids == ByteTokenizer().encode(text)
    assert tokenizer.decode(ids) == text


def test_the_byte_tokenizers_eos_is_the_end_of_document_id(stdlib_export) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stdlib_export)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 256)
    assert tokenizer.bos_token_id is None
    assert tokenizer.decode([104, 105, 256], skip_special_tokens=True) == "hi"
    config = json.loads((stdlib_export / "config.json").read_text())
    assert config["eos_token_id"] == 256 and "bos_token_id" not in config
    assert byte_tokenizer().encode("hi<|endoftext|>") == [104, 105, 256]  # the token's text, as in GPT-2's


@pytest.mark.parametrize("dataset", [None, {"kind": "mock"}, {"kind": "indexed", "data_path": ["/no/such"]}])
def test_a_run_with_no_known_tokenizer_has_none_and_says_why(dataset) -> None:
    from anneal.errors import ConfigError

    tokenizer = run_tokenizer(dataset, 320)
    assert not tokenizer.byte and not tokenizer.copy.files and "records no tokenizer" in tokenizer.missing
    with pytest.raises(ConfigError, match="no tokenizer"):
        tokenizer.load(model_config(True))


def test_a_dataset_config_object_gives_the_same_tokenizer_as_its_dict() -> None:
    from anneal.config.dataset import DatasetConfig

    assert run_tokenizer(DatasetConfig(kind="stdlib"), 320).byte
    assert run_tokenizer(DatasetConfig(kind="mock"), 320).missing
