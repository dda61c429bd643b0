"""``downstream_eval.*``: lm-evaluation-harness tasks scored on the live model during training.

Every ``downstream_eval.interval`` iterations, and after the last one, the loop hands the model to
``anneal.evals.harness.run_downstream`` on every rank: each data-parallel rank scores its share of the
requests (a sharded model needs every rank's forwards) and every rank gets the same metrics, which rank 0
logs as ``eval/<task>/<metric>``. The tokenizer is the one ``anneal-export-hf`` writes for this run, so a
score here is the score of the exported model.

``DownstreamEvals.for_run`` builds the tokenizer and finds the tasks before any process group or model
exists, so an unknown task or data without a tokenizer is one line naming the field, not a failure hours in.
"""

from __future__ import annotations

from typing import Any

import torch

from anneal.config.container import ConfigContainer
from anneal.config.runtime import DownstreamEvalConfig, eval_limit
from anneal.errors import ConfigError


class DownstreamEvals:
    def __init__(self, cfg: DownstreamEvalConfig, tokenizer: Any, *, max_length: int) -> None:
        self.cfg, self.tokenizer, self.max_length = cfg, tokenizer, max_length

    @classmethod
    def for_run(cls, cfg: ConfigContainer) -> DownstreamEvals | None:
        """None without ``downstream_eval.tasks``; ConfigError for a task lm-eval cannot find or data whose
        tokenizer is unknown (``dataset.kind=mock``, indexed data without its ``PREFIX.json``)."""
        evals = cfg.downstream_eval
        if not evals.tasks:
            return None
        from anneal.evals.harness import FIELDS, run_tokenizer, task_manager

        # lm-eval indexes its tasks (seconds): cached, so the evaluations use this one (the same key)
        task_manager(tuple(evals.tasks), evals.include_path, FIELDS)
        try:
            tokenizer = run_tokenizer(cfg.dataset, cfg.model)
        except ConfigError as error:
            raise ConfigError(f"downstream_eval.tasks ({evals.tasks!r}) scores text with the run's tokenizer, "
                              f"and there is none: {error}") from None
        return cls(evals, tokenizer, max_length=cfg.model.seq_length)

    def due(self, iteration: int) -> bool:
        return bool(self.cfg.interval) and iteration % self.cfg.interval == 0

    def run(self, model: torch.nn.Module, group: Any) -> dict[str, float]:
        """``{"eval/<task>/<metric>": value}``, the same on every rank; every rank of the job calls it."""
        from anneal.evals.harness import run_downstream

        return run_downstream(model, self.tokenizer, tasks=self.cfg.tasks, include_path=self.cfg.include_path,
                              limit=eval_limit(self.cfg.limit, "downstream_eval.limit"), max_length=self.max_length, group=group,
                              batch_size=self.cfg.batch_size)
