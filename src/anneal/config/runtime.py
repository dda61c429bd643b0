"""Sections for the run around the model: ``checkpoint.``, ``logger.``, ``dist.``, ``rng.``."""

from __future__ import annotations

from dataclasses import dataclass

from anneal.errors import ConfigError, check_choice

DIST_BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class CheckpointConfig:
    save: str | None = None  # directory of checkpoints; also resumed from when `load` is unset
    load: str | None = None  # a checkpoint directory, or a save directory (its latest checkpoint)
    save_interval: int | None = None  # iterations; None saves only at the end and on SIGTERM
    most_recent_k: int | None = None  # keep the last K checkpoints; None keeps all
    load_optim: bool = True
    load_rng: bool = True
    finetune: bool = False  # load weights only; iteration and scheduler start from zero

    def validate(self) -> None:
        for name in ("save_interval", "most_recent_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"checkpoint.{name} ({value}) must be >= 1 or null")


@dataclass
class LoggerConfig:
    log_interval: int = 10
    tensorboard_dir: str | None = None  # default: <run dir>/tensorboard
    progress_bar: bool = True
    plot_schedule: bool = True  # at the end, the planned schedule with the applied lr/wd drawn over it

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"logger.log_interval ({self.log_interval}) must be >= 1")


@dataclass
class DistributedConfig:
    backend: str = "auto"  # gloo on CPU, nccl on CUDA
    device: str = "auto"  # cuda when available
    timeout_minutes: int = 10

    def validate(self) -> None:
        check_choice("dist.backend", self.backend, DIST_BACKENDS)
        check_choice("dist.device", self.device, DEVICES)
        if self.backend == "nccl" and self.device == "cpu":
            raise ConfigError("dist.backend ('nccl') needs dist.device 'cuda' or 'auto', not 'cpu'")
        if self.timeout_minutes < 1:
            raise ConfigError(f"dist.timeout_minutes ({self.timeout_minutes}) must be >= 1")


@dataclass
class RNGConfig:
    seed: int = 1234

    def validate(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"rng.seed ({self.seed}) must be in [0, 2**63)")
