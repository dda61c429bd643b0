"""The loss is the mean over the counted tokens of the whole global batch (Megatron's per-token loss).

With ``dataset.eod_mask_loss`` the microbatches hold different numbers of counted tokens, and the mean of
microbatch means weighs a token of a sparse microbatch more than one of a dense microbatch. The trainer's
gradient must be that of one forward over the global batch, summed and divided by its count:

- on one rank, two microbatches of very different counts (the mean of means is shown to differ by far more
  than the tolerance, so the test can fail);
- under FSDP2 on 2 gloo ranks, with every document flag on: the gradient equals that of each document of the
  global batch computed alone, from position 0 (the issue's "packed equals one by one", across ranks).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anneal.config.batch import BatchRamp
from anneal.config.model import ModelConfig
from anneal.config.training import TrainingConfig
from anneal.context import DistContext
from anneal.model.documents import DocumentBoundaries
from anneal.model.qwen3 import build_model
from anneal.parallel import ParallelDims, plan_layout, with_mesh
from anneal.parallelize import build_parallel_model, copy_full_
from anneal.training.trainer import LoopParts, Trainer

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                    kv_channels=8, vocab_size=64, seq_length=24, share_embeddings_and_output_weights=False)
EOD = MODEL.vocab_size - 1
TOLERANCE = 1e-6  # fp32: summation order alone


class _Windows:
    """Fixed windows: sample i is row i % len of ``rows``."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows, self.seq_length = rows, rows.shape[1] - 1

    def gather(self, samples: np.ndarray) -> np.ndarray:
        return self.rows[np.asarray(samples) % len(self.rows)]


class _KeepGrads:
    """The optimizer's loop interface without a step: the gradients stay for the test to read."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self) -> SimpleNamespace:
        return SimpleNamespace(skipped=False, grad_norm=torch.zeros(()), loss_scale=1.0)


def _windows(seed: int, eods_per_row: list[int]) -> np.ndarray:
    """Rows of ``seq_length + 1`` random tokens with the given number of EODs as inputs of each row."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, EOD, size=(len(eods_per_row), MODEL.seq_length + 1))
    for row, count in zip(rows, eods_per_row):
        row[rng.choice(np.arange(1, MODEL.seq_length - 1), size=count, replace=False)] = EOD
    return rows


def _trainer(model, rows: np.ndarray, documents: DocumentBoundaries, dims: ParallelDims, gbs: int,
             mbs: int) -> Trainer:
    cfg = TrainingConfig(train_iters=1, global_batch_size=gbs, micro_batch_size=mbs, eval_interval=None)
    parts = LoopParts(model, _KeepGrads(model), SimpleNamespace(step=lambda increment: None), _Windows(rows), None,
                      BatchRamp(global_batch_size=gbs), documents=documents)
    ctx = DistContext(dims.rank, dims.world_size, 0, torch.device("cpu"), "gloo" if dims.world_size > 1 else None,
                      dims)
    return Trainer(cfg, parts, ctx, None, train_iters=1, log_interval=1)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for name, p in model.named_parameters()}


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    x = torch.cat([a[k].double().reshape(-1) for k in sorted(a)])
    y = torch.cat([b[k].double().reshape(-1) for k in sorted(b)])
    return ((x - y).norm() / y.norm()).item()


def _reference(model, rows: np.ndarray, documents: DocumentBoundaries) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward over the whole global batch: the loss sum over its counted tokens, divided by their count."""
    model.zero_grad(set_to_none=True)
    inputs = documents.inputs(torch.from_numpy(rows))
    count = (inputs["labels"] != -100).sum()
    loss = model(**inputs, reduction="sum") / count
    loss.backward()
    return loss.item(), _grads(model)


# Measured against the same dtype's global-batch reference: fp32 1.2e-7, bf16 2.1e-3, fp16 2.7e-4; the mean
# of microbatch means is 0.30 off in every dtype.
LOW_PRECISION = {torch.float32: TOLERANCE, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=["fp32", "bf16", "fp16"])
def test_microbatches_of_different_counts_give_the_global_batch_per_token_gradient(dtype) -> None:
    torch.manual_seed(0)
    model = build_model(MODEL, dtype=dtype)
    documents = DocumentBoundaries(EOD, eod_mask_loss=True)
    rows = _windows(1, [10, 12, 0, 1])  # microbatch 0 counts 21 fewer tokens than microbatch 1
    expected_loss, expected = _reference(model, rows, documents)
    tolerance = LOW_PRECISION[dtype]

    trainer = _trainer(model, rows, documents, ParallelDims(world_size=1, rank=0, dp_size=1, dp_rank=0), gbs=4, mbs=2)
    loss, _ = trainer.train_step()
    assert _relative_error(_grads(model), expected) < tolerance
    assert abs(loss.item() - expected_loss) < tolerance * expected_loss

    model.zero_grad(set_to_none=True)  # what the loop computed before: the mean of the microbatch means
    for half in (rows[:2], rows[2:]):
        (model(**documents.inputs(torch.from_numpy(half))) / 2).backward()
    assert _relative_error(_grads(model), expected) > 10 * tolerance  # the test tells the two apart


def test_without_masking_the_loss_is_the_mean_of_microbatch_means_as_before() -> None:
    torch.manual_seed(0)
    model = build_model(MODEL)
    rows = _windows(2, [3, 0, 5, 1])
    documents = DocumentBoundaries(EOD)  # every token counts
    trainer = _trainer(model, rows, documents, ParallelDims(world_size=1, rank=0, dp_size=1, dp_rank=0), gbs=4, mbs=2)
    loss, _ = trainer.train_step()
    model.zero_grad(set_to_none=True)
    means = [model(torch.from_numpy(half[:, :-1]), labels=torch.from_numpy(half[:, 1:])) for half in
             (rows[:2], rows[2:])]
    assert torch.equal(loss, (means[0].detach() + means[1].detach()) / 2)  # bit for bit, the old formula


def _one_by_one(model, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Every document of the global batch alone, from position 0: the gradient of the summed losses of its
    counted tokens (an EOD input's label is the next document's: not counted), over the batch's count."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for row in rows:
        inputs, labels = row[:-1], row[1:]
        ends = [i + 1 for i in np.flatnonzero(inputs == EOD)] + [len(inputs)]
        start = 0
        for end in ends:
            if end > start:
                x, y = torch.from_numpy(inputs[start:end])[None], torch.from_numpy(labels[start:end].copy())[None]
                if inputs[end - 1] == EOD:
                    y[0, -1] = -100
                total = total + model(x, labels=y, reduction="sum")
                count += int((y != -100).sum())
            start = end
    (total / count).backward()
    return _grads(model)


def _fsdp_rank(rank: int, world: int, out: Path) -> None:
    documents = DocumentBoundaries(EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    rows = _windows(3, [4, 0, 2, 6, 1, 3, 5, 2])  # a global batch of 8: 2 microbatches of 2 on each rank
    torch.manual_seed(0)
    reference = build_model(MODEL)
    expected = _one_by_one(reference, rows)

    train = TrainingConfig(train_iters=1, global_batch_size=8, micro_batch_size=2)
    dims = with_mesh(plan_layout(train, world, rank, fsdp=True), "cpu")
    torch.manual_seed(0)
    model = build_parallel_model(MODEL, dims, device=torch.device("cpu"), param_dtype=torch.float32,
                                 reshard_after_forward=True)
    with torch.no_grad():  # the reference's weights, whatever the sharded build drew
        for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            copy_full_(p, q)
    trainer = _trainer(model, rows, documents, dims, gbs=8, mbs=2)
    trainer.train_step()
    error = _relative_error(_grads(model), expected)
    (out / f"rank{rank}.json").write_text(json.dumps({"error": error}))


def test_fsdp2_on_two_ranks_packed_documents_give_each_documents_own_gradient(tmp_path: Path) -> None:
    from optim.optim_helpers import run_distributed

    run_distributed(_fsdp_rank, 2, tmp_path)
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in range(2)]
    assert max(errors) < TOLERANCE, errors
