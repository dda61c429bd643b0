"""The dry run's plan: meta-device counts, per-rank shards on both engines, working memory, the advice."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import subprocess
import sys

import pytest

from anneal.config.container import ConfigContainer
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.runtime import DistributedConfig
from anneal.config.training import TrainingConfig
from anneal.errors import ConfigError
from anneal.model.flops import flops_per_token, num_parameters
from anneal.parallel import ParallelDims, plan_layout
from anneal.devices import Target, accelerator_target
from anneal.plan_report import plan_table
from anneal.planner import (StateBytes, bytes_per_parameter, candidates, check_fits, construction_bytes,
                            gathered_bytes, local_shape, meta_parameter_count, parameter_shapes, plan,
                            smallest_change, state_bytes, working_memory)

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
    """In a fresh interpreter: other tests (flex_attention's, compile's) import dynamo in this one."""
    code = ("import sys, time, torch\n"  # the import of torch itself is not what is timed
            "from anneal.planner import meta_parameter_count\n"
            "from anneal.recipes.qwen.common import shipped_model\n"
            "start = time.perf_counter()\n"
            "meta_parameter_count(shipped_model('qwen3_8b'))\n"
            "print(time.perf_counter() - start, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 2.0  # ~0.15 s; PyTorch's meta init path would import dynamo (3-5 s)
    assert out[1] == "False"


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
    import anneal.devices

    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {kib} kB\n")
    monkeypatch.setattr(anneal.devices, "MEMINFO", str(path))


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

    def expected(scores: bool) -> float:
        layer = s * b * h * (34 + (5 * a * s / h if scores else 0))  # 16-bit, no recompute (Korthikanti eq. 1)
        return {"none": L * layer, "selective": L * s * b * h * 34,
                "full-1": L * 2 * s * b * h + layer,  # each layer's input + the layer being recomputed
                "full-2": 2 * 2 * s * b * h + 2 * layer,  # two units of two layers
                "block-1": 2 * s * b * h + 3 * layer}[per_layer_terms]

    for kernel, scores in (("math", True), ("flash", False)):
        rank = plan(_model_cfg(**recompute), 3200, [1], kernel=kernel).ranks[0]
        assert rank.activations == pytest.approx(expected(scores))
        fp32 = plan(_model_cfg(bf16=False, **recompute), 3200, [1], kernel=kernel).ranks[0]
        assert fp32.activations == pytest.approx(2 * expected(scores))


def test_chunked_loss_shrinks_the_logits_and_the_peak() -> None:
    plain = plan(_model_cfg(), 3200, [1]).ranks[0]
    chunked = plan(_model_cfg(cross_entropy_chunk_size=128), 3200, [1]).ranks[0]
    assert plain.logits == 12 * 2 * 512 * 1000  # three fp32 [tokens, vocab] tensors
    assert chunked.logits == 12 * 128 * 1000
    assert chunked.peak == plain.peak - plain.logits + chunked.logits
    assert plain.peak == plain.states.total + plain.activations + plain.logits


def test_table_shows_the_working_memory_of_each_setting() -> None:
    cfg = _model_cfg(recompute_granularity="selective", cross_entropy_chunk_size=256)
    text = plan_table(plan(cfg, 3200, [1, 8], kernel="math"), cfg)
    assert "activations / microbatch (2 × 512 tokens): 34.0 MiB (selective); none 74.0 MiB, selective 34.0 MiB" in text
    assert "logits / microbatch: 2.9 MiB (chunked per 256 tokens); plain 11.7 MiB" in text
    (head,) = [line for line in text.splitlines() if line.split()[:1] == ["dp"]]
    assert head.split()[-1] == "peak"


def _gpu(free: float) -> Target:
    return Target("cuda:0", "cuda", int(free), "a test's figure")


def test_check_fits_counts_activations_and_names_selective_recompute() -> None:
    cfg = _model_cfg(bf16=False, num_layers=64, seq_length=4096)  # fp32 with GQA on CUDA: K/V repeated
    rank = plan(cfg, 3200, [1], target=_gpu(0)).ranks[0]
    gpu = _gpu(rank.states.total + rank.logits + rank.activations * 36 / 38)  # the states fit
    with pytest.raises(ConfigError, match=r"activations and logits .* it fits with "
                                          r"model.recompute_granularity=selective \("):
        check_fits(cfg, plan_layout(cfg.train, 1), "cuda", gpu)
    cfg.model.recompute_granularity = "selective"  # the repeated K and V, 4 of the 38 per-layer terms, gone
    check_fits(cfg, plan_layout(cfg.train, 1), "cuda", gpu)
    cfg.model.recompute_granularity, cfg.optimizer.bf16 = None, True  # bf16: flash, nothing to recompute
    check_fits(cfg, plan_layout(cfg.train, 1), "cuda", gpu)


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
    activations, logits = working_memory(cfg, "math")
    assert activations == pytest.approx(L * s * b * h * (10 + 24 / 2 + 5 * a * s / (h * 2)))
    assert working_memory(cfg, "flash")[0] == pytest.approx(L * s * b * h * (10 + 24 / 2))
    assert logits == 12 * 2 * 512 * 1000  # the output layer is replicated: the full vocabulary
    selective = _model_cfg(tensor_model_parallel_size=2, recompute_granularity="selective")
    assert working_memory(selective, "math")[0] == pytest.approx(L * s * b * h * 22)


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
    # counted by hand above; 8 microbatches: the gradient is also kept unsharded (2 shards' worth) until the
    # last one's backward reduces it (dist.fsdp_grad_sync_each_microbatch=false)
    assert rank.states == StateBytes(4 * 27968, 4 * 27968 + 4 * 2 * 27968, 8 * 27968)
    text = plan_table(p, cfg)
    assert ("PyTorch's engine (FSDP2), bf16 compute, adam: fp32 params 4 B + fp32 grads 4 B + optimizer "
            "state 8 B per element of the rank's shard") in text
    (head,) = [line.split() for line in text.splitlines() if line.split()[:2] == ["world", "dp"]]
    assert head == ["world", "dp", "shard", "tp", "microbatches", "params", "grads", "optimizer", "gathered",
                    "activations", "logits", "build", "peak"]
    assert "world 3: n/a, model.tensor_model_parallel_size (2)" in text
    hsdp = plan(_engine_cfg(data_parallel_replicate_degree=2), 3200, [4, 8]).ranks
    assert [(r.dims.world_size, r.dims.dp_replicate, r.dims.dp_shard) for r in hsdp] == [(4, 2, 1), (8, 2, 2)]
    assert plan(_engine_cfg(data_parallel_replicate_degree=2), 3200, [6]).unsplit == (6,)  # dp 3 / 2 replicas
    assert re.search(r"^world 4: peak [\d.]+ MiB per rank, building [\d.]+ MiB, fits$", text, re.M)


def test_advice_order_is_recompute_chunking_sharding_fsdp2_then_tensor_parallel() -> None:
    cfg = _cfg(bf16=True)
    engine = "dist.use_torch_fsdp2=true optimizer.use_distributed_optimizer=false"
    assert [override for override, _ in candidates(cfg, 8)] == [
        "model.recompute_granularity=selective",
        "model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1",
        "model.cross_entropy_chunk_size=4096", "optimizer.use_distributed_optimizer=true", engine,
        f"{engine} dist.fsdp_grad_sync_each_microbatch=true",  # FSDP2 keeping no unsharded gradient
        f"{engine} model.tensor_model_parallel_size=2",  # 4 heads, 2 groups: tp 4 and 8 do not divide them
    ]
    fsdp2 = dataclasses.replace(cfg, dist=DistributedConfig(use_torch_fsdp2=True),
                                optimizer=dataclasses.replace(cfg.optimizer, use_distributed_optimizer=False))
    assert "dist.fsdp_grad_sync_each_microbatch=true" in [override for override, _ in candidates(fsdp2, 8)]
    assert [override for override, _ in candidates(cfg, 1)][-1] == "model.cross_entropy_chunk_size=4096"


def test_qwen3_8b_on_eight_70_gib_ranks_needs_tensor_parallel_4_only_when_scores_are_stored() -> None:
    from anneal.recipes.qwen.common import shipped_model

    cfg = ConfigContainer(train=TrainingConfig(train_iters=100, global_batch_size=32, micro_batch_size=1),
                          model=shipped_model("qwen3_8b"), optimizer=OptimizerConfig(lr=1e-3, bf16=True))
    shapes, engine = parameter_shapes(cfg.model), "dist.use_torch_fsdp2=true optimizer.use_distributed_optimizer=false"
    # By hand (GiB per rank, s = h = 4096, 36 layers, 8.19B parameters of which 1.245B are replicated under
    # tensor parallel), the math kernel storing scores: native 18 B × 8.19B = 137; the distributed optimizer
    # 57 + activations 109; FSDP2 over 8: 15.3 + 109; tp 2 × FSDP2 4: 17.6 + gathered 2.7 + activations 57.4
    # (10 + 12 + 80 per layer) + logits 7.0 = 84.6; tp 4 × FSDP2 2: 22.2 + 2.5 + 31.5 (10 + 6 + 40) + 7.0 = 63.2,
    # plus the unsharded fp32 gradient FSDP2 keeps across its 16 microbatches (4 B × 2.98B tp-local = 11.1):
    # 74.3, too much; tp 8 fits.
    override, memory = smallest_change(cfg, 8, shapes, 70 * 1024**3, "math")
    assert (override, round(memory.need / 1024**3, 1)) == (f"{engine} model.tensor_model_parallel_size=8", 67.3)
    synced = dataclasses.replace(cfg, dist=DistributedConfig(fsdp_grad_sync_each_microbatch=True))
    override, memory = smallest_change(synced, 8, shapes, 70 * 1024**3, "math")
    assert (override, round(memory.need / 1024**3, 1)) == (f"{engine} model.tensor_model_parallel_size=4", 63.2)
    # Flash keeps no scores: activations 34 per layer (19.1), so FSDP2 over 8 reducing every microbatch fits:
    # 15.3 + gathered 3.0 (the untied root, 1.245B, and two blocks of 193M, in bf16) + 19.1 + 7.0 = 44.4
    # (reducing once per iteration adds the unsharded fp32 gradient, 30.5: 74.9).
    with pytest.raises(ConfigError, match=rf"it fits with {engine} dist.fsdp_grad_sync_each_microbatch=true "
                                          r"\(44.\d\d GiB per rank\)$"):
        check_fits(cfg, plan_layout(cfg.train, 8), "cuda", _gpu(70 * 1024**3))
    with pytest.raises(ConfigError, match=r"no single change or pair .* fits on 8 ranks: pick a smaller model"):
        check_fits(cfg, plan_layout(cfg.train, 8), "cuda", _gpu(10 * 1024**3))
    taken = dataclasses.replace(cfg, dist=DistributedConfig(use_torch_fsdp2=True,
                                                            fsdp_grad_sync_each_microbatch=True))
    check_fits(taken, plan_layout(taken.train, 8, fsdp=True), "cuda", _gpu(70 * 1024**3))  # the advice, taken


# --- the target: attention kernel, construction peak, time, the real device -------------------------------

@pytest.mark.parametrize(("precision", "device", "kernel"), [
    ("bf16", "cuda", "flash"), ("fp16", "cuda", "flash"), ("fp32", "cuda", "efficient"),
    ("fp64", "cuda", "math"),
    ("bf16", "cpu", "flash"), ("fp16", "cpu", "flash"), ("fp32", "cpu", "flash"), ("fp64", "cpu", "flash"),
])
def test_attention_kernel_rule(precision, device, kernel) -> None:
    from anneal.devices import attention_kernel

    assert attention_kernel(precision, device) == kernel


def test_fp32_attention_on_cuda_counts_the_repeated_kv_not_the_scores() -> None:
    s, b, h, a, d, L = 512, 2, 256, 4, 64, 4
    cfg = _model_cfg(bf16=False)  # 4 query heads over 2 K/V groups, head dim 64
    p = plan(cfg, 3200, [1], target=_gpu(0))
    repeated_kv = 2 * b * a * s * d * 4  # K and V at every query head, fp32
    assert p.kernel == "efficient"
    assert p.ranks[0].activations == pytest.approx(L * (2 * 34 * s * b * h + repeated_kv))  # no 5as/h term
    cfg.model.recompute_granularity = "selective"  # recomputes the attention core, the repetition with it
    assert plan(cfg, 3200, [1], target=_gpu(0)).ranks[0].activations == pytest.approx(L * 2 * 34 * s * b * h)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_sdpa_saves_no_score_matrix_for_the_backward(dtype) -> None:
    """The rule's CPU row, measured: the model's attention call keeps nothing of shape [.., s, s]."""
    import torch
    import torch.nn.functional as F

    s, dt = 64, getattr(torch, dtype)
    q = torch.randn(1, 4, s, 16, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, 2, s, 16, dtype=dt, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert saved and not any(shape[-2:] == (s, s) for shape in saved)


def test_construction_peak_counted_from_the_build_code() -> None:
    model = ModelConfig(**SMALL)
    shapes, n = parameter_shapes(model), SMALL_PARAMETERS
    bf16 = OptimizerConfig(lr=1e-3, bf16=True)
    zero1 = OptimizerConfig(lr=1e-3, bf16=True, use_distributed_optimizer=True)
    layer = 12288 + 36864 + 160  # the largest block, in fp32 while it is materialised
    # native: bf16 flat buffer 2 + fp32 master 4 (÷ dp when sharded), and one block in fp32
    assert construction_bytes(bf16, _dims(4, fsdp=False), shapes) == 6 * n + 4 * layer
    assert construction_bytes(zero1, _dims(4, fsdp=False), shapes) == 2 * n + 4 * (n // 4) + 4 * layer
    fp32 = OptimizerConfig(lr=1e-3)  # the flat buffer is the master
    assert construction_bytes(fp32, _dims(4, fsdp=False), shapes) == 4 * n + 4 * layer
    # FSDP2 over 4: the root whole (6400 + 64), each block's shard on rank 0 (q 16×64, k and v 8×64, o
    # 16×64, gate and up 48×64, down 16×192, norms 16 + 16 + 4 + 4 = 12328), one block whole (49312)
    assert construction_bytes(bf16, _dims(4), shapes) == 4 * (6464 + 2 * 12328 + layer)


@pytest.mark.parametrize("name", ["qwen3_0p6b", "qwen3_8b"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_native_construction_never_exceeds_the_steady_state(name, precision) -> None:
    from anneal.recipes import RECIPES

    model = RECIPES[name]().model
    shapes = parameter_shapes(model)
    n = sum(math.prod(shape) for _, shape in shapes)
    for distributed, dp in itertools.product((False, True), (1, 8, 64, 1024)):
        optimizer = OptimizerConfig(lr=1e-3, bf16=precision == "bf16", fp16=precision == "fp16",
                                    use_distributed_optimizer=distributed)
        dims = _dims(dp, fsdp=False)
        steady = state_bytes(model, optimizer, dims, shapes=shapes).total
        assert construction_bytes(optimizer, dims, shapes) <= steady, (distributed, dp)
    if precision == "bf16":  # ZeRO-1 over 64 ranks: 2 + 4/64 B per parameter and one block, against 6.19
        zero1 = OptimizerConfig(lr=1e-3, bf16=True, use_distributed_optimizer=True)
        assert construction_bytes(zero1, _dims(64, fsdp=False), shapes) / n < 0.55 * 6.19


def test_the_larger_of_the_steady_and_the_construction_peak_decides(tmp_path, monkeypatch) -> None:
    # FSDP2 over 64 ranks with a large vocabulary: the root's fp32 weights, whole while built, outweigh
    # the few rows of state and the short sequence's activations each rank holds afterwards.
    model = {**SMALL, "hidden_size": 256, "kv_channels": 64, "vocab_size": 4000, "seq_length": 16}
    cfg = ConfigContainer(train=TrainingConfig(train_iters=100, global_batch_size=64, micro_batch_size=1),
                          model=ModelConfig(**model), optimizer=OptimizerConfig(lr=1e-3, bf16=True),
                          dist=DistributedConfig(use_torch_fsdp2=True))
    (rank,) = plan(cfg, 3200, [64]).ranks
    assert rank.construction > rank.peak
    _meminfo(tmp_path, monkeypatch, int((rank.peak + rank.construction) / 2) // 1024)
    with pytest.raises(ConfigError, match=r"GiB in all \(building the model: .* GiB\), but cpu has"):
        check_fits(cfg, plan_layout(cfg.train, 64, fsdp=True), device="cpu")
    native = dataclasses.replace(cfg, dist=DistributedConfig())  # its build stays within the steady state
    (rank,) = plan(native, 3200, [64]).ranks
    assert rank.construction < rank.peak


def test_time_estimate_on_eight_h100s() -> None:
    from anneal.recipes import RECIPES

    cfg = RECIPES["qwen3_4b"]()
    p = plan(cfg, cfg.validate().train_samples, [8], target=accelerator_target("H100-80GB"))
    e = p.estimate(8, 0.38)
    # PaLM's count: 6 N per token plus 12·L·s·heads·head_dim for attention (36 layers, 32 heads of 128)
    per_token = 6 * PUBLISHED_PARAMETERS["qwen3_4b"] + 12 * 36 * 4096 * 32 * 128
    approximate = per_token * p.tokens_per_iteration / (8 * 989e12 * 0.38)
    assert e.seconds_per_iteration == pytest.approx(approximate, rel=0.03)
    assert e.seconds == pytest.approx(300_000 * e.seconds_per_iteration)
    assert e.tokens_per_day * e.seconds_per_iteration == pytest.approx(86400 * p.tokens_per_iteration)
    assert p.estimate(16, 0.38).seconds == pytest.approx(e.seconds / 2)
    assert plan(cfg, 3200, [8], target=_gpu(1)).estimate(8, 0.38) is None  # no known peak


def _one_h100(monkeypatch) -> None:
    """This machine, as torch sees it, has one idle H100: 79.11 GiB, 0.5 of them the CUDA context."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (int(78.61 * 1024**3), int(79.11 * 1024**3)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")


def test_pre_launch_check_admits_qwen3_0p6b_on_one_h100(monkeypatch) -> None:
    from anneal.recipes import RECIPES

    _one_h100(monkeypatch)
    cfg = RECIPES["qwen3_0p6b"]()  # micro-batch 2 × 4096, bf16: flash attention
    check_fits(cfg, plan_layout(cfg.train, 1), "cuda")  # about 31 GiB
    # counting the score matrices (the old estimate, 101 GiB) it would be refused
    with_scores = plan(cfg, 3200, [1], target=_gpu(0), kernel="math").ranks[0]
    assert with_scores.need > 78.61 * 1024**3
    cfg.optimizer.bf16 = False  # fp32: the efficient kernel on K/V repeated to every head, no score matrices
    check_fits(cfg, plan_layout(cfg.train, 1), "cuda")  # about 41 GiB, 3.5 of them the repeated K and V
    cfg.train.micro_batch_size = 8  # four times the activations and logits: refused on the same device
    with pytest.raises(ConfigError, match=r"cuda:0 has 78.61 GiB free \(torch.cuda.mem_get_info on cuda:0\)"):
        check_fits(cfg, plan_layout(cfg.train, 1), "cuda")


def test_qwen3_4b_fits_eight_h100s_and_one_names_the_smallest_change(compose) -> None:
    cfg = compose("recipe=qwen3_4b", "plan.device=H100-80GB", "plan.world_size=1")
    text = plan_table(plan(cfg, cfg.validate().train_samples, [1, 8]), cfg)
    one = next(line for line in text.splitlines() if line.startswith("world 1:"))
    # 18 B per parameter (67.4 GiB) + 23.9 GiB of activations + 13.9 of logits: recompute alone leaves
    # 83.4, chunking alone 91.5; both together 67.4 + 2.1 + 7.0 = 76.5; as it is, dp 4 shards the state
    assert re.fullmatch(r"world 1: peak 105.\d\d GiB per rank, building 23.\d\d GiB, does not fit; it fits with "
                        r"model.recompute_granularity=full model.recompute_method=uniform "
                        r"model.recompute_num_layers=1 model.cross_entropy_chunk_size=4096 \(76.\d\d GiB per "
                        r"rank\); as configured it fits on 4 ranks", one)
    assert re.search(r"^world 8: peak 65.\d\d GiB per rank, building 10.\d\d GiB, fits$", text, re.M)
    assert re.search(r"^  time: 1.\d+ s / iteration, 4.\d+ days for the run, [\d.]+B tokens / day on 8 × "
                     r"H100-80GB at 38% MFU", text, re.M)


def test_dry_run_plans_the_named_device_and_rank_count() -> None:
    from anneal_testing import run_cli

    out = run_cli("recipe=qwen3_4b", "dry_run=true", "plan.device=H100-80GB", "plan.world_size=1")
    assert out.returncode == 0, out.stderr
    plan_part = out.stdout.split("# plan", 1)[1]
    assert "target: H100-80GB (plan.device), 78.61 GiB per rank" in plan_part
    assert re.search(r"^world 1: peak [\d.]+ GiB per rank, building [\d.]+ GiB, does not fit; it fits with ",
                     plan_part, re.M)
    assert re.search(r"^  time: [\d.]+ s / iteration, [\d.]+ days for the run", plan_part, re.M)


def test_bench_gpu_run_shows_why_it_failed(monkeypatch) -> None:
    import subprocess

    from anneal.bench import gpu

    refusal = "anneal: error: model (1,720,574,976 parameters) does not fit: ..."
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 2, "", f"log\n{refusal}\n"))
    with pytest.raises(RuntimeError, match=r"qwen3_1p7b \(native\) exited 2:\nlog\n" + re.escape(refusal)):
        gpu._run("qwen3_1p7b", "native", 10)


def test_fsdp2_counts_the_unsharded_gradient_it_keeps_across_microbatches(compose) -> None:
    """Reducing once per iteration keeps the whole (TP-local) fp32 gradient until the last microbatch."""
    from anneal.planner import config_layout, kernel_of, parameter_shapes, rank_memory

    def grads(*overrides: str) -> int:
        cfg = compose("dist.use_torch_fsdp2=true", *overrides)
        shapes = parameter_shapes(cfg.model)
        return rank_memory(cfg, config_layout(cfg, 4), shapes, kernel_of(cfg, "cpu")).states.grads

    n = sum(math.prod(shape) for _, shape in parameter_shapes(compose().model))
    one_micro = grads("train.global_batch_size=32", "train.micro_batch_size=8")  # 32 / 4 ranks: 1 microbatch
    several = grads("train.global_batch_size=32", "train.micro_batch_size=2")  # 4 microbatches
    synced = grads("train.global_batch_size=32", "train.micro_batch_size=2",
                   "dist.fsdp_grad_sync_each_microbatch=true")
    assert synced == one_micro and 4 * n // 4 - 64 <= one_micro <= 4 * n // 4 + 4096  # sharded over 4
    assert several - one_micro == 4 * n  # plus the whole fp32 gradient


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("device_type", "kernel"), [("cpu", "sdpa+mask"), ("cuda", "flex_attention")])
def test_packed_documents_count_their_mask_and_rotary_tables(device_type: str, kernel: str,
                                                             precision: str) -> None:
    from anneal.planner import kernel_of

    cfg = _cfg(bf16=precision == "bf16")
    b, s, d = cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.head_dim
    itemsize = 2 if cfg.optimizer.bf16 else 4
    flash = working_memory(cfg, "flash")[0]  # no scores, no repeated K/V: what the document kernels keep too
    cfg.dataset.reset_attention_mask = True
    assert kernel_of(cfg, device_type) == kernel
    masked = working_memory(cfg, kernel)[0]
    blocks = -(-s // 128)
    expected = itemsize * b * s * s if kernel == "sdpa+mask" else 4 * (4 * b * blocks**2 + 4 * b * blocks)
    assert masked - flash == expected  # the additive [b, 1, s, s] mask, or flex's eight int32 block tables
    cfg.dataset.reset_position_ids = True
    assert working_memory(cfg, kernel)[0] - masked == 2 * b * s * d * itemsize  # cos and sin [b, 1, s, d]
    target = Target("cpu", device_type, 64 * 2**30, "test")
    p = plan(cfg, 3200, [1], target=target)
    assert p.kernel == kernel and p.ranks[0].activations == working_memory(cfg, kernel)[0]
    table = plan_table(p, cfg)
    assert "document mask (dataset.reset_attention_mask)" in table and "of which packed documents" in table
