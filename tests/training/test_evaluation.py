"""Validation: each evaluation reads the next batches of each set (Megatron's advancing iterator), the loss is
per counted token, a blend's components are scored apart, and training ends with a final evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anneal.config.batch import BatchRamp
from anneal.config.training import TrainingConfig
from anneal.context import DistContext
from anneal.data.loader import HostCopy
from anneal.model.documents import DocumentBoundaries
from anneal.model.qwen3 import build_model
from anneal.parallel import ParallelDims
from anneal.training.evaluation import Validation, evaluation_index
from anneal.training.trainer import LoopParts, Trainer
from training.test_per_token_loss import EOD, MODEL, _KeepGrads, _windows

DIMS = ParallelDims(world_size=1, rank=0, dp_size=1, dp_rank=0)
CTX = DistContext(0, 1, 0, torch.device("cpu"), None, DIMS)


class _Recording:
    def __init__(self, rows: np.ndarray) -> None:
        self.rows, self.seq_length, self.read = rows, rows.shape[1] - 1, []

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, samples: np.ndarray) -> np.ndarray:
        self.read += list(samples)
        return self.rows[np.asarray(samples) % len(self.rows)]


@dataclass
class _Set:
    key: str
    data: _Recording
    components: tuple[str, ...] = ()

    def component_of(self, samples: np.ndarray) -> np.ndarray:
        return np.asarray(samples) % 2  # even samples from "a", odd ones from "b"


def _cfg(**kwargs) -> TrainingConfig:
    return TrainingConfig(**{"train_iters": 25, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": 10,
                             "eval_iters": 2, **kwargs})


def test_evaluation_k_is_the_interval_it_closes_and_a_final_one_is_the_next() -> None:
    assert [evaluation_index(it, 10) for it in (10, 20, 25, 30, 31)] == [1, 2, 3, 3, 4]


def test_each_evaluation_reads_the_next_batches_of_its_set() -> None:
    torch.manual_seed(0)
    data = _Recording(_windows(0, [1] * 40))
    validation = Validation([_Set("valid_loss", data)], _cfg(), CTX, DocumentBoundaries(EOD), HostCopy())
    model = build_model(MODEL)
    reads = []
    for iteration in (10, 20, 25):  # two at their interval, then a final one between intervals
        data.read = []
        validation.run(model, iteration)
        reads.append(sorted(data.read))
    assert reads == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]  # eval_iters × gbs = 8 each
    assert model.training  # the mode it had before


def test_losses_are_per_counted_token_for_the_set_and_each_component() -> None:
    torch.manual_seed(0)
    rows = _windows(1, [0, 9, 2, 11, 4, 1, 7, 3])  # samples 0-7: one evaluation of 2 × 4
    documents = DocumentBoundaries(EOD, eod_mask_loss=True)
    validation = Validation([_Set("valid_loss", _Recording(rows), ("valid_loss/a", "valid_loss/b"))],
                            _cfg(), CTX, documents, HostCopy())
    model = build_model(MODEL)
    losses = validation.run(model, 10)
    with torch.no_grad():
        inputs = documents.inputs(torch.from_numpy(rows))
        per_token = model(**inputs, reduction="none")
        counted = inputs["labels"] != -100
    expected = {"valid_loss": per_token.sum() / counted.sum(),
                "valid_loss/a": per_token[0::2].sum() / counted[0::2].sum(),
                "valid_loss/b": per_token[1::2].sum() / counted[1::2].sum()}
    assert losses.keys() == expected.keys()
    for key, value in expected.items():
        assert losses[key] == pytest.approx(value.item(), rel=1e-6), key
    assert abs(losses["valid_loss/a"] - losses["valid_loss/b"]) > 1e-3  # apart, so a mix-up would show


class _Records:
    def __init__(self) -> None:
        self.records = []

    def tick(self, iteration: int) -> None: ...

    def info(self, line: str) -> None: ...

    def log(self, record: dict) -> None:
        self.records.append(record)


def _train(train_iters: int, *, stop_at: int | None = None) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(MODEL)
    rows = _windows(2, [1] * 8)
    cfg = _cfg(train_iters=train_iters, eval_interval=3, eval_iters=1)
    scheduler = SimpleNamespace(step=lambda increment: None, observe=lambda loss: None, get_wd=lambda: 0.0,
                                num_steps=0)
    optimizer = _KeepGrads(model)
    optimizer.param_groups = [{"lr": 0.0}]
    parts = LoopParts(model, optimizer, scheduler, _Recording(rows), [_Set("valid_loss", _Recording(rows))],
                      BatchRamp(global_batch_size=4), documents=DocumentBoundaries(EOD))
    metrics = _Records()
    trainer = Trainer(cfg, parts, CTX, metrics, train_iters=train_iters, log_interval=100)
    if stop_at is not None:
        step = trainer.train_step

        def stopping():
            result = step()
            trainer.stop_requested = trainer.state.iteration >= stop_at
            return result
        trainer.train_step = stopping
    trainer.train()
    return [r for r in metrics.records if "loss" not in r]


def test_training_ends_with_a_final_evaluation_unless_stopped_early() -> None:
    assert [r["iteration"] for r in _train(7)] == [3, 6, 7]
    assert [r["iteration"] for r in _train(6)] == [3, 6]  # the last interval's evaluation is the final one
    assert [r["iteration"] for r in _train(7, stop_at=4)] == [3]  # a stop saves and leaves at once
    assert all(math.isfinite(r["valid_loss"]) for r in _train(7))
