"""Activation recompute: Megatron's layer units, unchanged gradients, and its rules refused by name."""

from __future__ import annotations

import pytest
import torch

from anneal.config.model import ModelConfig
from anneal.errors import ConfigError
from anneal.model import recompute
from anneal.model.qwen3 import build_model
from anneal.model.recompute import recompute_units

SETTINGS = [
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
    {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
    {"recompute_granularity": "selective"},
]


def test_units_follow_megatrons_uniform_and_block_methods() -> None:
    assert recompute_units(5, "uniform", 2) == ((0, 2, True), (2, 4, True), (4, 5, True))
    assert recompute_units(4, "block", 1) == ((0, 1, True), (1, 2, False), (2, 3, False), (3, 4, False))
    assert recompute_units(3, None, None) == ((0, 3, False),)


def _grads(monkeypatch, **settings) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=128, vocab_size=101, seq_length=16, **settings)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_recompute_leaves_loss_and_gradients_unchanged(monkeypatch, settings: dict) -> None:
    loss, grads, _ = _grads(monkeypatch)
    loss_r, grads_r, checkpoints = _grads(monkeypatch, **settings)
    expected = {"uniform": -(-3 // settings.get("recompute_num_layers", 1)), "block": 2}
    assert checkpoints == expected.get(settings.get("recompute_method"), 3)  # selective: one per layer
    assert torch.equal(loss_r, loss)
    for name, grad in grads.items():
        assert torch.equal(grads_r[name], grad), name  # the same computation, recomputed: bit-identical


@pytest.mark.parametrize(("settings", "message"), [
    ({"recompute_num_layers": 2}, r"model.recompute_num_layers \(2\) needs model.recompute_granularity 'full'"),
    ({"recompute_granularity": "selective", "recompute_method": "block"},
     r"model.recompute_method \('block'\) needs model.recompute_granularity 'full', not 'selective'"),
    ({"recompute_granularity": "full", "recompute_num_layers": 1}, r"model.recompute_method \(None\) must be one of"),
    ({"recompute_granularity": "full", "recompute_method": "uniform"},
     r"model.recompute_num_layers \(None\) must be in \[1, model.num_layers \(4\)\]"),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 5},
     r"model.recompute_num_layers \(5\) must be in \[1, model.num_layers \(4\)\]"),
    ({"recompute_granularity": "ful"}, r"model.recompute_granularity \('ful'\) must be one of 'full', 'selective'"),
    ({"recompute_granularity": "full", "recompute_method": "blocks", "recompute_num_layers": 1},
     r"model.recompute_method \('blocks'\) must be one of 'uniform', 'block'"),
])
def test_recompute_rules_are_refused_naming_the_field(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        ModelConfig(**settings).validate()
