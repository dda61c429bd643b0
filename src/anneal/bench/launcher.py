"""Whole-process figures: the launcher's tokens/s against a bare loop, start-up, dry-run time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anneal.bench.stats import Stat, interleaved, ratios

ROOT = Path(__file__).resolve().parents[3]
PRETRAIN = str(ROOT / "scripts" / "pretrain.py")
QUIET = ["train.eval_interval=null", "logger.plot_schedule=false", "logger.progress_bar=true"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _launcher_tokens_per_s(iters: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, PRETRAIN, f"train.train_iters={iters}", f"logger.log_interval={warmup}",
                f"hydra.run.dir={tmp}", *QUIET]
        subprocess.run(args, check=True, capture_output=True, env=_env(), cwd=tmp)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first holds the warm-up
    return len(windows) / sum(1 / w for w in windows)  # equal-token windows: the harmonic mean


def _bare_tokens_per_s(iters: int, warmup: int) -> float:
    out = subprocess.run([sys.executable, "-m", "anneal.bench.bare_loop", "--iters", str(iters), "--warmup",
                          str(warmup)], check=True, capture_output=True, text=True, env=_env(), cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def overhead(repeats: int, iters: int = 40, warmup: int = 10) -> dict[str, Stat]:
    """tokens/s of scripts/pretrain.py and of the bare loop, alternating, and their pairwise ratio."""
    runs = interleaved({"launcher": lambda: _launcher_tokens_per_s(iters, warmup),
                        "bare": lambda: _bare_tokens_per_s(iters, warmup)}, repeats=repeats, warmup=0)
    return {"launcher_tokens_per_s": Stat.of(runs["launcher"], "tokens/s"),
            "bare_loop_tokens_per_s": Stat.of(runs["bare"], "tokens/s"),
            "launcher_vs_bare": ratios(runs["launcher"], runs["bare"])}


def _time_to_first_iteration() -> float:
    """Seconds from process start to the console line of the first finished iteration."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, PRETRAIN, "train.train_iters=2", "logger.log_interval=1", "scheduler.lr_warmup_iters=1",
                                 f"hydra.run.dir={tmp}", *QUIET], stdout=subprocess.PIPE, text=True,
                                env=_env(), cwd=tmp)
        for line in proc.stdout:
            if "] [1/" in line:  # "[timestamp] [1/N ...": the first iteration's line
                elapsed = time.perf_counter() - start
                break
        else:
            raise RuntimeError("pretrain.py finished without logging iteration 1")
        proc.wait()
    return elapsed


def _wall(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env=_env(), cwd=ROOT)
    return time.perf_counter() - start


def _time_to_schedule() -> float:
    """Seconds until a dry run has printed the derived schedule (the plan, which imports torch, follows)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, PRETRAIN, "dry_run=true"], stdout=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("end of training"):
            elapsed = time.perf_counter() - start
            break
    else:
        raise RuntimeError("the dry run printed no schedule")
    proc.wait()
    return elapsed


def startup(repeats: int) -> dict[str, Stat]:
    runs = interleaved({"first_iteration": _time_to_first_iteration,
                        "import_torch": lambda: _wall("-c", "import torch"),
                        "dry_run": lambda: _wall(PRETRAIN, "dry_run=true"),
                        "dry_run_schedule": _time_to_schedule,
                        "dry_run_qwen3_4b": lambda: _wall(PRETRAIN, "recipe=qwen3_4b", "dry_run=true")},
                       repeats=repeats)
    return {"time_to_first_iteration_s": Stat.of(runs["first_iteration"], "s"),
            "import_torch_s": Stat.of(runs["import_torch"], "s"),
            "first_iteration_vs_import_torch": ratios(runs["first_iteration"], runs["import_torch"]),
            "dry_run_s": Stat.of(runs["dry_run"], "s"),
            "dry_run_vs_import_torch": ratios(runs["dry_run"], runs["import_torch"]),
            "dry_run_schedule_printed_s": Stat.of(runs["dry_run_schedule"], "s"),
            "dry_run_qwen3_4b_s": Stat.of(runs["dry_run_qwen3_4b"], "s")}
