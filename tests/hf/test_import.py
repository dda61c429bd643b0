"""``checkpoint.pretrained_checkpoint``: a Hugging Face directory into a built model (anneal.hf.importer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import build, model_config, save_hf, token_ids  # noqa: E402

from anneal.errors import ConfigError  # noqa: E402
from anneal.hf.importer import INDEX_FILE, check_pretrained, load_pretrained  # noqa: E402
from anneal.hf.mapping import from_hf_name, to_hf_name  # noqa: E402


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_imported_model_gives_hugging_face_logits(tmp_path: Path, tied: bool) -> None:
    cfg = model_config(tied)
    hf_model = save_hf(tmp_path, cfg)
    model, optimizer, _ = build(cfg)
    load_pretrained(tmp_path, model, optimizer, cfg)
    ids = token_ids(cfg, seed=5)
    with torch.no_grad():
        expected, logits = hf_model(ids).logits, model(ids)
    assert expected.std() > 0.3, "logits large enough for the comparison to mean something"
    assert (logits - expected).abs().max() < 1e-5


def test_sharded_directory_is_read_through_its_index(tmp_path: Path) -> None:
    cfg = model_config(False)
    hf_model = save_hf(tmp_path, cfg, max_shard_size="40KB")
    assert (tmp_path / INDEX_FILE).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    model, optimizer, _ = build(cfg)
    load_pretrained(tmp_path, model, optimizer, cfg)
    ids = token_ids(cfg, seed=5)
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("distributed", [False, True], ids=["replicated", "zero1"])
def test_imported_weights_survive_a_step_at_lr0_in_every_dtype(
    tmp_path: Path, dtype: str, distributed: bool
) -> None:
    """The weights land in the model's dtype and in the optimizer's masters (reload_model_params)."""
    cfg = model_config(True)
    hf_params = dict(save_hf(tmp_path, cfg).named_parameters())
    model, optimizer, _ = build(cfg, dtype, distributed)
    load_pretrained(tmp_path, model, optimizer, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.zero_grad()
    logits = model(token_ids(cfg, seed=5)[:, :-1])
    optimizer.scale_loss(logits.float().square().mean()).backward()
    assert not optimizer.step().skipped
    for name, param in model.named_parameters():
        expected = hf_params[to_hf_name(name)].detach().to(param.dtype)
        assert torch.equal(param.detach(), expected), f"{dtype}: {name} is not the imported weight"


def test_a_model_config_that_differs_is_refused_naming_both_values(tmp_path: Path) -> None:
    save_hf(tmp_path, model_config(True))
    with pytest.raises(
        ConfigError, match=r"^model.hidden_size \(48\) differs from config.json hidden_size \(64\)"
    ):
        check_pretrained(model_config(True, hidden_size=48), str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=r"^model.share_embeddings_and_output_weights \(False\) differs from "
        r"config.json tie_word_embeddings \(True\)",
    ):
        check_pretrained(model_config(False), str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"^model.rotary_base \(10000.0\) differs from config.json rope_theta"
    ):
        check_pretrained(model_config(True, rotary_base=10000.0), str(tmp_path))


def test_a_directory_without_config_or_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^checkpoint.pretrained_checkpoint \(.*\) has no config.json"):
        check_pretrained(model_config(True), str(tmp_path))
    save_hf(tmp_path, model_config(True))
    (tmp_path / "model.safetensors").unlink()
    model, optimizer, _ = build(model_config(True))
    with pytest.raises(ConfigError, match="has neither model.safetensors nor model.safetensors.index.json"):
        load_pretrained(tmp_path, model, optimizer, model_config(True))


def test_names_map_both_ways_for_every_parameter() -> None:
    from anneal.model.qwen3 import build_model

    for tied in (True, False):
        names = [n for n, _ in build_model(model_config(tied), device="meta").named_parameters()]
        assert all(from_hf_name(to_hf_name(n)) == n for n in names)
        assert ("lm_head.weight" in map(to_hf_name, names)) is not tied
    assert from_hf_name("model.rotary_emb.inv_freq") is None


def test_checkpoint_config_refuses_a_missing_directory_and_finetune_with_it(tmp_path: Path) -> None:
    from anneal.config.runtime import CheckpointConfig

    CheckpointConfig(pretrained_checkpoint=str(tmp_path)).validate()
    missing = tmp_path / "absent"
    with pytest.raises(
        ConfigError, match=r"^checkpoint.pretrained_checkpoint \('.*absent'\) must be a Hugging Face"
    ):
        CheckpointConfig(pretrained_checkpoint=str(missing)).validate()
    with pytest.raises(
        ConfigError, match=r"^checkpoint.pretrained_checkpoint \(.*\) and checkpoint.finetune \(True\)"
    ):
        CheckpointConfig(pretrained_checkpoint=str(tmp_path), finetune=True).validate()


def test_every_differing_field_is_named_and_unsupported_architectures_are_refused(tmp_path: Path) -> None:
    save_hf(tmp_path, model_config(True))
    with pytest.raises(ConfigError) as error:
        check_pretrained(model_config(True, num_layers=3, vocab_size=512), str(tmp_path))
    assert str(error.value).startswith(
        "model.num_layers (3) differs from config.json num_hidden_layers (2); "
        "model.vocab_size (512) differs from config.json vocab_size (320) in "
    )
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(ConfigError, match=r"config.json RoPE type \('yarn'\) must be 'default'"):
        check_pretrained(model_config(True), str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"config.json model_type \('llama'\) must be 'qwen3'"):
        check_pretrained(model_config(True), str(tmp_path))


def test_config_json_is_data_its_auto_map_code_is_never_imported(tmp_path: Path, monkeypatch) -> None:
    """``trust_remote_code`` never: a directory's ``auto_map`` and the code beside it are not imported."""
    cfg = model_config(True)
    save_hf(tmp_path, cfg)
    marker = tmp_path / "imported"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.syspath_prepend(str(tmp_path))  # even where Python could import it
    model, optimizer, _ = build(cfg)
    check_pretrained(cfg, str(tmp_path))
    load_pretrained(tmp_path, model, optimizer, cfg)
    assert not marker.exists()


@pytest.mark.parametrize("config, index, error", [
    ("[1, 2]", None, r"config\.json is not a JSON object"),
    (None, {"weight_map": {"model.embed_tokens.weight": "../../elsewhere.safetensors"}},
     r"names '\.\./\.\./elsewhere\.safetensors', not a file of the directory"),
    (None, {"weight_map": ["model.safetensors"]}, r"has no readable weight_map"),
])
def test_crafted_config_or_index_is_refused_naming_the_file(tmp_path: Path, config, index, error: str) -> None:
    cfg = model_config(True)
    save_hf(tmp_path, cfg)
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    if index is not None:
        (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    model, optimizer, _ = build(cfg)
    with pytest.raises(ConfigError, match=error):
        check_pretrained(cfg, str(tmp_path))
        load_pretrained(tmp_path, model, optimizer, cfg)
