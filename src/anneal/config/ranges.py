"""The range rule of every numeric config field, in one table, checked before anything starts.

``RANGES`` maps ``Class.field`` to its ``Range``; a list of numbers (``train.rampup_batch_size``)
has its rule applied to each element. ``tests/config/test_ranges.py`` walks the dataclasses and fails
for a numeric field without a row here, so a new field cannot ship without its rule. Rules that
involve two fields (``min_lr <= lr``) stay with their section or in ``derive``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from anneal.errors import ConfigError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is outside the range
    high_open: bool = False
    text: str = ""  # the rule as the error states it, when not the interval

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
POSITIVE, POSITIVE_INT = Range(0, low_open=True), Range(1, text="a positive integer")
UNIT = Range(0, 1, high_open=True)  # [0, 1): Adam's betas, momentum, a warmup fraction

RANGES: dict[str, Range] = {
    **{f"TrainingConfig.{n}": AT_LEAST_1 for n in ("train_iters", "train_samples", "global_batch_size",
                                                    "micro_batch_size", "eval_interval", "exit_interval")},
    "TrainingConfig.rampup_batch_size": AT_LEAST_0,
    "TrainingConfig.eval_iters": AT_LEAST_0,
    **{f"ModelConfig.{n}": POSITIVE_INT for n in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                   "num_attention_heads", "num_query_groups", "kv_channels",
                                                   "vocab_size", "seq_length")},
    **{f"ModelConfig.{n}": POSITIVE for n in ("rotary_base", "init_method_std", "layernorm_epsilon")},
    "ModelConfig.cross_entropy_chunk_size": AT_LEAST_0,
    "ModelConfig.tensor_model_parallel_size": POSITIVE_INT,
    "ModelConfig.recompute_num_layers": Range(1, text=">= 1 or null"),
    **{f"OptimizerConfig.{n}": AT_LEAST_0 for n in ("lr", "min_lr", "decoupled_lr", "decoupled_min_lr",
                                                     "weight_decay", "clip_grad")},
    **{f"OptimizerConfig.{n}": UNIT for n in ("adam_beta1", "adam_beta2", "sgd_momentum")},
    **{f"OptimizerConfig.{n}": POSITIVE for n in ("adam_eps", "loss_scale", "initial_loss_scale",
                                                   "min_loss_scale")},
    "OptimizerConfig.loss_scale_window": AT_LEAST_1,
    "OptimizerConfig.hysteresis": AT_LEAST_1,
    "ParamGroupRule.lr_mult": AT_LEAST_0,
    "ParamGroupRule.wd_mult": AT_LEAST_0,
    **{f"SchedulerConfig.{n}": AT_LEAST_0 for n in ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init",
                                                     "lr_wsd_decay_iters", "lr_wsd_decay_samples",
                                                     "start_weight_decay", "end_weight_decay")},
    "SchedulerConfig.lr_decay_iters": AT_LEAST_1,
    "SchedulerConfig.lr_decay_samples": AT_LEAST_1,
    "SchedulerConfig.lr_warmup_fraction": UNIT,
    "SchedulerConfig.anneal_branch_iters": AT_LEAST_1,
    "TorchSchedulerConfig.warmup_iters": AT_LEAST_0,
    "TorchSchedulerConfig.warmup_start_factor": Range(0, 1, low_open=True),
    "DatasetConfig.seed": Range(0, text="a non-negative integer"),
    "DatasetConfig.stdlib_max_bytes": POSITIVE_INT,
    "DatasetConfig.mock_num_tokens": POSITIVE_INT,
    "CheckpointConfig.save_interval": Range(1, text=">= 1 or null"),
    "CheckpointConfig.most_recent_k": Range(1, text=">= 1 or null"),
    "LoggerConfig.log_interval": AT_LEAST_1,
    "ProfilingConfig.profile_step_start": AT_LEAST_0,
    "ProfilingConfig.profile_step_end": AT_LEAST_1,
    "ProfilingConfig.profile_ranks": AT_LEAST_0,
    "DistributedConfig.timeout_minutes": Range(0, 24 * 60, low_open=True),
    "DistributedConfig.data_parallel_replicate_degree": POSITIVE_INT,
    "RNGConfig.seed": Range(0, 2**63, high_open=True, text="in [0, 2**63)"),
    "PlanConfig.world_size": Range(1, text=">= 1 or null"),
    "DownstreamEvalConfig.interval": Range(1, text=">= 1 or null"),
    "DownstreamEvalConfig.limit": Range(0, low_open=True, text="> 0 or null"),
    "DownstreamEvalConfig.batch_size": AT_LEAST_1,
    "PlanConfig.mfu": Range(0, 1, low_open=True),
}


def check_ranges(obj: Any, path: str = "") -> None:
    """Raise ConfigError at the first numeric field (or list element) outside its ``RANGES`` rule."""
    for f in fields(obj):
        value, where = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        if is_dataclass(value):
            check_ranges(value, where)
            continue
        rule = RANGES.get(f"{type(obj).__name__}.{f.name}")
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if is_dataclass(item):
                check_ranges(item, f"{where}[{i}]")
            elif rule is not None and is_number(item) and not rule.contains(item):
                shown = where if i is None else f"{where}[{i}]"
                raise ConfigError(f"{shown} ({item!r}) must be {rule.describe()}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
