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

# A fast Qwen3 shape whose head dim (24) differs from hidden_size // heads (16), as in Qwen3-0.6B, with GQA.
SMALL_QWEN3 = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
               "num_query_groups": 2, "kv_channels": 24}


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


def wandb_history(run_dir: Path, wait_s: float = 30.0) -> list[dict]:
    """The history rows of the one offline W&B run under ``run_dir``, read from its ``run-<id>.wandb`` file.

    wandb 0.31 ships no Python reader for that file; it is a LevelDB-style log (a 7-byte ``:W&B``
    header, 32 KiB blocks, 7-byte chunk headers) of wandb's own protobuf ``Record`` messages. Its
    service process may write the file up to about a second after ``run.finish()`` returns (seen
    here in 4 of 6 runs in one process), so the file is read again until it ends with the run's exit
    record, for up to ``wait_s``.
    """
    import time

    deadline = time.monotonic() + wait_s
    rows, complete = _wandb_rows(run_dir)
    while not complete and time.monotonic() < deadline:
        time.sleep(0.2)
        rows, complete = _wandb_rows(run_dir)
    return rows


def _wandb_rows(run_dir: Path) -> tuple[list[dict], bool]:
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunks, rows = path.read_bytes(), 7, [], []
    assert b":W&B".startswith(data[:4]), data[:7]  # the header, or a part of it while being written
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record.FromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "exit":
                return rows, True
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, False
