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


def _meminfo(tmp_path, monkeypatch, kib: int) -> None:
    import anneal.planner

    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {kib} kB\n")
    monkeypatch.setattr(anneal.planner, "MEMINFO", str(path))


def test_check_fits_passes_when_the_state_fits_in_available_memory(tmp_path, monkeypatch) -> None:
    from anneal.planner import check_fits

    _meminfo(tmp_path, monkeypatch, 64 * 1024 * 1024)  # 64 GiB
    check_fits(_cfg(), world_size=1, device="cpu")


def test_check_fits_refuses_with_the_numbers(tmp_path, monkeypatch) -> None:
    from anneal.errors import ConfigError
    from anneal.model.flops import num_parameters
    from anneal.planner import check_fits

    cfg = _cfg()
    need = 16 * num_parameters(cfg.model)  # fp32 Adam: 4 + 4 + 8 B per parameter
    _meminfo(tmp_path, monkeypatch, need // 1024 - 1)
    with pytest.raises(ConfigError, match=r"^model \([\d,]+ parameters\) does not fit: .* need "
                                          rf"{need / 1024**3:.2f} GiB per rank \(4\+4\+8 B per parameter"):
        check_fits(cfg, world_size=1, device="cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two CPU ranks share the machine's memory
    _meminfo(tmp_path, monkeypatch, need // 1024 + 1)
    with pytest.raises(ConfigError, match=r"× 2 ranks on this machine"):
        check_fits(cfg, world_size=2, device="cpu")


def _model_cfg(bf16: bool = True, **model) -> ConfigContainer:
    shape = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "seq_length": 512, "vocab_size": 1000}
    return ConfigContainer(train=TrainingConfig(train_iters=100, global_batch_size=32, micro_batch_size=2),
                           model=ModelConfig(**{**shape, **model}), optimizer=OptimizerConfig(lr=1e-3, bf16=bf16))


@pytest.mark.parametrize(("recompute", "per_layer_terms"), [
    ({}, "none"), ({"recompute_granularity": "selective"}, "selective"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}, "full-1"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2}, "full-2"),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1}, "block-1"),
])
def test_activations_follow_korthikantis_formula_per_recompute_setting(recompute, per_layer_terms) -> None:
    s, b, h, a, L = 512, 2, 256, 4, 4
    layer = s * b * h * (34 + 5 * a * s / h)  # 16-bit, no recompute (Korthikanti et al., eq. 1)
    expected = {"none": L * layer, "selective": L * s * b * h * 34,
                "full-1": L * 2 * s * b * h + layer,  # each layer's input + the layer being recomputed
                "full-2": 2 * 2 * s * b * h + 2 * layer,  # two units of two layers
                "block-1": 2 * s * b * h + 3 * layer}[per_layer_terms]
    rank = plan(_model_cfg(**recompute), 3200, [1]).ranks[0]
    assert rank.activations == pytest.approx(expected)
    assert plan(_model_cfg(bf16=False, **recompute), 3200, [1]).ranks[0].activations == pytest.approx(2 * expected)


def test_chunked_loss_shrinks_the_logits_and_the_peak() -> None:
    plain = plan(_model_cfg(), 3200, [1]).ranks[0]
    chunked = plan(_model_cfg(cross_entropy_chunk_size=128), 3200, [1]).ranks[0]
    assert plain.logits == 12 * 2 * 512 * 1000  # three fp32 [tokens, vocab] tensors
    assert chunked.logits == 12 * 128 * 1000
    assert chunked.peak(False) == plain.peak(False) - plain.logits + chunked.logits
    assert plain.peak(False) == plain.total + plain.activations + plain.logits


def test_table_shows_the_working_memory_of_each_setting() -> None:
    cfg = _model_cfg(recompute_granularity="selective", cross_entropy_chunk_size=256)
    text = plan_table(plan(cfg, 3200, [1, 8]), cfg)
    assert "activations / microbatch (2 × 512 tokens): 34.0 MiB (selective); none 74.0 MiB, selective 34.0 MiB" in text
    assert "logits / microbatch: 2.9 MiB (chunked per 256 tokens); plain 11.7 MiB" in text
    (head,) = [line for line in text.splitlines() if line.split()[:1] == ["dp"]]
    assert head.split()[-1] == "peak"


def test_check_fits_counts_activations_and_suggests_recompute(tmp_path, monkeypatch) -> None:
    from anneal.errors import ConfigError
    from anneal.planner import check_fits

    cfg = _model_cfg(num_layers=64, seq_length=4096)
    rank = plan(cfg, 3200, [1]).ranks[0]
    _meminfo(tmp_path, monkeypatch, int(rank.total + rank.activations / 2) // 1024)  # states fit, activations don't
    with pytest.raises(ConfigError, match=r"activations and logits .* recompute activations "
                                          r"\(model.recompute_granularity\), chunk the loss"):
        check_fits(cfg, world_size=1, device="cpu")
    cfg.model.recompute_granularity = "selective"  # 5as/h = 80 of the 114 per-layer terms gone
    check_fits(cfg, world_size=1, device="cpu")
