"""Helpers of the checkpoint tests: run the real entry point (one process or torchrun), hash a directory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from anneal_testing import ROOT, free_port

# A tiny run: one layer, sequence 32, a few iterations.
BASE = ["model.num_layers=1", "model.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
        "scheduler.lr_warmup_iters=2", "logger.log_interval=1", "train.eval_interval=null",
        "logger.plot_schedule=false"]
_DROP = ("ANNEAL_FAULT", "ANNEAL_FULL_ERROR", "HYDRA_FULL_ERROR")


def pretrain(run_dir: Path, *args: str, nproc: int = 1, fault: str | None = None,
             torchrun_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``scripts/pretrain.py *args`` in ``run_dir``, under torchrun when ``nproc`` > 1 or torchrun_args."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if fault:
        env["ANNEAL_FAULT"] = fault
    script = [str(ROOT / "scripts" / "pretrain.py"), *args, f"hydra.run.dir={run_dir}"]
    if nproc == 1 and not torchrun_args:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), *torchrun_args, *script]
    return subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def run(tmp: Path, *overrides: str, nproc: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    """The tiny run (``BASE``) with ``overrides``, its run directory ``tmp/run``."""
    tmp.mkdir(parents=True, exist_ok=True)
    return pretrain(tmp / "run", *BASE, *overrides, nproc=nproc, fault=fault)


def digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` (the save directory's lock file aside)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def error_line(result: subprocess.CompletedProcess) -> str:
    """The last ``anneal: error:`` line on stderr (under torchrun every rank prints one)."""
    lines = [line for line in result.stderr.splitlines() if "anneal: error:" in line]
    assert lines, result.stdout[-2000:] + result.stderr[-3000:]
    return lines[-1]
