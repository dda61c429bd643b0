"""Tests for the Qwen3 model (anneal.model.qwen3), its counts (anneal.model.flops) and ModelConfig."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from anneal_testing import SMALL_QWEN3
from omegaconf import OmegaConf

from anneal.config.model import ModelConfig
from anneal.errors import ConfigError
from anneal.hf.mapping import hf_config as config_json
from anneal.hf.mapping import to_hf_name
from anneal.model import flops_per_token, num_parameters
from anneal.model.qwen3 import build_model

transformers = pytest.importorskip("transformers")

CONF_MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
SHIPPED_CONFIGS = sorted(CONF_MODEL_DIR.glob("*.yaml"))

# Totals of Hugging Face's Qwen3ForCausalLM with the published shapes, tied weights counted once
# (the safetensors files of the tied models also store lm_head, so the hub shows more).
PUBLISHED_PARAMETERS = {
    "qwen3_0p6b": 596_049_920,
    "qwen3_1p7b": 1_720_574_976,
    "qwen3_4b": 4_022_468_096,
    "qwen3_8b": 8_190_735_360,
}


def small_config(**overrides: object) -> ModelConfig:
    """A fast config whose head dim (24) differs from hidden_size // heads (16), as in Qwen3-0.6B."""
    fields: dict[str, object] = {**SMALL_QWEN3, "vocab_size": 101, "seq_length": 16}
    fields.update(overrides)
    return ModelConfig(**fields)


def load_shipped(path: Path) -> ModelConfig:
    fields = OmegaConf.to_container(OmegaConf.load(path))
    assert fields.pop("_target_") == "anneal.config.model.ModelConfig"
    assert set(fields) == {f.name for f in dataclasses.fields(ModelConfig)}, "every field is set"
    return ModelConfig(**fields)


def hf_config(cfg: ModelConfig) -> transformers.Qwen3Config:
    """The library's one mapping (anneal.hf.mapping), read by transformers itself."""
    return transformers.Qwen3Config(**config_json(cfg, "float32"), attn_implementation="eager")


@torch.no_grad()
def copy_into_hf(model: torch.nn.Module, hf_model: torch.nn.Module) -> None:
    hf_params = dict(hf_model.named_parameters())
    names = {to_hf_name(name) for name, _ in model.named_parameters()}
    assert names == set(hf_params), "the name mapping covers every parameter, both ways"
    for name, param in model.named_parameters():
        hf_params[to_hf_name(name)].copy_(param)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_match_hugging_face_qwen3(tied: bool) -> None:
    torch.manual_seed(0)
    cfg = small_config(share_embeddings_and_output_weights=tied, init_method_std=0.2)
    model = build_model(cfg)
    with torch.no_grad():  # norms away from 1, so a swapped or missing norm shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    hf_model = transformers.Qwen3ForCausalLM(hf_config(cfg)).eval()
    copy_into_hf(model, hf_model)
    input_ids = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length))
    with torch.no_grad():
        logits = model(input_ids)
        expected = hf_model(input_ids).logits
    assert logits.shape == (3, cfg.seq_length, cfg.vocab_size)
    assert expected.std() > 0.1, "logits large enough for the comparison to mean something"
    assert (logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.stem)
def test_shipped_config_parameter_count_matches_formula_and_hugging_face(path: Path) -> None:
    cfg = load_shipped(path)
    cfg.validate()
    model = build_model(cfg, device="meta")
    assert all(param.is_meta for param in model.parameters())
    counted = sum(param.numel() for param in model.parameters())
    assert counted == num_parameters(cfg)
    if path.stem in PUBLISHED_PARAMETERS:
        assert counted == PUBLISHED_PARAMETERS[path.stem]
        with torch.device("meta"):
            hf_model = transformers.Qwen3ForCausalLM(hf_config(cfg))
        assert counted == sum(param.numel() for param in hf_model.parameters())


def test_every_published_size_is_shipped() -> None:
    assert set(PUBLISHED_PARAMETERS) <= {path.stem for path in SHIPPED_CONFIGS}


@pytest.mark.parametrize(
    "overrides",
    [
        {"share_embeddings_and_output_weights": False},
        {"qk_layernorm": False},
        {"num_query_groups": None, "kv_channels": None},
    ],
    ids=["untied", "no_qk_norm", "mha_default_head_dim"],
)
def test_parameter_count_formula_matches_module(overrides: dict) -> None:
    cfg = small_config(**overrides)
    model = build_model(cfg, device="meta")
    assert sum(param.numel() for param in model.parameters()) == num_parameters(cfg)


def test_parameter_count_by_hand() -> None:
    cfg = small_config()
    per_layer = (2 * 64 * 96 + 2 * 64 * 48) + 3 * 64 * 96 + (2 * 64 + 2 * 24)
    assert num_parameters(cfg) == 101 * 64 + 2 * per_layer + 64
    untied = small_config(share_embeddings_and_output_weights=False)
    assert num_parameters(untied) == num_parameters(cfg) + 101 * 64


def test_flops_per_token_by_hand() -> None:
    cfg = small_config()
    matmul_params = 2 * ((2 * 64 * 96 + 2 * 64 * 48) + 3 * 64 * 96)  # q,o + k,v + gate,up,down
    output_params = 101 * 64
    attention = 12 * 2 * 16 * 4 * 24  # 12 * layers * seq * heads * head_dim
    assert flops_per_token(cfg) == 6 * matmul_params + 6 * output_params + attention
    # The output layer is a matmul whether or not it is tied.
    assert flops_per_token(small_config(share_embeddings_and_output_weights=False)) == flops_per_token(cfg)


def test_parameter_names_follow_the_param_group_conventions() -> None:
    names = {name for name, _ in build_model(small_config(), device="meta").named_parameters()}
    assert "embedding.weight" in names and "final_norm.weight" in names
    assert "output_layer.weight" not in names, "tied: the embedding is the only copy"
    assert {"layers.1.self_attn.q_norm.weight", "layers.1.self_attn.k_norm.weight"} <= names
    norms = {name for name in names if name.endswith("norm.weight")}
    assert len(norms) == 2 * 4 + 1  # per layer: input, post-attention, q, k; plus the final norm
    untied = build_model(small_config(share_embeddings_and_output_weights=False), device="meta")
    assert "output_layer.weight" in dict(untied.named_parameters())


def test_init_scales_residual_outputs_and_sets_norms_to_one() -> None:
    torch.manual_seed(0)
    cfg = small_config(num_layers=8, hidden_size=256, ffn_hidden_size=512, vocab_size=1000)
    params = dict(build_model(cfg).named_parameters())
    scaled_std = 0.02 / math.sqrt(2 * 8)
    assert params["embedding.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["layers.3.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["layers.3.self_attn.o_proj.weight"].std().item() == pytest.approx(scaled_std, rel=0.05)
    assert params["layers.3.mlp.down_proj.weight"].std().item() == pytest.approx(scaled_std, rel=0.05)
    for name, param in params.items():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name


def test_changing_a_token_changes_only_its_own_and_later_logits() -> None:
    torch.manual_seed(0)
    cfg = small_config(init_method_std=0.2)
    model = build_model(cfg)
    input_ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    changed = input_ids.clone()
    position = 9
    changed[:, position] = (changed[:, position] + 1) % cfg.vocab_size
    with torch.no_grad():
        before, after = model(input_ids), model(changed)
    torch.testing.assert_close(after[:, :position], before[:, :position], rtol=0.0, atol=1e-6)
    moved = (after[:, position:] - before[:, position:]).abs().amax(dim=-1)
    assert (moved > 1e-4).all(), "every later position sees the change"


def test_builds_in_bfloat16_and_trains() -> None:
    torch.manual_seed(0)
    model = build_model(small_config(), dtype=torch.bfloat16)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    logits = model(torch.randint(0, 101, (2, 16)))
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    assert all(param.grad is not None for param in model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_layers": 0}, "model.num_layers (0) must be a positive integer"),
        ({"hidden_size": 64.5}, "model.hidden_size (64.5) must be a positive integer"),
        ({"ffn_hidden_size": -1}, "model.ffn_hidden_size (-1) must be a positive integer"),
        ({"num_attention_heads": 0}, "model.num_attention_heads (0) must be a positive integer"),
        ({"vocab_size": True}, "model.vocab_size (True) must be a positive integer"),
        ({"seq_length": 0}, "model.seq_length (0) must be a positive integer"),
        ({"num_query_groups": 0}, "model.num_query_groups (0) must be a positive integer"),
        ({"kv_channels": -8}, "model.kv_channels (-8) must be a positive integer"),
        ({"rotary_base": 0.0}, "model.rotary_base (0.0) must be > 0"),
        ({"init_method_std": -0.02}, "model.init_method_std (-0.02) must be > 0"),
        ({"layernorm_epsilon": "1e-6"}, "model.layernorm_epsilon ('1e-6') must be > 0"),
        ({"qk_layernorm": "yes"}, "model.qk_layernorm ('yes') must be true or false"),
        (
            {"share_embeddings_and_output_weights": 1},
            "model.share_embeddings_and_output_weights (1) must be true or false",
        ),
        (
            {"num_attention_heads": 12, "num_query_groups": 5},
            "model.num_attention_heads (12) must be divisible by model.num_query_groups (5)",
        ),
        (
            {"kv_channels": None, "hidden_size": 66},
            "model.hidden_size (66) must be divisible by model.num_attention_heads (4)",
        ),
        ({"kv_channels": 25}, "model.kv_channels (25) must give an even head dim for RoPE"),
        (
            {"kv_channels": None, "hidden_size": 12},
            "model.kv_channels (None) must give an even head dim for RoPE, got 3",
        ),
    ],
)
def test_validate_names_the_field_value_and_rule(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        small_config(**overrides).validate()
    assert str(error.value).startswith(message)
    with pytest.raises(ConfigError):
        build_model(small_config(**overrides), device="meta")


def test_defaults_are_valid_and_none_means_megatron_defaults() -> None:
    ModelConfig().validate()
    cfg = small_config(num_query_groups=None, kv_channels=None)
    cfg.validate()
    assert (cfg.num_kv_heads, cfg.head_dim) == (4, 16)
