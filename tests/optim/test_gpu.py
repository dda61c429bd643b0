"""CUDA: the native optimizer on a GPU matches the CPU run; Apex, where installed, matches native.

Skipped without CUDA (and the Apex test without Apex). Not run on the machine that wrote them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from optim_helpers import FLAGS, SCHEDULE, TinyLM, batches, build, config, train

from anneal.optim import setup_optimizer
from anneal.optim.apex_backend import apex_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_run(steps: int, **overrides) -> tuple[list[float], str]:
    model = TinyLM().cuda()
    opt, sched = setup_optimizer(config(**overrides), FLAGS, model, schedule=SCHEDULE)
    return train(model, opt, sched, [b.cuda() for b in batches(steps)], range(steps)), opt.backend


@pytest.mark.parametrize(("bf16", "rel"), [(False, 1e-4), (True, 3e-2)])
def test_native_optimizer_on_cuda_matches_cpu(bf16, rel):
    model, opt, sched = build(use_distributed_optimizer=True, bf16=bf16)
    expected = train(model, opt, sched, batches(4), range(4))
    losses, backend = _cuda_run(4, use_distributed_optimizer=True, bf16=bf16)
    assert backend == "native-zero1"
    assert losses == pytest.approx(expected, rel=rel)


@pytest.mark.skipif(not apex_available(), reason="needs NVIDIA Apex")
def test_apex_matches_native_on_one_gpu(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        native, _ = _cuda_run(4, use_distributed_optimizer=True, distributed_backend="native")
        apex, backend = _cuda_run(4, use_distributed_optimizer=True, distributed_backend="apex")
    finally:
        dist.destroy_process_group()
    assert backend == "apex"
    assert apex == pytest.approx(native, rel=1e-4)
