"""Megatron's param-group rules and anneal's multiplier rules, on a real model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from optim_helpers import FLAGS, SCHEDULE, TinyLM, config

from anneal.config.optimizer import ParamGroupRule
from anneal.errors import ConfigError
from anneal.optim import get_param_groups, setup_optimizer


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["param_names"]}


def test_biases_and_norm_weights_get_no_weight_decay():
    groups = _by_name(get_param_groups(TinyLM(), config()))
    no_decay = sorted(n for n, g in groups.items() if g["wd_mult"] == 0.0)
    assert no_decay == sorted(
        [f"layers.{i}.{p}" for i in range(2) for p in (
            "norm.weight", "mlp_norm.weight", "self_attention.linear_qkv.bias",
            "self_attention.q_norm.weight", "self_attention.k_norm.weight", "linear_fc1.bias",
        )] + ["final_norm.weight"]
    )  # fmt: skip
    assert groups["embedding.weight"]["wd_mult"] == 1.0
    assert groups["layers.0.self_attention.linear_qkv.weight"]["wd_mult"] == 1.0


def test_qk_norms_get_weight_decay_when_asked():
    groups = _by_name(get_param_groups(TinyLM(), config(apply_wd_to_qk_layernorm=True)))
    assert groups["layers.1.self_attention.q_norm.weight"]["wd_mult"] == 1.0
    assert groups["layers.1.self_attention.k_norm.weight"]["wd_mult"] == 1.0
    assert groups["layers.1.norm.weight"]["wd_mult"] == 0.0
    assert groups["layers.1.self_attention.linear_qkv.bias"]["wd_mult"] == 0.0


def test_decoupled_lr_goes_to_embedding_and_output_layer_only():
    groups = _by_name(
        get_param_groups(TinyLM(), config(lr=3e-3, min_lr=3e-4, decoupled_lr=1e-3, decoupled_min_lr=1e-5))
    )
    decoupled = sorted(n for n, g in groups.items() if g["is_decoupled_lr"])
    assert decoupled == ["embedding.weight", "output_layer.weight"]
    assert (groups["embedding.weight"]["max_lr"], groups["embedding.weight"]["min_lr"]) == (1e-3, 1e-5)
    assert (
        groups["layers.0.linear_fc1.weight"]["max_lr"],
        groups["layers.0.linear_fc1.weight"]["min_lr"],
    ) == (3e-3, 3e-4)


def test_decoupled_min_lr_defaults_to_min_lr_and_unset_decoupled_lr_changes_nothing():
    groups = _by_name(get_param_groups(TinyLM(), config(min_lr=3e-4, decoupled_lr=1e-3)))
    assert groups["output_layer.weight"]["min_lr"] == 3e-4
    plain = get_param_groups(TinyLM(), config())
    assert not any(g["is_decoupled_lr"] for g in plain)
    assert len(plain) == 2  # decay and no-decay


def test_layer_wise_multipliers_scale_lr_bounds_and_weight_decay():
    rules = [
        ParamGroupRule(pattern="embedding.*", lr_mult=0.1),
        ParamGroupRule(pattern="*.self_attention.*", lr_mult=2.0, wd_mult=0.5),
    ]
    groups = _by_name(get_param_groups(TinyLM(), config(lr=3e-3, min_lr=3e-4, param_group_rules=rules)))
    emb = groups["embedding.weight"]
    assert emb["max_lr"] == pytest.approx(3e-4) and emb["min_lr"] == pytest.approx(3e-5)
    qkv = groups["layers.0.self_attention.linear_qkv.weight"]
    assert qkv["max_lr"] == pytest.approx(6e-3) and qkv["wd_mult"] == 0.5
    assert groups["layers.0.self_attention.q_norm.weight"]["wd_mult"] == 0.0  # no-decay stays zero
    assert groups["layers.0.linear_fc1.weight"]["max_lr"] == 3e-3
    assert "lr_mult" not in emb  # folded into the bounds: anneal's scheduler would not apply it


def test_decoupled_lr_is_scaled_by_a_matching_rule():
    rules = [ParamGroupRule(pattern="output_layer.*", lr_mult=0.5)]
    groups = _by_name(get_param_groups(TinyLM(), config(decoupled_lr=1e-3, param_group_rules=rules)))
    assert groups["output_layer.weight"]["max_lr"] == pytest.approx(5e-4)
    assert groups["embedding.weight"]["max_lr"] == pytest.approx(1e-3)


def test_first_matching_rule_wins_and_a_shadowed_rule_is_an_error():
    rules = [
        ParamGroupRule(pattern="layers.*", lr_mult=3.0),
        ParamGroupRule(pattern="layers.0.*", lr_mult=5.0),
    ]
    with pytest.raises(ConfigError, match=r"param_group_rules\[1\].*earlier rule"):
        get_param_groups(TinyLM(), config(param_group_rules=rules))


def test_a_rule_that_matches_nothing_is_an_error_naming_the_field():
    rules = [ParamGroupRule(pattern="embeddings.*", lr_mult=0.1)]
    with pytest.raises(
        ConfigError, match=r"^optimizer\.param_group_rules\[0\]\.pattern \('embeddings\.\*'\)"
    ):
        get_param_groups(TinyLM(), config(param_group_rules=rules))


def test_frozen_parameters_are_left_out():
    model = TinyLM()
    model.embedding.weight.requires_grad_(False)
    names = {n for g in get_param_groups(model, config()) for n in g["param_names"]}
    assert "embedding.weight" not in names and "output_layer.weight" in names


def test_scheduler_writes_lr_from_each_groups_bounds():
    rules = [ParamGroupRule(pattern="embedding.*", lr_mult=0.1)]
    model = TinyLM()
    optimizer, scheduler = setup_optimizer(config(param_group_rules=rules), FLAGS, model, schedule=SCHEDULE)
    scheduler.step(SCHEDULE.lr_warmup_steps)  # end of warmup: lr == max_lr, weight decay == wd * wd_mult
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["max_lr"])
        assert group["weight_decay"] == pytest.approx(SCHEDULE.end_wd * group["wd_mult"])
    emb = next(g for g in optimizer.param_groups if "embedding.weight" in g["param_names"])
    assert emb["lr"] == pytest.approx(0.1 * SCHEDULE.max_lr)


def _qwen3(tied: bool) -> torch.nn.Module:
    from anneal.config.model import ModelConfig
    from anneal.model.qwen3 import build_model

    cfg = ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, num_query_groups=1,
        kv_channels=32, vocab_size=128, share_embeddings_and_output_weights=tied,
    )  # fmt: skip
    return build_model(cfg)


_HAVE_QWEN3 = importlib.util.find_spec("anneal.model.qwen3") is not None


@pytest.mark.skipif(not _HAVE_QWEN3, reason="anneal.model.qwen3 not present")
@pytest.mark.parametrize("tied", [False, True])
def test_rules_on_anneal_qwen3(tied):
    model = _qwen3(tied)
    groups = _by_name(get_param_groups(model, config(decoupled_lr=1e-3)))
    assert set(groups) == {n for n, _ in model.named_parameters()}
    for name, group in groups.items():
        is_norm = name.endswith("norm.weight")
        assert group["wd_mult"] == (0.0 if is_norm else 1.0), name
        assert group["is_decoupled_lr"] == name.startswith(("embedding.", "output_layer.")), name
    assert ("output_layer.weight" in groups) == (not tied)
    qk = [n for n in groups if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(qk) == 4
    with_qk_wd = _by_name(get_param_groups(model, config(apply_wd_to_qk_layernorm=True)))
    assert all(with_qk_wd[n]["wd_mult"] == 1.0 for n in qk)
    assert with_qk_wd["layers.0.input_layernorm.weight"]["wd_mult"] == 0.0
