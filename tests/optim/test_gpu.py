"""CUDA: the native optimizer's updates on a GPU match fp32 on the CPU; Apex, where installed, matches native.

Skipped without CUDA (and the Apex test without Apex). Not run on the machine that wrote them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from optim_helpers import FLAGS, SCHEDULE, TinyLM, batches, config, masters, relative_error, train

from anneal.optim import setup_optimizer
from anneal.optim.apex_backend import apex_available

MICRO = 2  # microbatches per step: a dropped one shows in the update

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_run(steps: int, **overrides) -> tuple[list[float], str]:
    model = TinyLM().cuda()
    opt, sched = setup_optimizer(config(**overrides), FLAGS, model, schedule=SCHEDULE)
    return train(model, opt, sched, [b.cuda() for b in batches(steps)], range(steps)), opt.backend


def _update(steps: int, device: str, **overrides) -> tuple[torch.Tensor, str]:
    """The fp32 masters' update over ``steps`` of MICRO microbatches each on ``device``, returned on the CPU."""
    model = TinyLM().to(device)
    opt, sched = setup_optimizer(config(**overrides), FLAGS, model, schedule=SCHEDULE)
    before = masters(opt)
    train(model, opt, sched, [b.to(device) for b in batches(steps)], range(steps), micro=MICRO)
    return (masters(opt) - before).cpu(), opt.backend


# ||update - CPU fp32 update|| / ||CPU fp32 update||: fp32 on CUDA differs only by kernels' rounding; bf16
# as on the CPU (tests/optim/test_distributed.py measured 0.0096 there), where a no-op step gives 1.0, a
# doubled lr 0.996 and one microbatch of two dropped 0.82.
@pytest.mark.parametrize(("bf16", "bound"), [(False, 1e-3), (True, 0.05)])
def test_native_optimizer_on_cuda_updates_parameters_as_fp32_on_cpu(bf16, bound):
    expected, _ = _update(4, "cpu", use_distributed_optimizer=True)
    update, backend = _update(4, "cuda", use_distributed_optimizer=True, bf16=bf16)
    assert backend == "native-zero1"
    err = relative_error(update, expected)
    assert err <= bound, f"update relative error {err:.4f} > {bound}"


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
