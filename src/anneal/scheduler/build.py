"""``build_scheduler``: Megatron's ``OptimizerParamScheduler`` or a torch schedule, one API for the loop."""

from __future__ import annotations

from typing import Any

from anneal.scheduler.param_scheduler import OptimizerParamScheduler
from anneal.scheduler.protocol import ParamScheduler
from anneal.scheduler.schedule import Schedule


def build_scheduler(optimizer: Any, scheduler_config: Any, schedule: Any, *, resume_mode: str | None = None,
                    param_group_bounds: list[dict] | None = None) -> ParamScheduler:
    """The scheduler for ``schedule`` (``Derived.schedule``), driving ``optimizer.param_groups``.

    A Megatron ``Schedule`` gives ``OptimizerParamScheduler`` (``scheduler_config`` supplies the
    resume flags; ``resume_mode`` and ``param_group_bounds`` come from ``anneal.resume``'s plan for
    a branch or an extension); a ``TorchSchedule`` gives ``TorchScheduler``. Both are ``ParamScheduler``.
    """
    if isinstance(schedule, Schedule):
        return OptimizerParamScheduler.from_schedule(
            optimizer,
            schedule,
            use_checkpoint_opt_param_scheduler=scheduler_config.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=scheduler_config.override_opt_param_scheduler,
            resume_mode=resume_mode,
            param_group_bounds=param_group_bounds,
        )
    from anneal.scheduler.torch_schedules import TorchScheduler  # imports torch

    use_checkpoint = scheduler_config.use_checkpoint_opt_param_scheduler
    return TorchScheduler(optimizer, schedule, use_checkpoint_opt_param_scheduler=use_checkpoint)
