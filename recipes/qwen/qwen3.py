"""Qwen3 dense pretraining recipes: the published shapes with Megatron-Bridge's training setup.

Bridge's Qwen3 recipes share one shape: sequence 4096, global batch 32, micro batch 2, 300k
iterations, max lr 3e-4, min lr 3e-5, 500 warmup iterations, bf16 mixed precision. Qwen3-4B uses a
WSD schedule here; the others keep Bridge's cosine.
"""

from __future__ import annotations

from anneal.config.container import ConfigContainer
from anneal.recipes.qwen.common import pretrain_config, shipped_model
from anneal.recipes.utils.optimizer_utils import (
    distributed_fused_adam_with_cosine_annealing,
    distributed_fused_adam_with_wsd,
)

MAX_LR, MIN_LR, WARMUP_ITERS = 3e-4, 3e-5, 500


def qwen3_0p6b() -> ConfigContainer:
    """Qwen3-0.6B (596,049,920 parameters), cosine decay."""
    return _cosine("qwen3_0p6b")


def qwen3_1p7b() -> ConfigContainer:
    """Qwen3-1.7B (1,720,574,976 parameters), cosine decay."""
    return _cosine("qwen3_1p7b")


def qwen3_4b() -> ConfigContainer:
    """Qwen3-4B (4,022,468,096 parameters), WSD: 500 warmup iterations, max lr held, then a
    ``1 - sqrt`` anneal to 3e-5 over the last 20% of the run (60k of 300k iterations)."""
    optimizer, scheduler = distributed_fused_adam_with_wsd(
        lr_warmup_iters=WARMUP_ITERS, max_lr=MAX_LR, min_lr=MIN_LR, lr_wsd_decay_style="minus_sqrt"
    )
    return pretrain_config(shipped_model("qwen3_4b"), optimizer, scheduler)


def qwen3_8b() -> ConfigContainer:
    """Qwen3-8B (8,190,735,360 parameters, untied output layer), cosine decay."""
    return _cosine("qwen3_8b")


def _cosine(model: str) -> ConfigContainer:
    optimizer, scheduler = distributed_fused_adam_with_cosine_annealing(
        lr_warmup_iters=WARMUP_ITERS, max_lr=MAX_LR, min_lr=MIN_LR
    )
    return pretrain_config(shipped_model(model), optimizer, scheduler)
