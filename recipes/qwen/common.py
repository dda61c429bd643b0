"""What the Qwen3 recipes share: the shipped model shapes and Megatron-Bridge's pretraining setup."""

from __future__ import annotations

from importlib.resources import files

from anneal.config.container import ConfigContainer
from anneal.config.dataset import DatasetConfig
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.plan import PlanConfig
from anneal.config.runtime import LoggerConfig, RNGConfig
from anneal.config.scheduler import SchedulerConfig
from anneal.config.training import TrainingConfig


def shipped_model(name: str) -> ModelConfig:
    """``conf/model/<name>.yaml`` as a ``ModelConfig``: the model shapes live there and only there."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(files("anneal.conf") / "model" / f"{name}.yaml"))
    node.pop("_target_")
    return ModelConfig(**node)


def pretrain_config(
    model: ModelConfig,
    optimizer: OptimizerConfig,
    scheduler: SchedulerConfig,
    *,
    train_iters: int = 300_000,
    global_batch_size: int = 32,
    micro_batch_size: int = 2,
    target: PlanConfig | None = None,
) -> ConfigContainer:
    """Megatron-Bridge's Qwen3 pretraining shape: 300k iterations of 32 × ``model.seq_length`` tokens.

    Bridge trains on mock data when no data path is given; so does this (``dataset=indexed
    'dataset.data_path=[...]'`` on the command line, or ``cfg.dataset`` in Python, for real data).
    ``target``: the hardware and rank count the recipe is planned for (``plan.``; the dry run's default).
    """
    return ConfigContainer(
        train=TrainingConfig(
            train_iters=train_iters,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            eval_interval=500,
            eval_iters=32,
        ),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        dataset=DatasetConfig(kind="mock", seed=1234),
        logger=LoggerConfig(log_interval=10),
        rng=RNGConfig(seed=1234),
        plan=target or PlanConfig(),
    )
