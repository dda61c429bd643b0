"""The microbatch loader follows Megatron's pretraining sampler: every data-parallel size reads the same;
the prefetching ``Microbatches`` reads what the plain path reads, in its order, one microbatch ahead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anneal.config.dataset import DatasetConfig
from anneal.data.datasets import build_datasets
from anneal.config.batch import BatchRamp
from anneal.data.loader import HostCopy, Microbatches, get_microbatch, microbatch_samples

SEQ = 8
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def train():
    train, _ = build_datasets(DatasetConfig(kind="mock", mock_num_tokens=5000), seq_length=SEQ, vocab_size=50)
    return train


def _global_batch(train, consumed: int, micro_batch_size: int, dp_size: int) -> dict[int, list[torch.Tensor]]:
    """What each rank reads for the global batch starting at ``consumed``, microbatch by microbatch."""
    num_microbatches = GLOBAL_BATCH // (micro_batch_size * dp_size)
    return {rank: [get_microbatch(train, consumed_samples=consumed, microbatch=m,
                                  micro_batch_size=micro_batch_size, dp_rank=rank, dp_size=dp_size)
                   for m in range(num_microbatches)]
            for rank in range(dp_size)}


@pytest.mark.parametrize(("micro_batch_size", "dp_size"), [(2, 2), (1, 4), (4, 2), (1, 8), (2, 4)])
def test_ranks_together_read_what_one_rank_reads(train, micro_batch_size: int, dp_size: int) -> None:
    consumed = 3 * GLOBAL_BATCH  # resumed mid-run; crosses no special boundary
    single = torch.cat(_global_batch(train, consumed, micro_batch_size=1, dp_size=1)[0])
    assert torch.equal(single, torch.from_numpy(train.gather(np.arange(consumed, consumed + GLOBAL_BATCH))))
    per_rank = _global_batch(train, consumed, micro_batch_size, dp_size)
    # Megatron order: round m holds samples [m * mbs * dp, (m + 1) * mbs * dp), rank r its r-th slice
    rounds = [torch.cat([per_rank[rank][m] for rank in range(dp_size)]) for m in range(len(per_rank[0]))]
    assert torch.equal(torch.cat(rounds), single)


def test_megatron_sample_order_for_two_ranks() -> None:
    indices = {(m, r): microbatch_samples(consumed_samples=16, microbatch=m, micro_batch_size=2, dp_rank=r,
                                          dp_size=2).tolist() for m in range(2) for r in range(2)}
    assert indices == {(0, 0): [16, 17], (0, 1): [18, 19], (1, 0): [20, 21], (1, 1): [22, 23]}


def test_microbatch_is_long_tensor_of_inputs_and_labels(train) -> None:
    batch = get_microbatch(train, consumed_samples=0, microbatch=0, micro_batch_size=4, dp_rank=0, dp_size=1)
    assert batch.dtype == torch.int64 and batch.shape == (4, SEQ + 1)
    assert torch.equal(batch, torch.from_numpy(train.gather(np.arange(4))))


def test_loader_runs_into_the_next_epoch(train) -> None:
    consumed = len(train) - 2
    batch = get_microbatch(train, consumed_samples=consumed, microbatch=0, micro_batch_size=4, dp_rank=0,
                           dp_size=1)
    assert torch.equal(batch[2:], torch.from_numpy(train.gather([len(train), len(train) + 1])))


@pytest.mark.parametrize("kwargs", [{"dp_rank": 2, "dp_size": 2}, {"dp_rank": -1, "dp_size": 2},
                                    {"micro_batch_size": 0}, {"consumed_samples": -1}])
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    args = {"consumed_samples": 0, "microbatch": 0, "micro_batch_size": 2, "dp_rank": 0, "dp_size": 1}
    args |= kwargs
    with pytest.raises(ValueError):
        microbatch_samples(**args)


class _Recording:
    """A dataset that logs each read, to see what was requested when."""

    def __init__(self, data) -> None:
        self.data, self.reads = data, []

    def gather(self, samples: np.ndarray) -> np.ndarray:
        self.reads.append(samples.tolist())
        return self.data.gather(samples)


def _prefetched(data, consumed: int, num_microbatches: int, dp_rank: int, dp_size: int) -> Microbatches:
    return Microbatches(data, HostCopy(), consumed_samples=consumed, num_microbatches=num_microbatches,
                        micro_batch_size=2, dp_rank=dp_rank, dp_size=dp_size)


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_prefetched_microbatches_are_the_plain_ones_over_a_ramp_from_a_resume(train, dp_rank: int) -> None:
    ramp = BatchRamp(global_batch_size=16, start=4, increment=4, ramp_samples=48)  # 4, 4, 4, 4, 8, 8, 12, …
    consumed, sizes = ramp.samples_after(3), []  # resumed mid-ramp, after three iterations
    for _ in range(7):
        batch = ramp.batch_size_at(consumed)
        num_microbatches = batch // (2 * 2)  # micro batch 2, dp 2
        plain = [get_microbatch(train, consumed_samples=consumed, microbatch=m, micro_batch_size=2,
                                dp_rank=dp_rank, dp_size=2) for m in range(num_microbatches)]
        prefetched = list(_prefetched(train, consumed, num_microbatches, dp_rank, dp_size=2))
        assert len(prefetched) == num_microbatches
        assert all(torch.equal(a, b) for a, b in zip(prefetched, plain))
        consumed, sizes = consumed + batch, sizes + [batch]
    assert sizes == [4, 8, 8, 12, 12, 16, 16]  # the ramp's every level, and past its end


def test_microbatch_i_comes_with_i_plus_1_read_and_nothing_past_the_iteration(train) -> None:
    data = _Recording(train)
    for micro, _ in enumerate(_prefetched(data, consumed=40, num_microbatches=3, dp_rank=0, dp_size=1)):
        ahead = min(micro + 1, 2)  # the last one has nothing after it in the iteration
        assert data.reads == [[40 + 2 * m, 41 + 2 * m] for m in range(ahead + 1)], micro
    assert data.reads == [[40, 41], [42, 43], [44, 45]]  # each once, none of the next iteration's
