"""``run(cfg, derived)``: the one function that sees the whole config; builds, trains, reports."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from anneal import exits
from anneal.checkpoint import files
from anneal.checkpoint.checkpointer import Checkpointer
from anneal.checkpoint.files import SaveDirLock
from anneal.config.compose import to_yaml
from anneal.config.container import ConfigContainer, check_world
from anneal.config.derive import Derived
from anneal.data.datasets import build_datasets
from anneal.model.flops import flops_per_token, num_parameters
from anneal.model.qwen3 import build_model
from anneal.optim import setup_optimizer
from anneal.training.distributed import init_distributed, shutdown
from anneal.training.metrics import MetricsLogger, Throughput, peak_flops
from anneal.training.trainer import LoopParts, Trainer

log = logging.getLogger(__name__)


def run_dir() -> Path:
    """Hydra's run directory when launched through Hydra, else ./outputs/run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under Hydra (a Python caller)
        return Path("outputs") / "run"


def run(cfg: ConfigContainer, derived: Derived) -> int:
    """Train; return the exit code (``anneal.exits``). Errors propagate after the process group is gone."""
    check_world(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))  # before any group or model exists
    train_data, valid_data = build_datasets(cfg.dataset, seq_length=cfg.model.seq_length,
                                            vocab_size=cfg.model.vocab_size)
    lock = _lock_save_dir(cfg)  # a second run on the same save directory is refused here
    ctx = init_distributed(cfg.dist)
    try:
        torch.manual_seed(cfg.rng.seed)  # the same initial weights on every rank
        model = build_model(cfg.model, device=ctx.device)
        optimizer, scheduler = setup_optimizer(cfg.optimizer, cfg.scheduler, model, schedule=derived.schedule,
                                               dp_group=ctx.group)
        out = run_dir()
        metrics = MetricsLogger(cfg.logger, out, enabled=ctx.is_main, total_iters=derived.train_iters)
        half = cfg.optimizer.bf16 or cfg.optimizer.fp16
        throughput = Throughput(flops_per_token=flops_per_token(cfg.model), world_size=ctx.world_size,
                                peak=peak_flops(ctx.device, half))
        metrics.info(_banner(cfg, derived, ctx, optimizer, out))
        checkpointer = Checkpointer(cfg.checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                                    ctx=ctx, config_yaml=to_yaml(cfg), report=metrics.info)
        state = checkpointer.load()
        parts = LoopParts(model, optimizer, scheduler, train_data, valid_data, derived.ramp,
                          checkpointer=checkpointer, throughput=throughput)
        trainer = Trainer(cfg.train, parts, ctx, metrics, train_iters=derived.train_iters,
                          log_interval=cfg.logger.log_interval, state=state)
        trainer.train()
        if ctx.is_main and cfg.logger.plot_schedule:
            from anneal.plot import plot_run

            png = plot_run(derived.schedule, derived.ramp, derived.train_iters, out / "schedule.png",
                           applied=trainer.applied)
            metrics.info(f"schedule plot: {png}")
        metrics.info(f"done: {trainer.state.iteration} iterations, metrics in {metrics.path}")
        metrics.close()
        return exits.OK
    finally:
        if lock is not None:
            lock.release()
        shutdown(ctx)


def _lock_save_dir(cfg: ConfigContainer) -> SaveDirLock | None:
    if not cfg.checkpoint.save or int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = SaveDirLock(Path(cfg.checkpoint.save))
    files.remove_partials(Path(cfg.checkpoint.save))  # left by a save that crashed; never marked latest
    return lock


def _banner(cfg: ConfigContainer, derived: Derived, ctx, optimizer, out: Path) -> str:
    n = num_parameters(cfg.model)
    return "\n".join([
        f"anneal: {n / 1e6:.2f}M parameters, {ctx.world_size} rank(s) on {ctx.device}"
        f" ({ctx.backend or 'no process group'}), optimizer backend {optimizer.backend}",
        f"anneal: {derived.train_iters} iterations, global batch {cfg.train.global_batch_size}, "
        f"micro batch {cfg.train.micro_batch_size}, {derived.train_samples} samples; run dir {out}",
    ])
