"""``plan.``: what the dry run plans for: the accelerator, the rank count and the MFU of the time estimate."""

from __future__ import annotations

from dataclasses import dataclass

from anneal.devices import ACCELERATORS, DEFAULT_MFU
from anneal.errors import ConfigError, closest

PLAN_DEVICES = ("auto", *ACCELERATORS)


@dataclass
class PlanConfig:
    """The dry run's target: which accelerator, how many ranks, what utilisation (README: Planning)."""

    # An accelerator of the table (A100-40GB, A100-80GB, H100-80GB, H100-PCIe, H100-NVL, H200-141GB, B200,
    # MI300X), or auto: this machine (its CUDA device's free memory, else the CPU's).
    device: str = "auto"
    # Ranks to plan for; null: WORLD_SIZE when set, else 1, 8 and 64 data-parallel shards of the layout.
    world_size: int | None = None
    # Model FLOPs utilisation of the time estimate; 0.38: Llama 3 405B's pretraining on H100 (38-43%).
    mfu: float = DEFAULT_MFU

    def validate(self) -> None:
        if self.device not in PLAN_DEVICES:
            hint = device_hint(self.device)
            choices = ", ".join(map(repr, PLAN_DEVICES))
            raise ConfigError(f"plan.device ({self.device!r}) must be one of {choices}"
                              + (f"; did you mean {hint!r}?" if hint else ""))
        if self.world_size is not None and self.world_size < 1:
            raise ConfigError(f"plan.world_size ({self.world_size}) must be >= 1 or null")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"plan.mfu ({self.mfu}) must be in (0, 1]")


def device_hint(value: str) -> str | None:
    """The table name a mistyped ``plan.device`` most likely meant: the same name in another case, the
    first that starts with it (``H100`` -> ``H100-80GB``), else the closest spelling."""
    lowered = {name.lower(): name for name in PLAN_DEVICES}
    value = value.lower()
    starts = [name for low, name in lowered.items() if low.startswith(value)]
    return lowered.get(value) or (starts[0] if starts else None) or lowered.get(closest(value, lowered) or "")
