"""Learning-rate and weight-decay schedules: Megatron's, exact, and the class that applies them."""

from anneal.scheduler.param_scheduler import LoadedField, LoadReport, OptimizerParamScheduler
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
    "Phases",
    "Schedule",
    "lr_at",
    "phases",
    "validate_schedule",
    "wd_at",
]
