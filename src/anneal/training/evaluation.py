"""Validation during training: a loss per token for every validation set and blend component.

Each evaluation reads the next ``train.eval_iters`` global batches of every validation set, as Megatron
advances its validation iterator: evaluation ``k`` (the one at iteration ``k × train.eval_interval``)
reads samples ``[(k - 1) · eval_iters · gbs, k · eval_iters · gbs)``, running into reshuffled epochs
when a set is shorter. So successive evaluations see fresh data, a resumed run evaluates exactly what an
uninterrupted one would, and a parent and its branches score the same samples at the same iteration.
The final evaluation, after the last iteration, reads the next ones.

The loss of a set is the mean over its counted tokens (``dataset.eod_mask_loss`` leaves EOD inputs out)
over every rank: each rank sums its tokens' losses, and one all-reduce of every set's sums and counts
gives the exact means. A weighted blend also reports each component's mean over the tokens its samples
gave (``valid_loss/<name>``); a component no sample of this evaluation came from is not reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from anneal.config.training import TrainingConfig
from anneal.context import DistContext
from anneal.data.loader import Microbatches, microbatch_samples
from anneal.model.documents import DocumentBoundaries
from anneal.model.loss import IGNORE_INDEX


def evaluation_index(iteration: int, eval_interval: int) -> int:
    """Which evaluation (from 1) runs after ``iteration``: the k-th interval's, or the next one for a final
    evaluation between intervals."""
    return iteration // eval_interval + (1 if iteration % eval_interval else 0)


class Validation:
    """The validation sets (``anneal.data``'s ``ValidSet``: ``key``, ``data``, ``components``,
    ``component_of``) of one run, scored on this rank's share of each global batch."""

    def __init__(self, sets: Sequence[Any], cfg: TrainingConfig, ctx: DistContext, documents: DocumentBoundaries,
                 copy: Any) -> None:
        self.sets = [s for s in sets if len(s.data)]
        self.cfg, self.ctx, self.documents, self.copy = cfg, ctx, documents, copy

    def __bool__(self) -> bool:
        return bool(self.sets) and bool(self.cfg.eval_interval) and self.cfg.eval_iters > 0

    def due(self, iteration: int) -> bool:
        return bool(self) and iteration % self.cfg.eval_interval == 0

    @torch.no_grad()
    def run(self, model: torch.nn.Module, iteration: int) -> dict[str, float]:
        """Every set's (and component's) mean loss per counted token at the evaluation after ``iteration``."""
        k = evaluation_index(iteration, self.cfg.eval_interval)
        start = (k - 1) * self.cfg.eval_iters * self.cfg.global_batch_size
        was_training = model.training
        model.eval()
        sums = [self._score(model, s, start) for s in self.sets]  # [2 + 2C] per set: sums, then counts
        model.train(was_training)
        totals = torch.cat(sums)
        dims = self.ctx.parallel
        if dims.dp_size > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=dims.dp_group)
        return self._means(totals.tolist())

    def _score(self, model: torch.nn.Module, valid: Any, start: int) -> torch.Tensor:
        """This rank's loss sums and token counts of ``valid``: the set's, then each component's."""
        cfg, dims, device = self.cfg, self.ctx.parallel, self.ctx.device
        parts = 1 + len(valid.components)
        sums = torch.zeros(parts, dtype=torch.float64, device=device)
        counts = torch.zeros(parts, dtype=torch.float64, device=device)
        num_micro = dims.microbatches(cfg)
        for it in range(cfg.eval_iters):
            consumed = start + it * cfg.global_batch_size
            batches = Microbatches(valid.data, self.copy, consumed_samples=consumed, num_microbatches=num_micro,
                                   micro_batch_size=cfg.micro_batch_size, dp_rank=dims.dp_rank,
                                   dp_size=dims.dp_size)
            for micro, tokens in enumerate(batches):
                inputs = self.documents.inputs(tokens)
                losses = model(**inputs, reduction="none").double()  # [b, s], 0 where not counted
                row_sums = losses.sum(dim=1)
                row_counts = (inputs["labels"] != IGNORE_INDEX).sum(dim=1).double()
                sums[0] += row_sums.sum()
                counts[0] += row_counts.sum()
                if valid.components:
                    samples = microbatch_samples(consumed_samples=consumed, microbatch=micro,
                                                 micro_batch_size=cfg.micro_batch_size, dp_rank=dims.dp_rank,
                                                 dp_size=dims.dp_size)
                    which = torch.from_numpy(valid.component_of(samples) + 1).to(device)
                    sums.index_add_(0, which, row_sums)
                    counts.index_add_(0, which, row_counts)
        return torch.cat([sums, counts])

    def _means(self, totals: list[float]) -> dict[str, float]:
        means, offset = {}, 0
        for valid in self.sets:
            keys = (valid.key, *valid.components)
            sums, counts = totals[offset:offset + len(keys)], totals[offset + len(keys):offset + 2 * len(keys)]
            offset += 2 * len(keys)
            means.update({key: total / count for key, total, count in zip(keys, sums, counts) if count})
        return means
