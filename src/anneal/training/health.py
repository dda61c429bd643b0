"""Divergence detection without a host sync per step.

``NonFiniteWatch.observe`` runs every iteration on the device: it remembers the first iteration
whose loss (or gradient norm) was not finite, with tensor ops only. ``check`` reads it on the
steps where the loop syncs anyway (logging) and before anything is written (checkpoint saves,
the end of the run); ranks agree with one all_reduce (MIN), so every rank stops at the same
iteration with the same message.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from anneal.context import DistContext
from anneal.errors import RunError

_NONE = torch.iinfo(torch.int64).max  # "no bad iteration seen"


class NonFiniteWatch:
    def __init__(self, device: torch.device) -> None:
        self._first = torch.full((), _NONE, dtype=torch.int64, device=device)

    def observe(self, iteration: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Remember ``iteration`` if its loss or grad norm is inf/NaN (device ops only: no sync)."""
        bad = ~torch.isfinite(loss)
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        self._first = torch.where(bad, torch.minimum(self._first, torch.full_like(self._first, iteration)),
                                  self._first)

    def first_bad(self, ctx: DistContext) -> int | None:
        """The first non-finite iteration on any rank, or None (a collective: call it on every rank)."""
        first = self._first.clone()
        if ctx.backend is not None:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        value = int(first.item())
        return None if value == _NONE else value

    def check(self, ctx: DistContext, *, iteration: int, latest: str | None) -> None:
        """Raise ``RunError`` naming the iteration and the checkpoint to resume from, if the run diverged."""
        bad = self.first_bad(ctx)
        if bad is None:
            return
        resume = (f"the latest checkpoint, saved before it, is {latest}: resume with checkpoint.load={latest} "
                  "(e.g. with a lower optimizer.lr and scheduler.override_opt_param_scheduler=true)" if latest else "no checkpoint was saved before it")
        raise RunError(f"training diverged: the loss or gradient norm is not finite (inf/NaN) from iteration "
                       f"{bad} (found at iteration {iteration}); nothing was saved after it; {resume}")
