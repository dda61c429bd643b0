"""The root ``ConfigContainer``: one section per concern, checked alone and together."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from anneal.config.dataset import DatasetConfig
from anneal.config.derive import Derived, derive
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.plan import PlanConfig
from anneal.config.provenance import UserSet
from anneal.config.ranges import check_ranges
from anneal.config.runtime import (CheckpointConfig, CompileConfig, DistributedConfig, DownstreamEvalConfig,
                                   LoggerConfig, ProfilingConfig, RNGConfig)
from anneal.config.scheduler import SchedulerConfig
from anneal.config.torch_scheduler import TorchSchedulerConfig
from anneal.config.training import TrainingConfig
from anneal.config.types import check_types
from anneal.errors import ConfigError


@dataclass
class ConfigContainer:
    train: TrainingConfig = field(default_factory=TrainingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig | TorchSchedulerConfig = field(default_factory=SchedulerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    rng: RNGConfig = field(default_factory=RNGConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    downstream_eval: DownstreamEvalConfig = field(default_factory=DownstreamEvalConfig)
    dry_run: bool = False  # print the resolved config, derived schedule and plan; train nothing

    @property
    def torch_engine(self) -> bool:
        """PyTorch's engine runs (README: Scaling): ``dist.use_torch_fsdp2``, or tensor parallel, which runs
        only there (DTensor, with FSDP2 over data parallel), as torchtitan runs TP with a shard degree of 1."""
        return self.dist.use_torch_fsdp2 or self.model.tensor_model_parallel_size > 1

    def validate(self, user_set: UserSet | None = None) -> Derived:
        """Check types, ranges, every section, then the rules across sections; return the derived values.

        ``user_set``: the keys set on the command line (None: all), so errors mark defaults as such.
        """
        try:
            return self._validate(user_set or UserSet())
        except ConfigError as error:
            annotated = (user_set or UserSet()).annotate(error)
            if annotated is error:
                raise
            raise annotated from error

    def _validate(self, user_set: UserSet) -> Derived:
        check_types(self)
        check_ranges(self)
        for section in (self.train, self.model, self.optimizer, self.scheduler, self.dataset,
                        self.checkpoint, self.logger, self.profiling, self.dist, self.compile, self.rng, self.plan,
                        self.downstream_eval):
            section.validate()
        self._check_engine()
        known = self.dataset.known_max_token()
        if known is not None and known >= self.model.vocab_size:
            raise ConfigError(f"model.vocab_size ({self.model.vocab_size}) must be > the largest token of "
                              f"dataset.kind {self.dataset.kind!r} ({known})")
        self.dataset.check_against(self.model.vocab_size, getattr(self.scheduler, "lr_decay_style", None),
                                   eval_interval=self.train.eval_interval if self.train.eval_iters else None)
        derived = derive(self.train, self.optimizer, self.scheduler, user_set)
        tp = self.model.tensor_model_parallel_size
        if tp > 1 and not self.dist.use_torch_fsdp2:
            note = (f"model.tensor_model_parallel_size={tp} runs on PyTorch's engine (as dist.use_torch_fsdp2="
                    "true): tensor parallel over DTensor, FSDP2 over the data-parallel ranks")
            derived = dataclasses.replace(derived, notes=(*derived.notes, note))
        return derived

    def _check_engine(self) -> None:
        """The rules between the parallel layout and the optimizer (the world size is checked at launch)."""
        if not (self.torch_engine and self.optimizer.use_distributed_optimizer):
            return
        engine = ("dist.use_torch_fsdp2 (True) and optimizer.use_distributed_optimizer (True) both shard"
                  if self.dist.use_torch_fsdp2 else
                  f"model.tensor_model_parallel_size ({self.model.tensor_model_parallel_size}) runs on "
                  "PyTorch's engine, and it and optimizer.use_distributed_optimizer (True) both shard")
        raise ConfigError(f"{engine} the optimizer state; FSDP2 shards it already: set "
                          "optimizer.use_distributed_optimizer=false")


def check_world(train: TrainingConfig, data_parallel_size: int) -> int:
    """Microbatches per iteration for ``data_parallel_size`` ranks; the checks need the world size."""
    per_round = train.micro_batch_size * data_parallel_size
    batches = [train.global_batch_size]
    if train.rampup_batch_size is not None:
        batches += train.rampup_batch_size[:2]
    for batch in batches:
        if batch % per_round:
            raise ConfigError(
                f"train.global_batch_size ({batch}) must be divisible by train.micro_batch_size "
                f"({train.micro_batch_size}) × data-parallel size ({data_parallel_size}) = {per_round}"
                + (" (this batch size comes from train.rampup_batch_size)" if batch != batches[0] else "")
            )
    return train.global_batch_size // per_round
