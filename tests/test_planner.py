"""The dry run's plan: meta-device parameter counts, Megatron's memory accounting, FLOPs and tokens."""

from __future__ import annotations

import sys
import time

import pytest

from anneal.config.container import ConfigContainer
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.training import TrainingConfig
from anneal.model.flops import flops_per_token
from anneal.planner import bytes_per_parameter, meta_parameter_count, plan, plan_table

PUBLISHED_PARAMETERS = {"qwen3_0p6b": 596_049_920, "qwen3_1p7b": 1_720_574_976, "qwen3_4b": 4_022_468_096,
                        "qwen3_8b": 8_190_735_360}


def _cfg(**optimizer) -> ConfigContainer:
    return ConfigContainer(train=TrainingConfig(train_iters=100, global_batch_size=32, micro_batch_size=2),
                           optimizer=OptimizerConfig(lr=1e-3, **optimizer))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_meta_device_count_is_the_published_count(name: str) -> None:
    from anneal.recipes.qwen.common import shipped_model

    assert meta_parameter_count(shipped_model(name)) == PUBLISHED_PARAMETERS[name]


def test_meta_build_is_fast_and_never_imports_dynamo() -> None:
    import torch  # noqa: F401  (the import itself is not what is timed)

    from anneal.recipes.qwen.common import shipped_model

    if "torch._dynamo" in sys.modules:
        pytest.skip("another test imported torch._dynamo first")
    start = time.perf_counter()
    meta_parameter_count(shipped_model("qwen3_8b"))
    assert time.perf_counter() - start < 2.0  # ~0.15 s; PyTorch's meta init path would import dynamo (3-5 s)
    assert "torch._dynamo" not in sys.modules


@pytest.mark.parametrize(("optimizer", "replicated", "sharded_at_8"), [
    ({"bf16": True}, 18, 6 + 12 / 8),  # Megatron's table: bf16 weights, fp32 grads
    ({"fp16": True}, 18, 6 + 12 / 8),
    ({}, 16, 8 + 8 / 8),  # fp32 weights and grads, no master copy
    ({"optimizer": "sgd", "bf16": True}, 14, 6 + 8 / 8),  # momentum instead of m and v
    ({"optimizer": "sgd", "sgd_momentum": 0.0}, 8, 8),
])
def test_bytes_per_parameter_follow_megatrons_accounting(optimizer, replicated, sharded_at_8) -> None:
    cfg = _cfg(**optimizer)
    p = plan(cfg, 3200, [1, 8])
    n = p.parameters
    assert p.ranks[0].total == p.ranks[0].sharded_total == replicated * n
    assert p.ranks[1].total == replicated * n
    assert p.ranks[1].sharded_total == pytest.approx(sharded_at_8 * n)
    b = bytes_per_parameter(cfg.optimizer)
    assert b.weights + b.grads + b.state == replicated


def test_flops_and_tokens_per_iteration() -> None:
    cfg = _cfg(bf16=True)
    p = plan(cfg, 3200, [1])
    tokens = 32 * cfg.model.seq_length
    assert p.tokens_per_iteration == tokens
    assert p.flops_per_iteration == flops_per_token(cfg.model) * tokens
    assert p.flops_per_run == p.flops_per_iteration * 100


def test_microbatches_per_rank_or_na_when_the_batch_does_not_split() -> None:
    ranks = plan(_cfg(), 3200, [1, 8, 64]).ranks
    assert [r.microbatches for r in ranks] == [16, 2, None]  # 32 / (2 × 64) is not whole


def test_table_states_the_formula_and_marks_the_optimizer_in_use() -> None:
    cfg = _cfg(bf16=True, use_distributed_optimizer=True)
    text = plan_table(plan(cfg, 3200, [1, 8, 64]), cfg)
    assert "weights 2 B + grads 4 B + optimizer state 12 B (fp32 master 4 + moments 8)" in text
    assert "6 + 12/dp B per parameter" in text
    assert "this config uses the 'dist.' columns" in text
    assert "matches the analytic count" in text
    rows = [line.split() for line in text.splitlines() if line.strip().split()[0] in ("1", "8", "64")]
    assert [row[1] for row in rows] == ["16", "2", "n/a"]


def test_untied_output_layer_is_counted() -> None:
    tied = ModelConfig()
    untied = ModelConfig(share_embeddings_and_output_weights=False)
    assert meta_parameter_count(untied) - meta_parameter_count(tied) == tied.vocab_size * tied.hidden_size
