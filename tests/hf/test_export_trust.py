"""An export copies only verified tokenizer files: a dataset's ``PREFIX.json`` is data, never a copy order."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hf_helpers import build, model_config, save_checkpoint  # noqa: E402

from anneal.hf.exporter import export_checkpoint  # noqa: E402

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
WEIGHTS = {"config.json", "generation_config.json", "model.safetensors"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """One saved checkpoint whose run reads ``PREFIX``; each test writes ``PREFIX.json`` anew."""
    root = tmp_path_factory.mktemp("export_trust")
    prefix = root / "data" / "corpus_text_document"
    prefix.parent.mkdir()
    cfg = model_config(True)
    save_checkpoint(root / "ck", build(cfg), cfg, {"dataset": {"kind": "indexed", "data_path": [str(prefix)]}})
    return root / "ck", prefix


def _tokenizer_json(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def _record(prefix: Path, path: Path | str, sha256: str | None = None, eod_id: object = 0) -> None:
    digest = sha256 if sha256 is not None else (
        hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else "0" * 64)
    tokenizer = {"type": "huggingface", "path": str(path), "sha256": digest, "vocab_size": 3,
                 "eod_id": eod_id, "bos_id": None}
    record = {"format": "anneal-indexed-metadata", "version": 1, "tokenizer": tokenizer}
    Path(f"{prefix}.json").write_text(json.dumps(record))


def _export_with_cli(ck: Path, out: Path, capsys) -> tuple[set[str], str]:
    from anneal.hf.cli import main

    main([str(ck), str(out)])  # returns normally: the weights were exported
    return {p.name for p in out.iterdir()}, capsys.readouterr().out


def _no_secret_in(out: Path) -> bool:
    return all(SECRET[:35] not in p.read_bytes() for p in out.iterdir())


def test_the_recorded_tokenizer_is_copied_with_the_files_beside_it_and_its_ids(checkpoint, tmp_path) -> None:
    ck, prefix = checkpoint
    tokenizer = _tokenizer_json(tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\na b\n")
    _record(prefix, tokenizer)
    export = export_checkpoint(ck, tmp_path / "hf", max_shard_bytes=10**9)
    assert export.refused == []
    assert {p.name for p in (tmp_path / "hf").iterdir()} == WEIGHTS | {"tokenizer.json", "tokenizer_config.json",
                                                                       "merges.txt"}
    for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 0


@pytest.mark.parametrize("how", ["named directly", "renamed tokenizer.json", "symlink out of the directory"])
def test_a_prefix_json_pointing_at_a_private_key_copies_nothing_of_it_and_says_so(checkpoint, tmp_path, capsys,
                                                                                  how: str) -> None:
    ck, prefix = checkpoint
    key = tmp_path / "home" / ".ssh" / "id_rsa"
    key.parent.mkdir(parents=True)
    key.write_bytes(SECRET)
    named = {"named directly": key, "renamed tokenizer.json": key.parent / "tokenizer.json",
             "symlink out of the directory": tmp_path / "tok" / "tokenizer.json"}[how]
    if how == "renamed tokenizer.json":
        named.write_bytes(SECRET)
    elif how == "symlink out of the directory":
        named.parent.mkdir()
        os.symlink(key, named)
    _record(prefix, named, sha256=hashlib.sha256(SECRET).hexdigest())  # even a matching sha256 is no pass
    names, printed = _export_with_cli(ck, tmp_path / "hf", capsys)
    assert names == WEIGHTS and _no_secret_in(tmp_path / "hf")
    notes = [line for line in printed.splitlines() if "not copied" in line]
    assert len(notes) == 1 and str(named) in notes[0], printed
    assert key.read_bytes() == SECRET


def test_a_tokenizer_whose_sha256_differs_from_the_recorded_one_is_not_copied(checkpoint, tmp_path) -> None:
    ck, prefix = checkpoint
    _record(prefix, _tokenizer_json(tmp_path / "tok" / "tokenizer.json"), sha256="0" * 64)
    export = export_checkpoint(ck, tmp_path / "hf", max_shard_bytes=10**9)
    assert {p.name for p in export.written} == WEIGHTS - {"config.json", "generation_config.json"}
    assert len(export.refused) == 1 and "sha256" in export.refused[0]


def test_files_beside_the_tokenizer_are_copied_only_when_they_parse_and_stay_inside(checkpoint, tmp_path) -> None:
    ck, prefix = checkpoint
    tokenizer = _tokenizer_json(tmp_path / "tok" / "tokenizer.json")
    key = tmp_path / "id_rsa"
    key.write_bytes(SECRET)
    os.symlink(key, tmp_path / "tok" / "tokenizer_config.json")  # leaves the directory
    (tmp_path / "tok" / "merges.txt").write_bytes(SECRET)  # not a merges list
    (tmp_path / "tok" / "special_tokens_map.json").write_text("[1, 2]")  # JSON, but not an object
    (tmp_path / "tok" / "vocab.json").write_text('{"a": 1}')
    (tmp_path / "tok" / "secrets.json").write_text('{"token": "hf_x"}')  # not a tokenizer file name
    _record(prefix, tokenizer, eod_id="0")  # an id that is not an integer is not written into config.json
    export = export_checkpoint(ck, tmp_path / "hf", max_shard_bytes=10**9)
    assert {p.name for p in (tmp_path / "hf").iterdir()} == WEIGHTS | {"tokenizer.json", "vocab.json"}
    refused = "\n".join(export.refused)
    assert len(export.refused) == 3, refused
    assert all(name in refused for name in ("tokenizer_config.json", "merges.txt", "special_tokens_map.json"))
    assert _no_secret_in(tmp_path / "hf")
    assert "eos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())
