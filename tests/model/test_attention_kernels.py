"""Which SDPA kernel attention runs (anneal.model.qwen3.expands_kv, anneal.devices.attention_kernel), the
repeated-K/V path CUDA takes in fp32, and the planner counting what that path keeps."""

from __future__ import annotations

import pytest
import torch

from anneal.config.container import ConfigContainer
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.training import TrainingConfig
from anneal.model.qwen3 import causal_attention, expands_kv
from anneal.planner import kernel_of, working_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_kv_is_repeated_only_for_fp32_grouped_queries_on_cuda(precision, device_type, gqa) -> None:
    # fp32 is outside CUDA flash's dtypes and the efficient kernel rejects enable_gqa; CPU flash takes both
    expected = precision == "fp32" and device_type == "cuda" and gqa
    assert expands_kv(DTYPES[precision], device_type, gqa) == expected


def _qkv(heads: int = 4, kv_heads: int = 2, seq: int = 8, dim: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shapes = ((2, heads, seq, dim), (2, kv_heads, seq, dim), (2, kv_heads, seq, dim))
    return tuple(torch.randn(shape, generator=g).requires_grad_() for shape in shapes)


def _output_and_grads(device_type: str) -> tuple[torch.Tensor, ...]:
    q, k, v = _qkv()
    out = causal_attention(q, k, v, device_type)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), q.grad, k.grad, v.grad


def test_repeated_kv_gives_the_outputs_and_gradients_of_enable_gqa() -> None:
    # "cuda" decides as CUDA would for these fp32 tensors (repeat K/V), SDPA then runs on CPU
    for repeated, grouped in zip(_output_and_grads("cuda"), _output_and_grads("cpu"), strict=True):
        assert repeated.shape == grouped.shape
        torch.testing.assert_close(repeated, grouped, rtol=1e-6, atol=1e-6)


def _saved_shapes(device_type: str) -> list[tuple[int, ...]]:
    q, k, v = _qkv()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        causal_attention(q, k, v, device_type)
    return saved


def test_repeated_kv_is_kept_for_the_backward_and_no_scores_are() -> None:
    repeated, grouped = _saved_shapes("cuda"), _saved_shapes("cpu")
    assert repeated.count((2, 4, 8, 16)) == grouped.count((2, 4, 8, 16)) + 2  # K and V at all 4 heads
    assert grouped.count((2, 2, 8, 16)) == 2 and (2, 2, 8, 16) not in repeated
    assert not any(shape[-2:] == (8, 8) for shape in repeated + grouped)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_planner_counts_repeated_kv_exactly_where_the_model_repeats_it(precision, device_type,
                                                                        kv_heads) -> None:
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=kv_heads,
                        kv_channels=16, seq_length=32, vocab_size=100)
    cfg = ConfigContainer(train=TrainingConfig(train_iters=10, global_batch_size=2, micro_batch_size=1),
                          model=model, optimizer=OptimizerConfig(lr=1e-3, bf16=precision == "bf16",
                                                                 fp16=precision == "fp16"))
    # flash keeps neither scores nor repeated K/V: anything above it is the repeated K and V
    repeated_kv = working_memory(cfg, kernel_of(cfg, device_type))[0] - working_memory(cfg, "flash")[0]
    elements = 1 * 4 * 32 * 16  # b · heads · s · head dim, per repeated tensor
    per_layer = 2 * elements * DTYPES[precision].itemsize  # K and V
    expected = expands_kv(DTYPES[precision], device_type, kv_heads < 4)
    assert repeated_kv == (2 * per_layer if expected else 0)  # 2 layers
