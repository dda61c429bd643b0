"""tests/optim: one intra-op thread in the test process (tiny tensors; two OpenMP threads on a
2-vCPU VM make each small kernel cost milliseconds). Spawned ranks set their own."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
