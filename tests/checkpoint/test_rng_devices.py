"""A checkpoint written on one device resumes on the other: the RNG states it has are mapped, the rest
reseeded, and the resume line says which (issue 20: a CPU-written checkpoint asked for ``rng.rank_N.cuda``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anneal.checkpoint import checkpointer as checkpointer_module
from anneal.checkpoint.checkpointer import Checkpointer, rng_parts
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.runtime import CheckpointConfig
from anneal.model.qwen3 import build_model
from anneal.optim import setup_optimizer
from anneal.scheduler import Schedule
from anneal.context import DistContext, TrainState


@pytest.mark.parametrize("device, saved, parts, note", [
    ("cpu", {"cpu"}, ("cpu",), ""),
    ("cuda", {"cpu", "cuda"}, ("cpu", "cuda"), ""),
    ("cuda", {"cpu"}, ("cpu",), "CUDA RNG reseeded"),  # the failure the issue names: a CPU checkpoint on a GPU
    ("cpu", {"cpu", "cuda"}, ("cpu",), "CUDA RNG state is not used"),
])
def test_rng_parts_load_what_was_saved_for_this_device(device, saved, parts, note) -> None:
    loaded, said = rng_parts(device, saved)
    assert loaded == parts and (note in said if note else said == "")


def _checkpointer(save: Path, lines: list[str]) -> Checkpointer:
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                      num_query_groups=2, vocab_size=64, seq_length=16)
    model = build_model(cfg)
    schedule = Schedule(init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=0, lr_decay_steps=100,
                        lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=100,
                        wd_incr_style="constant")
    optimizer, scheduler = setup_optimizer(OptimizerConfig(lr=1e-3, min_lr=1e-4), _Flags(), model, schedule=schedule)
    return Checkpointer(CheckpointConfig(save=str(save)), model=model, optimizer=optimizer, scheduler=scheduler,
                        ctx=DistContext(0, 1, 0, torch.device("cpu"), None), config_yaml="model: {}\n",
                        report=lines.append)


class _Flags:
    override_opt_param_scheduler = False
    use_checkpoint_opt_param_scheduler = False


def test_a_checkpoint_with_cuda_rng_resumes_on_cpu_and_says_so(tmp_path: Path, monkeypatch) -> None:
    with monkeypatch.context() as m:  # saved as a CUDA run saves: a CPU and a CUDA generator state
        m.setattr(checkpointer_module, "_rng_state",
                  lambda device: {"cpu": torch.get_rng_state(), "cuda": torch.zeros(16, dtype=torch.uint8)})
        torch.manual_seed(7)
        _checkpointer(tmp_path / "ck", []).save(TrainState(iteration=1))
    expected = torch.rand(3)  # the CPU stream right after the save
    torch.manual_seed(8)
    lines: list[str] = []
    state = _checkpointer(tmp_path / "ck", lines).load()
    assert state.iteration == 1
    assert "CPU RNG restored; the checkpoint's CUDA RNG state is not used on this device" in lines[0]
    assert torch.equal(torch.rand(3), expected)
