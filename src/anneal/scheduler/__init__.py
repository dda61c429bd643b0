"""Learning-rate and weight-decay schedules: Megatron's, exact, and the class that applies them.

``build_scheduler`` also builds ``torch.optim.lr_scheduler`` schedules
(``anneal.scheduler.torch_schedules``, which imports torch; this package does not).
"""

from anneal.scheduler.build import build_scheduler
from anneal.scheduler.param_scheduler import LoadedField, LoadReport, OptimizerParamScheduler
from anneal.scheduler.protocol import ParamScheduler
from anneal.scheduler.schedule import (
    LR_DECAY_STYLES,
    WD_INCR_STYLES,
    WSD_DECAY_STYLES,
    Phases,
    Schedule,
    lr_at,
    phases,
    validate_schedule,
    wd_at,
)

__all__ = [
    "LR_DECAY_STYLES",
    "WD_INCR_STYLES",
    "WSD_DECAY_STYLES",
    "LoadReport",
    "LoadedField",
    "OptimizerParamScheduler",
    "ParamScheduler",
    "Phases",
    "Schedule",
    "build_scheduler",
    "lr_at",
    "phases",
    "validate_schedule",
    "wd_at",
]
