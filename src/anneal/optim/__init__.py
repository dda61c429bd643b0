"""Optimizers: Megatron-style param groups, fused AdamW/SGD, ZeRO-1 over data parallel, fp16/bf16.

``setup_optimizer(optimizer_config, scheduler_config, model, schedule=..., dp_group=...)``
returns ``(optimizer, scheduler)``; every optimizer speaks ``AnnealOptimizer``.
"""

from anneal.optim.base import AnnealOptimizer, StepResult
from anneal.optim.flat_optimizer import FlatOptimizer
from anneal.optim.loss_scaler import ConstantLossScaler, DynamicLossScaler, build_loss_scaler
from anneal.optim.param_groups import get_param_groups
from anneal.optim.setup import select_backend, setup_optimizer

__all__ = [
    "AnnealOptimizer",
    "ConstantLossScaler",
    "DynamicLossScaler",
    "FlatOptimizer",
    "StepResult",
    "build_loss_scaler",
    "get_param_groups",
    "select_backend",
    "setup_optimizer",
]
