"""Optimizer + scheduler pairs for recipes, as Megatron-Bridge's ``recipes/utils/optimizer_utils.py``.

Each helper returns ``(OptimizerConfig, SchedulerConfig)`` with Megatron-Bridge's defaults: AdamW with
the distributed optimizer, betas 0.9 / 0.95, eps 1e-8, max lr 1e-4 and min lr 0.1 × max lr, gradient
clipping at 1.0, 2000 warmup iterations from 0, and a constant weight decay of 0.033 on the scheduler
(``optimizer.weight_decay`` stays 0.1 as in Bridge; the scheduler's start/end values are the ones
applied), with ``override_opt_param_scheduler`` on.
"""

from __future__ import annotations

from anneal.config.optimizer import OptimizerConfig
from anneal.config.scheduler import SchedulerConfig
from anneal.errors import check_choice

PRECISIONS = ("bf16-mixed", "16-mixed", "32")


def distributed_fused_adam_with_cosine_annealing(
    precision: str = "bf16-mixed",
    lr_warmup_iters: int = 2000,
    lr_decay_iters: int | None = None,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.95,
    adam_eps: float = 1e-8,
    weight_decay: float = 0.1,
    max_lr: float = 1e-4,
    min_lr: float | None = None,
    clip_grad: float = 1.0,
    start_weight_decay: float = 0.033,
    end_weight_decay: float = 0.033,
    weight_decay_incr_style: str = "constant",
) -> tuple[OptimizerConfig, SchedulerConfig]:
    """Distributed AdamW with a cosine decay to ``min_lr`` (default 0.1 × ``max_lr``).

    ``lr_decay_iters`` None decays over ``train.train_iters``, so it follows a command-line override
    of the run length.
    """
    optimizer = _distributed_adam(precision, adam_beta1, adam_beta2, adam_eps, weight_decay, max_lr, min_lr,
                                  clip_grad)
    scheduler = _scheduler("cosine", lr_warmup_iters, lr_decay_iters, start_weight_decay, end_weight_decay,
                           weight_decay_incr_style)
    return optimizer, scheduler


def distributed_fused_adam_with_wsd(
    precision: str = "bf16-mixed",
    lr_warmup_iters: int = 2000,
    lr_decay_iters: int | None = None,
    lr_wsd_decay_style: str = "minus_sqrt",
    lr_wsd_decay_iters: int | None = None,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.95,
    adam_eps: float = 1e-8,
    weight_decay: float = 0.1,
    max_lr: float = 1e-4,
    min_lr: float | None = None,
    clip_grad: float = 1.0,
    start_weight_decay: float = 0.033,
    end_weight_decay: float = 0.033,
    weight_decay_incr_style: str = "constant",
) -> tuple[OptimizerConfig, SchedulerConfig]:
    """Distributed AdamW with warmup-stable-decay: warmup, ``max_lr`` held, then an anneal to ``min_lr``.

    The anneal defaults to the ``minus_sqrt`` shape (``1 - sqrt(progress)``) over the last 20% of the
    decay (``lr_wsd_decay_iters`` None: ``anneal.config.scheduler.DEFAULT_WSD_DECAY_FRACTION`` of the
    decay's iterations, so it follows a command-line override of the run length). Other shapes:
    ``exponential`` (Megatron's default), ``linear``, ``cosine``.
    """
    optimizer = _distributed_adam(precision, adam_beta1, adam_beta2, adam_eps, weight_decay, max_lr, min_lr,
                                  clip_grad)
    scheduler = _scheduler("WSD", lr_warmup_iters, lr_decay_iters, start_weight_decay, end_weight_decay,
                           weight_decay_incr_style, lr_wsd_decay_style=lr_wsd_decay_style,
                           lr_wsd_decay_iters=lr_wsd_decay_iters)
    return optimizer, scheduler


def _distributed_adam(precision: str, beta1: float, beta2: float, eps: float, weight_decay: float,
                      max_lr: float, min_lr: float | None, clip_grad: float) -> OptimizerConfig:
    check_choice("precision", precision, PRECISIONS)
    return OptimizerConfig(
        optimizer="adam",
        lr=max_lr,
        min_lr=0.1 * max_lr if min_lr is None else min_lr,
        weight_decay=weight_decay,
        adam_beta1=beta1,
        adam_beta2=beta2,
        adam_eps=eps,
        clip_grad=clip_grad,
        use_distributed_optimizer=True,
        bf16=precision == "bf16-mixed",
        fp16=precision == "16-mixed",
    )


def _scheduler(style: str, warmup_iters: int, decay_iters: int | None, start_wd: float, end_wd: float,
               wd_incr_style: str, **wsd) -> SchedulerConfig:
    """Bridge's scheduler half: linear warmup from 0, ``override_opt_param_scheduler`` on."""
    return SchedulerConfig(lr_decay_style=style, lr_warmup_iters=warmup_iters, lr_warmup_init=0.0,
                           lr_decay_iters=decay_iters, start_weight_decay=start_wd, end_weight_decay=end_wd,
                           weight_decay_incr_style=wd_incr_style, override_opt_param_scheduler=True, **wsd)
