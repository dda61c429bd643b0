"""fp16 loss scaling with Megatron-Core's rules (``ConstantGradScaler``, ``DynamicGradScaler``).

The scale lives on the host as a float: the fp16 step already syncs once to learn whether the
gradients overflowed, so keeping the scale as a device tensor would save nothing.
"""

from __future__ import annotations

from typing import Any

from anneal.config.optimizer import OptimizerConfig


class ConstantLossScaler:
    """A static scale (``optimizer.loss_scale``); overflowing steps are still skipped."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    """Megatron's ``DynamicGradScaler``: back off after ``hysteresis`` overflows, grow after a window.

    An overflow resets the growth count and spends one unit of hysteresis; when none is left the
    scale is multiplied by ``backoff_factor`` (not below ``min_scale``). ``growth_interval``
    clean steps in a row multiply it by ``growth_factor`` and refill the hysteresis.
    """

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
    ) -> None:
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.growth_tracker = 0
        self.hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            self.scale *= self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        # Megatron's keys: scale, growth_tracker, hysteresis_tracker.
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


LossScaler = ConstantLossScaler | DynamicLossScaler


def build_loss_scaler(config: OptimizerConfig) -> LossScaler | None:
    """The scaler for fp16 (static when ``loss_scale`` is set, else dynamic); None otherwise."""
    if not config.fp16:
        return None
    if config.loss_scale is not None:
        return ConstantLossScaler(config.loss_scale)
    return DynamicLossScaler(
        initial_scale=config.initial_loss_scale,
        min_scale=config.min_loss_scale,
        growth_interval=int(config.loss_scale_window),
        hysteresis=config.hysteresis,
    )
