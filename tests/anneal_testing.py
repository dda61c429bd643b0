"""Helpers shared by the tests: paths of the repository and running its scripts as subprocesses."""

from __future__ import annotations

import os
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
