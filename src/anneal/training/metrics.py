"""Metrics every ``logger.log_interval``: JSON lines, TensorBoard and the console, on rank 0 only."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from anneal.config.runtime import LoggerConfig

# Dense peak FLOP/s per device by name fragment: (16-bit, fp32 via TF32). Unknown devices give no MFU.
PEAK_FLOPS = {"H200": (989e12, 494.7e12), "H100": (989e12, 494.7e12), "A100": (312e12, 156e12),
              "L40S": (362e12, 183e12), "A10G": (125e12, 62.5e12)}


def peak_flops(device: torch.device, half_precision: bool) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (half, tf32) in PEAK_FLOPS.items():
        if fragment in name:
            return half if half_precision else tf32
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Writes ``metrics.jsonl`` in the run directory, TensorBoard scalars and a console line."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, *, enabled: bool, total_iters: int) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.total_iters = total_iters
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)
            self._tb = _tensorboard(Path(cfg.tensorboard_dir) if cfg.tensorboard_dir else run_dir / "tensorboard")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        step = record["iteration"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        print(self._console(record), flush=True)

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def _console(self, r: dict[str, Any]) -> str:
        it = r["iteration"]
        width = len(str(self.total_iters))
        head = f"[{it:>{width}}/{self.total_iters} {100 * it / self.total_iters:3.0f}%]" \
            if self.cfg.progress_bar else f"iter {it}"
        if "valid_loss" in r:
            return f"{head} validation loss {r['valid_loss']:.4f} ppl {math.exp(min(r['valid_loss'], 50)):.2f}"
        parts = [head, f"samples {r['consumed_samples']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
                 f"wd {r['weight_decay']:.3g}", f"gnorm {r['grad_norm']:.3f}",
                 f"{r['tokens_per_s'] / 1e3:.1f}k tok/s", f"{r['tflops_per_device']:.3f} TFLOP/s"]
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("skipped_iters"):
            parts.append(f"skipped {r['skipped_iters']}")
        if r.get("loss_scale", 1.0) != 1.0:
            parts.append(f"scale {r['loss_scale']:.3g}")
        parts.append(f"mem {r['peak_mem_mb']:.0f}MB")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
        print("anneal: tensorboard unavailable; metrics go to metrics.jsonl and the console", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(path))


class Throughput:
    """Tokens/s and TFLOP/s over the iterations since the last log."""

    def __init__(self, *, flops_per_token: float, world_size: int, peak: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak
        self.tokens = 0
        self.start = time.perf_counter()

    def reset(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict[str, float | None]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        flops = tokens_per_s * self.flops_per_token / self.world_size
        self.tokens, self.start = 0, time.perf_counter()
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": flops / 1e12,
                "mfu": flops / self.peak if self.peak else None}
