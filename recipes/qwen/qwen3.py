"""Qwen3 dense pretraining recipes: the published shapes with Megatron-Bridge's training setup.

Bridge's Qwen3 recipes share one shape: sequence 4096, global batch 32, micro batch 2, 300k
iterations, max lr 3e-4, min lr 3e-5, 500 warmup iterations, bf16 mixed precision. Qwen3-4B uses a
WSD schedule here; the others keep Bridge's cosine.

Each is planned for one node of 8 GPUs (``plan.``): data parallel 8 on anneal's native engine with
the distributed optimizer, 2 microbatches per rank per iteration. Up to 4B that is 8 × H100-80GB;
Qwen3-8B needs 109 GiB per rank without recompute, so it targets 8 × H200-141GB (on H100s it fits with
full recompute).
``tests/recipes`` checks that each fits its target by the planner.
"""

from __future__ import annotations

from anneal.config.container import ConfigContainer
from anneal.config.plan import PlanConfig
from anneal.recipes.qwen.common import pretrain_config, shipped_model
from anneal.recipes.utils.optimizer_utils import (
    distributed_fused_adam_with_cosine_annealing,
    distributed_fused_adam_with_wsd,
)

MAX_LR, MIN_LR, WARMUP_ITERS = 3e-4, 3e-5, 500


def node_of_8(device: str) -> PlanConfig:
    """The recipes' target: one node of 8 ``device`` GPUs (a fresh config each time: configs are mutable)."""
    return PlanConfig(device=device, world_size=8)


def qwen3_0p6b() -> ConfigContainer:
    """Qwen3-0.6B (596,049,920 parameters), cosine decay; planned for 8 × H100-80GB."""
    return _cosine("qwen3_0p6b", node_of_8("H100-80GB"))


def qwen3_1p7b() -> ConfigContainer:
    """Qwen3-1.7B (1,720,574,976 parameters), cosine decay; planned for 8 × H100-80GB."""
    return _cosine("qwen3_1p7b", node_of_8("H100-80GB"))


def qwen3_4b() -> ConfigContainer:
    """Qwen3-4B (4,022,468,096 parameters), WSD: 500 warmup iterations, max lr held, then a
    ``1 - sqrt`` anneal to 3e-5 over the last 20% of the run (60k of 300k iterations); planned for
    8 × H100-80GB."""
    optimizer, scheduler = distributed_fused_adam_with_wsd(
        lr_warmup_iters=WARMUP_ITERS, max_lr=MAX_LR, min_lr=MIN_LR, lr_wsd_decay_style="minus_sqrt"
    )
    return pretrain_config(shipped_model("qwen3_4b"), optimizer, scheduler, target=node_of_8("H100-80GB"))


def qwen3_8b() -> ConfigContainer:
    """Qwen3-8B (8,190,735,360 parameters, untied output layer), cosine decay; planned for 8 × H200-141GB."""
    return _cosine("qwen3_8b", node_of_8("H200-141GB"))


def _cosine(model: str, target: PlanConfig) -> ConfigContainer:
    optimizer, scheduler = distributed_fused_adam_with_cosine_annealing(
        lr_warmup_iters=WARMUP_ITERS, max_lr=MAX_LR, min_lr=MIN_LR
    )
    return pretrain_config(shipped_model(model), optimizer, scheduler, target=target)
