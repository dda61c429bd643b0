"""``ParamScheduler``: the one interface of Megatron's and torch's schedules, for the optimizer setup,
the training loop and the checkpointer."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from anneal.scheduler.param_scheduler import LoadReport


@runtime_checkable
class ParamScheduler(Protocol):
    """Writes ``lr`` and ``weight_decay`` into the optimizer's param groups; ``num_steps`` counts samples."""

    num_steps: float
    schedule: Any  # the frozen settings in force: a ``Schedule`` or a ``TorchSchedule``, replaced whole

    @property
    def mode(self) -> str: ...  # how load_state_dict settles config vs checkpoint

    def step(self, increment: float) -> None: ...

    def get_lr(self, param_group: dict) -> float: ...

    def get_wd(self, param_group: dict | None = None) -> float: ...

    def observe(self, metric: float) -> None: ...  # the validation loss after an evaluation

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> LoadReport: ...
