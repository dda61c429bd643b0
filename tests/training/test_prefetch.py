"""The trainer's microbatches, prefetched one ahead: the model sees what the plain path reads, in its order,
over a batch-size ramp and from a resume; what a run has read is what it counts as consumed. On CUDA (marked
gpu, not run on the machine that wrote them), the side-stream copies reach the compute stream intact whichever
stream lags."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anneal.config.batch import BatchRamp
from anneal.config.dataset import DatasetConfig
from anneal.config.training import TrainingConfig
from anneal.data.datasets import build_datasets
from anneal.data.loader import CudaCopy, Microbatches, get_microbatch
from anneal.parallel import ParallelDims
from anneal.context import DistContext, TrainState
from anneal.training.trainer import LoopParts, Trainer

MICRO_BATCH, DP_SIZE = 2, 2
RAMP = BatchRamp(global_batch_size=16, start=4, increment=4, ramp_samples=48)  # 4 ×4, 8 ×2, 12 ×2, then 16


class _Recording:
    """The training split, logging the samples of each read."""

    def __init__(self, data) -> None:
        self.data, self.seq_length, self.read = data, data.seq_length, []

    def gather(self, samples: np.ndarray) -> np.ndarray:
        self.read += samples.tolist()
        return self.data.gather(samples)


class _TokenModel(torch.nn.Module):
    """Keeps the tokens of each forward (inputs and the last label); its loss has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        self.seen.append(torch.cat([input_ids, labels[:, -1:]], dim=1))
        return self.w * input_ids.float().mean()


class _Optimizer:
    def zero_grad(self) -> None: ...

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self) -> SimpleNamespace:
        return SimpleNamespace(skipped=False, grad_norm=torch.zeros(()), loss_scale=1.0)


@pytest.fixture(scope="module")
def train_split():
    train, _ = build_datasets(DatasetConfig(kind="mock", mock_num_tokens=5000), seq_length=8, vocab_size=50)
    return train


def _trainer(data, dp_rank: int, iteration: int) -> Trainer:
    """A trainer of rank ``dp_rank`` of 2, resumed after ``iteration`` iterations of ``RAMP``."""
    cfg = TrainingConfig(train_iters=20, global_batch_size=RAMP.global_batch_size,
                         micro_batch_size=MICRO_BATCH)
    parts = LoopParts(_TokenModel(), _Optimizer(), SimpleNamespace(step=lambda increment: None),
                      _Recording(data), None, RAMP)
    dims = ParallelDims(world_size=DP_SIZE, rank=dp_rank, dp_size=DP_SIZE, dp_rank=dp_rank)
    ctx = DistContext(dp_rank, DP_SIZE, 0, torch.device("cpu"), None, dims)
    state = TrainState(iteration=iteration, consumed_samples=RAMP.samples_after(iteration))
    return Trainer(cfg, parts, ctx, None, train_iters=20, log_interval=1, state=state)


def _plain(data, consumed: int, dp_rank: int) -> list[torch.Tensor]:
    """The plain path: the iteration's microbatches read one by one, as the trainer read them before."""
    num_microbatches = RAMP.batch_size_at(consumed) // (MICRO_BATCH * DP_SIZE)
    return [get_microbatch(data, consumed_samples=consumed, microbatch=m, micro_batch_size=MICRO_BATCH,
                           dp_rank=dp_rank, dp_size=DP_SIZE) for m in range(num_microbatches)]


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_trainer_feeds_the_plain_path_batches_over_a_ramp_from_a_resume(train_split, dp_rank: int) -> None:
    trainer = _trainer(train_split, dp_rank, iteration=3)  # resumed mid-ramp, at consumed sample 12
    expected = []
    for _ in range(7):  # batches 4, 8, 8, 12, 12, 16, 16: 1 to 4 microbatches an iteration
        expected += _plain(train_split, trainer.state.consumed_samples, dp_rank)
        trainer.train_step()
    seen = trainer.p.model.seen
    assert len(seen) == len(expected) == 19
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_a_run_stopped_after_any_iteration_has_read_only_what_it_consumed(train_split, dp_rank: int) -> None:
    trainer = _trainer(train_split, dp_rank, iteration=3)
    start, data = trainer.state.consumed_samples, trainer.p.train_data
    for _ in range(7):
        trainer.train_step()  # a stop or a checkpoint can come after any iteration
        consumed = trainer.state.consumed_samples
        round_size = MICRO_BATCH * DP_SIZE  # Megatron's rounds: this rank reads its slice of each
        mine = [s for s in range(start, consumed) if (s - start) % round_size // MICRO_BATCH == dp_rank]
        assert sorted(data.read) == mine and max(data.read) < consumed  # each once, nothing read ahead
        start, data.read = consumed, []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lagging", ["compute", "copy"])
def test_side_stream_copies_reach_the_compute_stream_intact(train_split, lagging: str) -> None:
    copy, consumed = CudaCopy(torch.device("cuda", 0)), RAMP.samples_after(9)  # batch 16: 4 microbatches
    if lagging == "copy":  # the first copy lands late: the compute stream must wait for it (wait_stream)
        with torch.cuda.stream(copy.stream):
            torch.cuda._sleep(50_000_000)
    seen = []
    for tokens in Microbatches(train_split, copy, consumed_samples=consumed, num_microbatches=4,
                               micro_batch_size=MICRO_BATCH, dp_rank=0, dp_size=DP_SIZE):
        if lagging == "compute":  # batches are dropped before the compute stream reads them: the later
            torch.cuda._sleep(50_000_000)  # copies must not reuse their blocks meanwhile (record_stream)
        seen.append(tokens.clone())
    torch.cuda.synchronize()
    assert all(torch.equal(a.cpu(), b) for a, b in zip(seen, _plain(train_split, consumed, 0), strict=True))
