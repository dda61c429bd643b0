"""The ``tiny`` CPU recipe: the embedded default run, with a WSD schedule."""

from __future__ import annotations

from anneal.config.container import ConfigContainer
from anneal.config.dataset import DatasetConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.scheduler import SchedulerConfig
from anneal.config.training import TrainingConfig
from anneal.recipes.qwen.common import shipped_model


def tiny() -> ConfigContainer:
    """The tiny Qwen3 on the standard library's bytes, 150 iterations of 16 × 128 tokens, on CPU.

    As the default run (AdamW at 3e-3, fp32, one rank), but WSD: 30 warmup iterations, then 3e-3
    held, then a ``1 - sqrt`` anneal to 0 over the last 30 iterations.
    """
    return ConfigContainer(
        train=TrainingConfig(train_iters=150, global_batch_size=16, micro_batch_size=8, eval_interval=50,
                             eval_iters=2),
        model=shipped_model("tiny"),
        optimizer=OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.1, adam_beta1=0.9,
                                  adam_beta2=0.95),
        scheduler=SchedulerConfig(lr_decay_style="WSD", lr_warmup_iters=30, lr_wsd_decay_style="minus_sqrt"),
        dataset=DatasetConfig(kind="stdlib"),
    )
