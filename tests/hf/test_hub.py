"""Hub ids (``org/name``) where a Hugging Face directory is expected, read from a local cache (anneal.hf.hub).

The cache is laid out as ``huggingface_hub`` writes it (``tests/hf_cache.py``) and ``HF_HUB_OFFLINE=1`` is
set: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_cache import COMMIT, add_repo, offline_hub  # noqa: E402
from hf_helpers import build, model_config, save_checkpoint, save_hf, token_ids  # noqa: E402

from anneal.errors import ConfigError  # noqa: E402
from anneal.hf.hub import looks_like_hub_id, resolve_model_dir  # noqa: E402
from anneal.hf.importer import check_pretrained, load_pretrained  # noqa: E402

FIELD = "checkpoint.pretrained_checkpoint"


def test_a_hub_id_in_the_offline_cache_starts_the_model_from_its_weights(tmp_path: Path, monkeypatch) -> None:
    hub = offline_hub(monkeypatch, tmp_path / "home")
    cfg = model_config(False)
    hf_model = save_hf(tmp_path / "saved", cfg)
    snapshot = add_repo(hub, "Tiny-Org/Qwen3-Tiny", tmp_path / "saved")
    assert resolve_model_dir("Tiny-Org/Qwen3-Tiny", FIELD) == snapshot and snapshot.name == COMMIT
    check_pretrained(cfg, "Tiny-Org/Qwen3-Tiny")  # checked before anything is built
    model, optimizer, _ = build(cfg)
    load_pretrained("Tiny-Org/Qwen3-Tiny", model, optimizer, cfg)
    ids = token_ids(cfg, seed=5)
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() < 1e-5


def test_a_hub_id_missing_from_the_offline_cache_is_one_line_naming_field_id_and_cache(
    tmp_path: Path, monkeypatch
) -> None:
    hub = offline_hub(monkeypatch, tmp_path / "home")
    with pytest.raises(ConfigError) as error:
        check_pretrained(model_config(False), "Qwen/Qwen3-0.6B")
    message = str(error.value)
    assert message.startswith(f"{FIELD} ('Qwen/Qwen3-0.6B') is neither a directory nor a hub id in")
    assert str(hub) in message and "HF_HUB_OFFLINE is set" in message and "\n" not in message


@pytest.mark.parametrize("value, hub_id", [("Qwen/Qwen3-0.6B", True), ("org/name.v2", True),
                                           ("/models/Qwen3", False), ("./a/b", False), ("a/b/c", False),
                                           ("../b", False), ("name", False)])
def test_only_org_slash_name_is_read_as_a_hub_id(value: str, hub_id: bool) -> None:
    assert looks_like_hub_id(value) is hub_id
    if not hub_id:  # left unchanged, for the caller's own "not a directory" error
        assert resolve_model_dir(value, FIELD) == Path(value)


def test_a_tokenizer_from_the_hub_cache_is_exported_from_its_snapshot(tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    """The recorded tokenizer.json is the snapshot's (a symlink into blobs/): the export checks and copies it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from anneal.data.metadata import write_metadata
    from anneal.data.tokenizer import load_tokenizer
    from anneal.hf.cli import main
    from tokenizers import Tokenizer, models, pre_tokenizers

    hub = offline_hub(monkeypatch, tmp_path / "home")
    words = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}, unk_token="<|endoftext|>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    saved = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|endoftext|>")
    saved.save_pretrained(tmp_path / "tok")
    add_repo(hub, "Tiny-Org/Tok", tmp_path / "tok")
    tokenizer = load_tokenizer("Tiny-Org/Tok")
    assert tokenizer.document("a b") == [1, 2, 0]
    prefix = tmp_path / "data" / "corpus"
    prefix.parent.mkdir()
    write_metadata(prefix, tokenizer=tokenizer.describe(), stats={"documents": 1})
    cfg = model_config(True)
    save_checkpoint(tmp_path / "ck", build(cfg), cfg, {"dataset": {"data_path": [str(prefix)]}})
    main([str(tmp_path / "ck"), str(tmp_path / "out")])
    assert "anneal: note" not in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("a b")["input_ids"] == [1, 2]


def test_export_given_a_hub_id_says_it_is_a_model_already(tmp_path: Path, monkeypatch) -> None:
    from anneal.hf.exporter import export_checkpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^CHECKPOINT \(Qwen/Qwen3-0.6B\) is not a directory; .*"
                                          r"checkpoint.pretrained_checkpoint=Qwen/Qwen3-0.6B$"):
        export_checkpoint("Qwen/Qwen3-0.6B", tmp_path / "out", max_shard_bytes=10**9)
