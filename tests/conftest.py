"""Shared fixtures: the real shipped conf/, composed by Hydra; CPU tests pinned to the CPU.

The suite passes on a GPU host as on CPU. Tests not marked ``gpu`` run on CPU and gloo whatever the
host has: ``dist.device=auto`` must not pick CUDA for them (on one GPU, a second local rank would ask
for device 1; on eight, gloo-tuned expectations would run on NCCL). So every process they start sees
no GPU (``CUDA_VISIBLE_DEVICES=""``, set for the session: module fixtures start runs too), and in this
process ``torch.cuda.is_available()`` answers False. Tests marked ``gpu`` see the host as it is.
"""

from __future__ import annotations

import os

import pytest

_HOST_CUDA_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")  # what the host set, for the gpu tests


def pytest_configure(config) -> None:
    import torch

    torch.cuda.is_available()  # CUDA reads the variable once, at its first call: this process keeps the host's
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every process a test starts runs on CPU, unless marked gpu


@pytest.fixture(autouse=True)
def _device_pinning(request, monkeypatch):
    """CPU tests: no CUDA in this process either; gpu tests: the host's devices, here and in children."""
    if request.node.get_closest_marker("gpu") is None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elif _HOST_CUDA_VISIBLE is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _HOST_CUDA_VISIBLE)


@pytest.fixture
def compose():
    """Compose the shipped conf/ with overrides and instantiate it: (overrides) -> ConfigContainer."""
    from anneal.config.compose import load

    return lambda *overrides: load(list(overrides))
