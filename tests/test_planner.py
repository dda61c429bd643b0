"""The dry run's plan: meta-device counts, per-rank shards on both engines, working memory, the advice."""

from __future__ import annotations

import dataclasses
import re
import sys
import time

import pytest

from anneal.config.container import ConfigContainer
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.runtime import DistributedConfig
from anneal.config.training import TrainingConfig
from anneal.errors import ConfigError
from anneal.model.flops import flops_per_token, num_parameters
from anneal.parallel import ParallelDims, plan_layout
from anneal.planner import (StateBytes, bytes_per_parameter, candidates, check_fits, gathered_bytes,
                            local_shape, meta_parameter_count, parameter_shapes, plan, plan_table,
                            state_bytes, working_memory)

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
    assert p.ranks[0].replicated.total == p.ranks[0].sharded.total == replicated * n
    assert p.ranks[1].replicated.total == replicated * n
    assert p.ranks[1].sharded.total == pytest.approx(sharded_at_8 * n)
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
    _meminfo(tmp_path, monkeypatch, 64 * 1024 * 1024)  # 64 GiB
    check_fits(_cfg(), plan_layout(_cfg().train, 1), device="cpu")


def test_check_fits_refuses_with_the_numbers(tmp_path, monkeypatch) -> None:
    cfg = _cfg()
    need = 16 * num_parameters(cfg.model)  # fp32 Adam: 4 + 4 + 8 B per parameter
    _meminfo(tmp_path, monkeypatch, need // 1024 - 1)
    with pytest.raises(ConfigError, match=r"^model \([\d,]+ parameters\) does not fit: .* need "
                                          rf"{need / 1024**3:.2f} GiB per rank \(4\+4\+8 B per parameter"
                                          r".* no single change .* fits on 1 rank:"):
        check_fits(cfg, plan_layout(cfg.train, 1), device="cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two CPU ranks share the machine's memory
    _meminfo(tmp_path, monkeypatch, need // 1024 + 1)
    with pytest.raises(ConfigError, match=r"× 2 ranks on this machine"):
        check_fits(cfg, plan_layout(cfg.train, 2), device="cpu")


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
    assert chunked.peak == plain.peak - plain.logits + chunked.logits
    assert plain.peak == plain.states.total + plain.activations + plain.logits


def test_table_shows_the_working_memory_of_each_setting() -> None:
    cfg = _model_cfg(recompute_granularity="selective", cross_entropy_chunk_size=256)
    text = plan_table(plan(cfg, 3200, [1, 8]), cfg)
    assert "activations / microbatch (2 × 512 tokens): 34.0 MiB (selective); none 74.0 MiB, selective 34.0 MiB" in text
    assert "logits / microbatch: 2.9 MiB (chunked per 256 tokens); plain 11.7 MiB" in text
    (head,) = [line for line in text.splitlines() if line.split()[:1] == ["dp"]]
    assert head.split()[-1] == "peak"


def test_check_fits_counts_activations_and_names_selective_recompute(tmp_path, monkeypatch) -> None:
    cfg = _model_cfg(num_layers=64, seq_length=4096)
    rank = plan(cfg, 3200, [1]).ranks[0]
    _meminfo(tmp_path, monkeypatch, int(rank.states.total + rank.activations / 2) // 1024)  # states fit
    with pytest.raises(ConfigError, match=r"activations and logits .* it fits with "
                                          r"model.recompute_granularity=selective \("):
        check_fits(cfg, plan_layout(cfg.train, 1), device="cpu")
    cfg.model.recompute_granularity = "selective"  # 5as/h = 80 of the 114 per-layer terms gone
    check_fits(cfg, plan_layout(cfg.train, 1), device="cpu")


# A model small enough to count by hand: head dim 16, 4 query heads, 2 key-value groups, tied embedding.
SMALL = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 192, "num_attention_heads": 4,
         "num_query_groups": 2, "kv_channels": 16, "vocab_size": 100, "seq_length": 32}
# Per layer: q 64×64 + k 32×64 + v 32×64 + o 64×64 = 12288, gate/up/down 3 × 192×64 = 36864 (split by
# tensor parallel); norms 64 + 64 + 16 + 16 = 160 (replicated). Embedding 100×64 = 6400, final norm 64.
SMALL_SPLIT = 2 * (12288 + 36864)
SMALL_REPLICATED = 6400 + 64 + 2 * 160
SMALL_PARAMETERS = SMALL_SPLIT + SMALL_REPLICATED  # 105088


def _dims(world: int, *, tp: int = 1, replicate: int = 1, fsdp: bool = True) -> ParallelDims:
    return ParallelDims(world_size=world, rank=0, dp_size=world // tp, dp_rank=0, tp_size=tp,
                        dp_replicate=replicate, fsdp=fsdp)


def test_fsdp2_chunks_dim_0_like_torch_chunk() -> None:
    assert [local_shape("embedding.weight", (320, 128), dp_shard=4, shard_rank=r) for r in range(4)] == \
        [(80, 128)] * 4
    norm = "layers.0.input_layernorm.weight"
    assert [local_shape(norm, (10,), dp_shard=4, shard_rank=r) for r in range(4)] == [(3,), (3,), (3,), (1,)]
    assert [local_shape(norm, (5,), dp_shard=4, shard_rank=r) for r in range(4)] == [(2,), (2,), (1,), (0,)]


@pytest.mark.parametrize(("name", "shape", "local"), [
    ("layers.1.self_attn.q_proj.weight", (512, 256), (128, 256)),  # column-wise: output rows
    ("layers.1.self_attn.k_proj.weight", (128, 256), (32, 256)),
    ("layers.1.self_attn.v_proj.weight", (128, 256), (32, 256)),
    ("layers.1.mlp.gate_proj.weight", (768, 256), (192, 256)),
    ("layers.1.mlp.up_proj.weight", (768, 256), (192, 256)),
    ("layers.1.self_attn.o_proj.weight", (256, 512), (256, 128)),  # row-wise: input columns
    ("layers.1.mlp.down_proj.weight", (256, 768), (256, 192)),
    ("embedding.weight", (1000, 256), (1000, 256)),  # replicated
    ("output_layer.weight", (1000, 256), (1000, 256)),
    ("final_norm.weight", (256,), (256,)),
    ("layers.1.self_attn.q_norm.weight", (64,), (64,)),
    ("layers.1.post_attention_layernorm.weight", (256,), (256,)),
])
def test_tensor_parallel_splits_colwise_on_dim_0_rowwise_on_dim_1(name, shape, local) -> None:
    assert {local_shape(name, shape, tp=4, tp_rank=r) for r in range(4)} == {local}


def test_fsdp2_chunks_the_tensor_parallel_part() -> None:
    up, down = "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"
    # 768 rows / tp 2 = 384, in 5 chunks of ceil(384 / 5) = 77: 77, 77, 77, 77, 76
    assert [local_shape(up, (768, 256), 2, 1, 5, r) for r in range(5)] == [(77, 256)] * 4 + [(76, 256)]
    # 768 columns / tp 2 = 384; 256 rows in 3 chunks of 86: 86, 86, 84
    assert [local_shape(down, (256, 768), 2, 0, 3, r) for r in range(3)] == [(86, 384)] * 2 + [(84, 384)]


def test_state_bytes_of_one_rank_counted_by_hand() -> None:
    model, adam = ModelConfig(**SMALL), OptimizerConfig(lr=1e-3, bf16=True)
    assert meta_parameter_count(model) == SMALL_PARAMETERS == num_parameters(model)
    # tp 2 × FSDP2 2: every split tensor and the replicated ones halve evenly:
    # (105088 - 6784) / 4 + 6784 / 2 = 24576 + 3392 = 27968 elements on every rank
    even = StateBytes(params=4 * 27968, grads=4 * 27968, optimizer=8 * 27968)
    dims = _dims(4, tp=2)
    assert {state_bytes(model, adam, dims, tp_rank=t, shard_rank=r) for t in (0, 1) for r in (0, 1)} == {even}
    # FSDP2 3 (no tp), rank 0: embedding 34 rows × 64 + final norm 22; per layer q 22×64, k and v 11×64,
    # o 22×64, gate and up 64×64, down 22×192, norms 22 + 22 + 6 + 6 -> 16696
    first = 34 * 64 + 22 + 2 * (22 * 64 + 2 * 11 * 64 + 22 * 64 + 2 * 64 * 64 + 22 * 192 + 56)
    # rank 2, the short chunks: embedding 32 rows, final norm 20; q and o 20 rows, k and v 10, gate and up
    # 64, down 20; norms 20 + 20 + 4 + 4
    last = 32 * 64 + 20 + 2 * (20 * 64 + 2 * 10 * 64 + 20 * 64 + 2 * 64 * 64 + 20 * 192 + 48)
    assert (first, last) == (35590, 33908)
    sgd = OptimizerConfig(lr=1e-3, optimizer="sgd")  # fp32, momentum 0.9: 4 B
    assert state_bytes(model, sgd, _dims(3)) == StateBytes(4 * first, 4 * first, 4 * first)
    assert state_bytes(model, sgd, _dims(3), shard_rank=2) == StateBytes(4 * last, 4 * last, 4 * last)


@pytest.mark.parametrize(("tp", "shards"), [(1, 1), (1, 3), (2, 1), (2, 3), (4, 5)])
def test_shards_over_all_ranks_add_up_to_the_model_once_per_tensor_parallel_rank(tp, shards) -> None:
    model, adam = ModelConfig(**SMALL), OptimizerConfig(lr=1e-3, bf16=True)
    ranks = [state_bytes(model, adam, _dims(tp * shards, tp=tp), tp_rank=t, shard_rank=r)
             for t in range(tp) for r in range(shards)]
    # split tensors once in all; every tensor-parallel rank holds its own copy of the replicated ones
    elements = SMALL_SPLIT + tp * SMALL_REPLICATED
    assert sum(r.params for r in ranks) == 4 * elements  # fp32 parameters even under bf16: no master copy
    assert sum(r.grads for r in ranks) == 4 * elements
    assert sum(r.optimizer for r in ranks) == 8 * elements
    assert ranks[0].total == max(r.total for r in ranks)  # rank 0 holds the largest shard


def test_hsdp_replicas_hold_the_same_shard_as_fsdp2_over_one_replica() -> None:
    model, adam = ModelConfig(**SMALL), OptimizerConfig(lr=1e-3, bf16=True)
    hsdp = _dims(16, tp=2, replicate=2)  # 2 replicas × 4 shards × tp 2
    assert hsdp.dp_shard == 4
    fsdp = _dims(8, tp=2)  # one replica of 4 shards × tp 2
    assert state_bytes(model, adam, hsdp, shard_rank=3) == state_bytes(model, adam, fsdp, shard_rank=3)
    assert state_bytes(model, adam, hsdp).params < state_bytes(model, adam, _dims(4, tp=2)).params


def test_native_engine_keeps_megatrons_accounting_whatever_the_layout() -> None:
    model, adam = ModelConfig(**SMALL), OptimizerConfig(lr=1e-3, bf16=True)
    n = SMALL_PARAMETERS
    assert state_bytes(model, adam, _dims(4, fsdp=False)) == StateBytes(2 * n, 4 * n, 12 * n)
    zero1 = OptimizerConfig(lr=1e-3, bf16=True, use_distributed_optimizer=True)
    assert state_bytes(model, zero1, _dims(4, fsdp=False)) == StateBytes(2 * n, 4 * n, 12 * (n // 4))


def test_gathered_compute_copies_are_the_root_plus_two_blocks_or_every_block() -> None:
    model = ModelConfig(**{**SMALL, "num_layers": 4})
    shapes, bf16 = parameter_shapes(model), OptimizerConfig(lr=1e-3, bf16=True)
    root, block = 6400 + 64, 12288 // 2 + 36864 // 2 + 160  # tp 2: the root replicated, blocks split
    dims = _dims(8, tp=2)
    assert gathered_bytes(bf16, dims, shapes, reshard_after_forward=True) == 2 * (root + 2 * block)
    assert gathered_bytes(bf16, dims, shapes, reshard_after_forward=False) == 2 * (root + 4 * block)
    assert gathered_bytes(bf16, _dims(8, fsdp=False), shapes, reshard_after_forward=True) == 0


def test_tensor_parallel_divides_all_but_ten_of_the_activation_terms() -> None:
    s, b, h, a, L = 512, 2, 256, 4, 4
    cfg = _model_cfg(tensor_model_parallel_size=2)
    activations, logits = working_memory(cfg)
    assert activations == pytest.approx(L * s * b * h * (10 + 24 / 2 + 5 * a * s / (h * 2)))
    assert logits == 12 * 2 * 512 * 1000  # the output layer is replicated: the full vocabulary
    selective = _model_cfg(tensor_model_parallel_size=2, recompute_granularity="selective")
    assert working_memory(selective)[0] == pytest.approx(L * s * b * h * 22)


def _engine_cfg(**dist) -> ConfigContainer:
    return ConfigContainer(train=TrainingConfig(train_iters=100, global_batch_size=32, micro_batch_size=2),
                           model=ModelConfig(**SMALL, tensor_model_parallel_size=2),
                           optimizer=OptimizerConfig(lr=1e-3, bf16=True),
                           dist=DistributedConfig(use_torch_fsdp2=True, **dist))


def test_plan_lays_the_configs_layout_over_each_world_size(tmp_path, monkeypatch) -> None:
    _meminfo(tmp_path, monkeypatch, 64 * 1024 * 1024)
    cfg = _engine_cfg()
    p = plan(cfg, 3200, [3, 4])
    assert p.unsplit == (3,)  # tp 2 does not divide 3 ranks
    (rank,) = p.ranks
    assert (rank.dims.dp_size, rank.dims.dp_shard, rank.dims.tp_size, rank.microbatches) == (2, 2, 2, 8)
    assert rank.states == StateBytes(4 * 27968, 4 * 27968, 8 * 27968)  # counted by hand above
    text = plan_table(p, cfg)
    assert ("PyTorch's engine (FSDP2), bf16 compute, adam: fp32 params 4 B + fp32 grads 4 B + optimizer "
            "state 8 B per element of the rank's shard") in text
    (head,) = [line.split() for line in text.splitlines() if line.split()[:2] == ["world", "dp"]]
    assert head == ["world", "dp", "shard", "tp", "microbatches", "params", "grads", "optimizer", "gathered",
                    "activations", "logits", "peak"]
    assert "world 3: n/a, model.tensor_model_parallel_size (2)" in text
    hsdp = plan(_engine_cfg(data_parallel_replicate_degree=2), 3200, [4, 8]).ranks
    assert [(r.dims.world_size, r.dims.dp_replicate, r.dims.dp_shard) for r in hsdp] == [(4, 2, 1), (8, 2, 2)]
    assert plan(_engine_cfg(data_parallel_replicate_degree=2), 3200, [6]).unsplit == (6,)  # dp 3 / 2 replicas
    assert re.search(r"^world 4: peak [\d.]+ MiB per rank, fits$", text, re.M)


def test_advice_order_is_recompute_chunking_sharding_fsdp2_then_tensor_parallel() -> None:
    cfg = _cfg(bf16=True)
    engine = "dist.use_torch_fsdp2=true optimizer.use_distributed_optimizer=false"
    assert [override for override, _ in candidates(cfg, 8)] == [
        "model.recompute_granularity=selective",
        "model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1",
        "model.cross_entropy_chunk_size=4096", "optimizer.use_distributed_optimizer=true", engine,
        f"{engine} model.tensor_model_parallel_size=2",  # 4 heads, 2 groups: tp 4 and 8 do not divide them
    ]
    assert [override for override, _ in candidates(cfg, 1)][-1] == "model.cross_entropy_chunk_size=4096"


def test_qwen3_8b_on_eight_70_gib_ranks_needs_tensor_parallel_4(tmp_path, monkeypatch) -> None:
    from anneal.recipes.qwen.common import shipped_model

    cfg = ConfigContainer(train=TrainingConfig(train_iters=100, global_batch_size=32, micro_batch_size=1),
                          model=shipped_model("qwen3_8b"), optimizer=OptimizerConfig(lr=1e-3, bf16=True))
    # By hand (GiB per rank, s = h = 4096, 36 layers, 8.19B parameters of which 1.245B are replicated under
    # tensor parallel): native 18 B × 8.19B = 137; the distributed optimizer 57 + activations 109;
    # FSDP2 over 8: 15.3 + 109; tp 2 × FSDP2 4: 17.6 + gathered 2.7 + activations 57.4 (10 + 12 + 80 per
    # layer) + logits 7.0 = 84.6; tp 4 × FSDP2 2: 22.2 + 2.5 + 31.5 (10 + 6 + 40) + 7.0 = 63.2.
    _meminfo(tmp_path, monkeypatch, 70 * 1024 * 1024)
    with pytest.raises(ConfigError, match=r"it fits with dist.use_torch_fsdp2=true "
                                          r"optimizer.use_distributed_optimizer=false "
                                          r"model.tensor_model_parallel_size=4 \(63.\d\d GiB per rank\)$"):
        check_fits(cfg, plan_layout(cfg.train, 8), device="cpu")
    _meminfo(tmp_path, monkeypatch, 10 * 1024 * 1024)
    with pytest.raises(ConfigError, match=r"no single change .* fits on 8 ranks:"):
        check_fits(cfg, plan_layout(cfg.train, 8), device="cpu")
    taken = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tensor_model_parallel_size=4),
                                dist=DistributedConfig(use_torch_fsdp2=True))
    _meminfo(tmp_path, monkeypatch, 70 * 1024 * 1024)
    check_fits(taken, plan_layout(taken.train, 8, tp=4, fsdp=True), device="cpu")  # the advice, taken, fits
