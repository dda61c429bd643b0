"""The one optimizer interface the training loop sees, whatever the backend: ``AnnealOptimizer``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one ``optimizer.step()`` did.

    ``grad_norm`` is the global L2 norm of the averaged, unscaled gradients before clipping, a
    0-dim tensor (read it with ``.item()`` only on logging steps). As in Megatron-Core it is
    computed only when it is needed: with ``clip_grad > 0`` or under fp16 (the inf check);
    otherwise it is 0. ``skipped`` is True only under fp16 when the gradients held inf/NaN: then
    nothing was updated and the caller must not step the scheduler.
    """

    grad_norm: torch.Tensor
    skipped: bool
    loss_scale: float  # the scale for the next step's loss (1.0 unless fp16)
    num_skipped: int  # skipped iterations since the start of the run (checkpointed)


@runtime_checkable
class AnnealOptimizer(Protocol):
    """Owns data-parallel gradient reduction, mixed precision, clipping and the update.

    The model is not wrapped in DDP. The scheduler writes ``lr`` and ``weight_decay`` into
    ``param_groups`` before each step and the optimizer reads them from there every step.
    """

    param_groups: list[dict[str, Any]]
    backend: str  # "torch-adamw-fused", "torch-sgd-fused", "native-zero1" or "apex"

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor: ...

    def zero_grad(self) -> None: ...

    def step(self) -> StepResult: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...

    def reload_model_params(self) -> None:
        """Take the fp32 master weights from the model's parameters, which were just overwritten.

        The one way weights enter a built model (a finetune, a resume without optimizer state,
        imported Hugging Face weights): write the values into the parameters in place, on every
        rank alike, then call this. Without it a bf16/fp16 run's first step writes the masters
        taken at construction back into the model. (Megatron's name for the same step.)
        """
        ...

    def describe(self) -> str: ...


def grad_scale(grad_norm: torch.Tensor, clip_grad: float, denom: float) -> torch.Tensor | None:
    """What the fused kernel divides gradients by: ``denom`` (ranks summed over x loss scale) x clipping.

    Megatron's coefficient ``clip_grad / (norm + 1e-6)``, applied only when below 1; None: nothing to divide.
    """
    if clip_grad > 0:
        return torch.clamp((grad_norm + 1.0e-6) / clip_grad, min=1.0) * denom
    if denom == 1.0:
        return None
    return torch.full((), denom, dtype=torch.float32, device=grad_norm.device)


def overflowed(loss_scaler: Any, grad_norm: torch.Tensor) -> bool:
    """fp16: whether the gradients hold inf/NaN (the step's one host sync); the scaler learns it either way."""
    found_inf = not bool(torch.isfinite(grad_norm))
    loss_scaler.update(found_inf)
    if found_inf:
        logger.info("fp16: gradients overflowed; step skipped, loss scale now %g", loss_scaler.scale)
    return found_inf
