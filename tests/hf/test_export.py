"""``anneal-export-hf``: an anneal checkpoint -> a directory ``from_pretrained`` reads (hf.exporter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import anneal_logits, build, hf_logits, model_config, save_checkpoint, save_hf, token_ids  # noqa: E402

from anneal.errors import ConfigError  # noqa: E402
from anneal.hf.exporter import export_checkpoint, parse_size  # noqa: E402
from anneal.hf.importer import INDEX_FILE, load_pretrained  # noqa: E402


def _trained_checkpoint(tmp_path: Path, tied: bool, dtype: str, extra: dict | None = None):
    """A checkpoint of a model that took two real steps (so it is not its initial weights)."""
    cfg = model_config(tied, init_method_std=0.1)
    parts = build(cfg, dtype)
    model, optimizer, _ = parts
    for _ in range(2):
        optimizer.zero_grad()
        optimizer.scale_loss(model(token_ids(cfg, seed=3)).float().logsumexp(-1).mean()).backward()
        optimizer.step()
    return cfg, model, save_checkpoint(tmp_path / "ck", parts, cfg, extra)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_from_pretrained_gives_anneals_logits(tmp_path: Path, tied: bool, dtype: str) -> None:
    cfg, model, _ = _trained_checkpoint(tmp_path, tied, dtype)
    written = export_checkpoint(tmp_path / "ck", tmp_path / "hf", max_shard_bytes=10**9).written
    assert [p.name for p in written] == ["model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["vocab_size"] == cfg.vocab_size
    assert config["torch_dtype"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    ids = token_ids(cfg, seed=3)
    expected = anneal_logits(model, ids)  # the trained weights, computed in fp32 on both sides
    assert (hf_logits(tmp_path / "hf", ids) - expected).abs().max() < 1e-5


def test_sharded_export_has_an_index_and_imports_back_to_the_same_weights(tmp_path: Path) -> None:
    cfg, model, _ = _trained_checkpoint(tmp_path, False, "bf16")
    written = export_checkpoint(tmp_path / "ck", tmp_path / "hf", max_shard_bytes=parse_size("30KB")).written
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    assert len(written) > 2 and set(index["weight_map"].values()) == {p.name for p in written}
    assert all(p.stat().st_size <= 30_000 + 320 * 64 * 2 for p in written), (
        "a shard exceeds one tensor's overrun"
    )
    ids = token_ids(cfg, seed=3)
    assert (hf_logits(tmp_path / "hf", ids) - anneal_logits(model, ids)).abs().max() < 1e-5
    export_checkpoint(tmp_path / "ck", tmp_path / "hf", max_shard_bytes=10**9)  # again, into the same OUT
    assert sorted(p.name for p in (tmp_path / "hf").glob("model*")) == ["model.safetensors"], (
        "no stale shards"
    )
    again, optimizer, _ = build(cfg, "bf16")
    load_pretrained(tmp_path / "hf", again, optimizer, cfg)
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name


def test_a_run_without_a_tokenizer_exports_no_tokenizer_files(tmp_path: Path) -> None:
    _trained_checkpoint(tmp_path, True, "fp32")
    export_checkpoint(tmp_path / "ck", tmp_path / "hf", max_shard_bytes=10**9)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_import_then_export_is_the_identity_on_hugging_face_weights(tmp_path: Path) -> None:
    cfg = model_config(True)
    hf_params = {n: p.detach().clone() for n, p in save_hf(tmp_path / "in", cfg).named_parameters()}
    parts = build(cfg)
    load_pretrained(tmp_path / "in", parts[0], parts[1], cfg)
    save_checkpoint(tmp_path / "ck", parts, cfg)
    export_checkpoint(tmp_path / "ck", tmp_path / "out", max_shard_bytes=10**9)
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(hf_params) - {"lm_head.weight"}, "tied: the output layer is the embedding"
    assert all(torch.equal(out[name], hf_params[name]) for name in out)


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("1GiB", 2**30), ("300kb", 300_000), ("1024", 1024)]
)
def test_parse_size_reads_hugging_faces_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "5XB", "-1GB", ""])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--max-shard-size"):
        parse_size(text)


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^CHECKPOINT \(.*\) is neither an iter_\* checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "hf", max_shard_bytes=10**9)


def test_the_command_exits_2_with_one_line_for_a_bad_checkpoint(tmp_path: Path, capsys) -> None:
    from anneal.hf.cli import main

    with pytest.raises(SystemExit) as leaving:
        main([str(tmp_path / "absent"), str(tmp_path / "hf")])
    assert leaving.value.code == 2
    assert "CHECKPOINT (" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_every_exported_file_gets_the_mode_the_umask_gives(tmp_path: Path) -> None:
    import os
    import stat

    cfg = model_config(True)
    save_checkpoint(tmp_path / "ck", build(cfg), cfg)
    previous = os.umask(0o027)
    try:
        export_checkpoint(tmp_path / "ck", tmp_path / "hf", max_shard_bytes=40_000)  # shards and an index
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert len(modes) > 4 and INDEX_FILE in modes
    assert modes == dict.fromkeys(modes, 0o640), modes  # safetensors alone writes 0600


def test_a_byte_level_run_exports_a_byte_tokenizer_without_a_note(tmp_path: Path, capsys) -> None:
    from anneal.data.metadata import write_metadata
    from anneal.data.tokenizer import ByteTokenizer
    from anneal.hf.cli import main

    prefix = tmp_path / "corpus_text_document"
    write_metadata(prefix, tokenizer=ByteTokenizer().describe(), stats={"documents": 1})
    cfg = model_config(True)
    dataset = {"kind": "indexed", "data_path": [str(prefix)]}
    save_checkpoint(tmp_path / "ck", build(cfg), cfg, {"dataset": dataset})
    main([str(tmp_path / "ck"), str(tmp_path / "hf")])
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if line.startswith("anneal: note:")], lines
    assert lines[-1].endswith(": model.safetensors, tokenizer.json, tokenizer_config.json, config.json, "
                              "generation_config.json")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 256
