"""Hugging Face -> anneal -> Hugging Face through the real entry points (pretrain.py, export_hf.py).

Two training runs in all: tied fp32 on 2 gloo ranks under torchrun, untied bf16 in one process,
both with the distributed optimizer and a WSD schedule; plus one refused run (exit 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from anneal_testing import ROOT, free_port, metrics_by_iteration, run_cli  # noqa: E402
from hf_helpers import (  # noqa: E402
    anneal_logits,
    hf_logits,
    model_config,
    model_from_checkpoint,
    overrides,
    save_hf,
    token_ids,
)

pytestmark = pytest.mark.slow

TRAIN = [
    "optimizer=distributed_fused_adam",
    "scheduler=wsd",
    "scheduler.lr_warmup_iters=1",
    "optimizer.lr=1e-4",
    "optimizer.min_lr=1e-5",
    "train.train_iters=5",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.eval_interval=null",
    "logger.log_interval=1",
    "logger.plot_schedule=false",
]


def _pretrain(tmp: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    run = [*TRAIN, *args, f"hydra.run.dir={tmp / 'run'}"]
    if ranks == 1:
        return run_cli(*run, cwd=tmp, timeout=300, env={"OMP_NUM_THREADS": "1"})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-port",
        str(free_port()),
        str(ROOT / "scripts" / "pretrain.py"),
        *run,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def _relative_change(model: torch.nn.Module, hf_model: torch.nn.Module) -> float:
    ours = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    theirs = dict(hf_model.named_parameters())
    from anneal.hf.mapping import to_hf_name

    start = torch.cat([theirs[to_hf_name(n)].detach().flatten() for n, _ in model.named_parameters()])
    return ((ours - start).norm() / start.norm()).item()


@pytest.mark.parametrize(
    "tied, dtype, ranks",
    [(True, "fp32", 2), (False, "bf16", 1)],
    ids=["tied-fp32-2ranks", "untied-bf16-1rank"],
)
def test_import_train_export_round_trip(tmp_path: Path, tied: bool, dtype: str, ranks: int) -> None:
    cfg = model_config(tied)
    hf_model = save_hf(tmp_path / "hf_in", cfg)
    result = _pretrain(
        tmp_path,
        ranks,
        *overrides(cfg),
        f"optimizer.bf16={dtype == 'bf16'}",
        f"checkpoint.pretrained_checkpoint={tmp_path / 'hf_in'}",
        f"checkpoint.save={tmp_path / 'ck'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrained: loaded Hugging Face weights" in result.stdout
    assert sorted(metrics_by_iteration(tmp_path / "run")) == [1, 2, 3, 4, 5]
    exported = run_cli(
        str(tmp_path / "ck"),
        str(tmp_path / "hf_out"),
        "--max-shard-size",
        "40KB",
        script="export_hf.py",
        cwd=tmp_path,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "hf_out" / "model.safetensors.index.json").is_file()
    trained = model_from_checkpoint(next((tmp_path / "ck").glob("iter_*")), cfg)
    # Trained from the imported weights: moved by 5 small steps, nowhere near a fresh initialisation.
    assert 1e-4 < _relative_change(trained, hf_model) < 0.2
    ids = token_ids(cfg, seed=1)
    assert (hf_logits(tmp_path / "hf_out", ids) - anneal_logits(trained, ids)).abs().max() < 1e-5
    if ranks == 1:  # a restart resumes from its own checkpoint and does not read the Hugging Face directory
        again = _pretrain(
            tmp_path,
            1,
            *overrides(cfg),
            f"optimizer.bf16={dtype == 'bf16'}",
            f"checkpoint.pretrained_checkpoint={tmp_path / 'hf_in'}",
            f"checkpoint.save={tmp_path / 'ck'}",
        )
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from" in again.stdout and "pretrained: loaded" not in again.stdout


def test_a_model_that_differs_from_config_json_is_refused_before_training(tmp_path: Path) -> None:
    cfg = model_config(True)
    save_hf(tmp_path / "hf_in", cfg)
    wrong = model_config(True, hidden_size=48)
    result = _pretrain(
        tmp_path, 1, *overrides(wrong), f"checkpoint.pretrained_checkpoint={tmp_path / 'hf_in'}"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.hidden_size (48) differs from config.json hidden_size (64)" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_hub_id_from_the_offline_cache_is_checked_before_training(tmp_path: Path, monkeypatch) -> None:
    """``checkpoint.pretrained_checkpoint=org/name`` through the launcher: the cached snapshot's config.json
    is read (and here refused) before anything is built; nothing is downloaded (HF_HUB_OFFLINE=1)."""
    from hf_cache import add_repo, offline_hub

    hub = offline_hub(monkeypatch, tmp_path / "home")  # the launcher inherits HF_HOME and HF_HUB_OFFLINE
    save_hf(tmp_path / "hf_in", model_config(True))
    add_repo(hub, "Tiny-Org/Qwen3-Tiny", tmp_path / "hf_in")
    wrong = model_config(True, hidden_size=48)
    result = _pretrain(tmp_path, 1, *overrides(wrong), "checkpoint.pretrained_checkpoint=Tiny-Org/Qwen3-Tiny")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.hidden_size (48) differs from config.json hidden_size (64)" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
