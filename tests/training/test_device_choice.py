"""Which device a rank trains on, and the precision of its fp32 matmuls; the suite's own CPU pinning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from anneal.errors import ConfigError
from anneal.training.distributed import pick_device, set_matmul_precision


@pytest.mark.parametrize(("setting", "local_rank", "gpus", "expected"), [
    ("auto", 0, 0, "cpu"), ("auto", 3, 0, "cpu"), ("cpu", 1, 8, "cpu"),
    ("auto", 0, 1, "cuda:0"), ("auto", 7, 8, "cuda:7"), ("cuda", 1, 2, "cuda:1"),
])
def test_each_local_rank_gets_its_own_device(setting, local_rank, gpus, expected) -> None:
    assert str(pick_device(setting, local_rank, gpus)) == expected


@pytest.mark.parametrize(("setting", "local_rank", "gpus"), [("auto", 1, 1), ("cuda", 0, 0), ("cuda", 8, 8)])
def test_a_local_rank_without_a_gpu_is_refused_by_name(setting, local_rank, gpus) -> None:
    """Two processes on a one-GPU host: CUDA itself would say "invalid device ordinal"."""
    with pytest.raises(ConfigError) as error:
        pick_device(setting, local_rank, gpus)
    assert str(error.value) == (
        f"dist.device ({setting!r}) runs one process per GPU: local rank {local_rank} has none ({gpus} visible); "
        f"start at most {gpus} per node (--nproc-per-node) or set dist.device=cpu")


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(("tf32", "expected"), [(True, "high"), (False, "highest")])
def test_tf32_is_the_default_on_cuda_with_an_opt_out(restore_matmul_precision, compose, tf32, expected) -> None:
    assert compose().optimizer.tf32 is True
    cfg = compose(f"optimizer.tf32={str(tf32).lower()}")
    torch.set_float32_matmul_precision("medium")  # neither: the setting must come from optimizer.tf32
    assert set_matmul_precision(cfg.optimizer.tf32, torch.device("cuda", 0)) == expected
    assert torch.get_float32_matmul_precision() == expected


def test_tf32_leaves_the_cpu_alone(restore_matmul_precision) -> None:
    torch.set_float32_matmul_precision("highest")
    assert set_matmul_precision(True, torch.device("cpu")) == "highest"


def test_cpu_tests_see_no_gpu_here_or_in_what_they_start() -> None:
    """tests/conftest.py pins them: on a GPU host ``dist.device=auto`` must still mean CPU and gloo."""
    assert not torch.cuda.is_available()
    child = subprocess.run([sys.executable, "-c", "import os, torch; print(repr(os.environ['CUDA_VISIBLE_DEVICES']),"
                            " torch.cuda.device_count())"], capture_output=True, text=True, env=dict(os.environ),
                           check=True)
    assert child.stdout.split() == ["''", "0"]
