"""Helpers shared by the tests: paths of the repository and running its scripts as subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def run_cli(*args: str, script: str = "pretrain.py", env: dict | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a scripts/ entry point as a real subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("ANNEAL_FULL_ERROR", "HYDRA_FULL_ERROR")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_by_iteration(run_dir: Path) -> dict[int, dict]:
    """Training records of ``metrics.jsonl`` by iteration (the last one wins: a resumed run appends)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "loss" in r}
