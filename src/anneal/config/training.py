"""``train.``: how long to train and on what batch (Megatron-Bridge's ``TrainingConfig`` names)."""

from __future__ import annotations

from dataclasses import dataclass

from anneal.errors import ConfigError


@dataclass
class TrainingConfig:
    train_iters: int | None = None  # iterations to train; or set train.train_samples instead
    train_samples: int | None = None  # samples to train, in whole global batches (samples // batch)
    global_batch_size: int = 16  # samples per iteration, over all data-parallel ranks
    micro_batch_size: int = 4  # samples per forward/backward on one rank; accumulation fills the rest
    # [start global batch, increment, ramp-up samples], as Megatron's --rampup-batch-size
    rampup_batch_size: list[int] | None = None
    eval_interval: int | None = 1000  # None: no evaluation
    eval_iters: int = 10  # validation batches per evaluation
    exit_interval: int | None = None  # stop (and save) after this many iterations of this run

    def validate(self) -> None:
        if self.train_iters is None and self.train_samples is None:
            raise ConfigError("train.train_iters (None) and train.train_samples (None): set exactly one")
        for name in ("train_iters", "train_samples", "global_batch_size", "micro_batch_size",
                     "eval_interval", "exit_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} ({value}) must be >= 1")
        if self.eval_iters < 0:
            raise ConfigError(f"train.eval_iters ({self.eval_iters}) must be >= 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.rampup_batch_size is not None:
            self._validate_rampup()

    def _validate_rampup(self) -> None:
        ramp = self.rampup_batch_size
        if len(ramp) != 3 or any(v is None or v < 1 for v in ramp[:2]) or ramp[2] < 0:
            raise ConfigError(
                f"train.rampup_batch_size ({ramp}) must be [start batch >= 1, increment >= 1, ramp-up samples >= 0]"
            )
        start, increment, _ = ramp
        if start > self.global_batch_size or (self.global_batch_size - start) % increment:
            raise ConfigError(
                f"train.rampup_batch_size ({ramp}): train.global_batch_size ({self.global_batch_size}) minus the "
                f"start batch ({start}) must be a non-negative multiple of the increment ({increment})"
            )
        for name, value in (("start batch", start), ("increment", increment)):
            if value % self.micro_batch_size:
                raise ConfigError(
                    f"train.rampup_batch_size ({ramp}): the {name} ({value}) must be divisible by "
                    f"train.micro_batch_size ({self.micro_batch_size})"
                )
