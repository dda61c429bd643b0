"""GPU figures (only with CUDA): tokens/s, TFLOP/s and MFU of Qwen3 0.6B and 1.7B shapes in bf16."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from anneal.bench.launcher import PRETRAIN, QUIET, _env
from anneal.bench.stats import Stat

MODELS = ("qwen3_0p6b", "qwen3_1p7b")


def _backends() -> list[str]:
    from anneal.optim.apex_backend import apex_available

    return ["native", "apex"] if apex_available() else ["native"]


def _run(model: str, backend: str, iters: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, PRETRAIN, f"model={model}", "dataset=mock", "optimizer=distributed_fused_adam",
                f"optimizer.distributed_backend={backend}", "optimizer.bf16=true", f"train.train_iters={iters}",
                "train.global_batch_size=8", "train.micro_batch_size=4", "model.seq_length=2048",
                "logger.log_interval=5", "scheduler.lr_warmup_iters=5", f"hydra.run.dir={tmp}", *QUIET]
        done = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=tmp)
        if done.returncode:
            raise RuntimeError(failure(f"{model} ({backend})", done.returncode, done.stderr))
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "tokens_per_s" in r][1:]  # drop the warm-up window


def failure(what: str, code: int, stderr: str, lines: int = 20) -> str:
    """Why a run failed: its exit code and the end of its stderr (anneal's one-line error comes last)."""
    tail = "\n".join(stderr.strip().splitlines()[-lines:]) or "(no output on stderr)"
    return f"bench: the GPU run of {what} exited {code}:\n{tail}"


def gpu_figures(iters: int = 40) -> dict[str, Stat]:
    import torch

    if not torch.cuda.is_available():
        return {}
    results: dict[str, Stat] = {}
    for model in MODELS:
        for backend in _backends():
            windows = _run(model, backend, iters)
            key = f"{model}_{backend}"
            results[f"{key}_tokens_per_s"] = Stat.of([w["tokens_per_s"] for w in windows], "tokens/s")
            results[f"{key}_tflops"] = Stat.of([w["tflops_per_device"] for w in windows], "TFLOP/s")
            if all(w.get("mfu") for w in windows):
                results[f"{key}_mfu"] = Stat.of([w["mfu"] for w in windows], "ratio")
    return results
