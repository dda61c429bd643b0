"""``build_scheduler``: Megatron's ``OptimizerParamScheduler`` or a torch schedule, one API for the loop."""

from __future__ import annotations

import dataclasses
from typing import Any

from anneal.scheduler.param_scheduler import OptimizerParamScheduler
from anneal.scheduler.schedule import Schedule


def build_scheduler(optimizer: Any, scheduler_config: Any, schedule: Any) -> Any:
    """The scheduler for ``schedule`` (``Derived.schedule``), driving ``optimizer.param_groups``.

    A Megatron ``Schedule`` gives ``OptimizerParamScheduler`` (``scheduler_config`` supplies the
    resume flags); a ``TorchSchedule`` gives ``TorchScheduler``. Both speak the same API: ``step``,
    ``get_lr``, ``get_wd``, ``observe``, ``state_dict``, ``load_state_dict``, ``mode``, ``num_steps``.
    """
    if isinstance(schedule, Schedule):
        return OptimizerParamScheduler(
            optimizer,
            **dataclasses.asdict(schedule),
            use_checkpoint_opt_param_scheduler=scheduler_config.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=scheduler_config.override_opt_param_scheduler,
        )
    from anneal.scheduler.torch_schedules import TorchScheduler  # imports torch

    use_checkpoint = scheduler_config.use_checkpoint_opt_param_scheduler
    return TorchScheduler(optimizer, schedule, use_checkpoint_opt_param_scheduler=use_checkpoint)
