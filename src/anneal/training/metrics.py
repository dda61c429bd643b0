"""Metrics every ``logger.log_interval``: JSON lines, TensorBoard, W&B and the console, on rank 0 only.

Console lines go through :mod:`logging`, so Hydra's job logging writes the same lines, in the same
``anneal.log_format.LogFormatter`` format (``conf/hydra/job_logging/anneal.yaml``), to
``<run dir>/pretrain.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from anneal.config.runtime import LoggerConfig
from anneal.errors import ConfigError
from anneal.log_format import console_logging

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device by name fragment: (16-bit, fp32 via TF32). Unknown devices give no MFU.
# Dense peaks per GPU (vendor datasheets, no 2:4 sparsity): (bf16/fp16, tf32, fp32). Most specific name
# fragment first: "H100 NVL" and "H100 PCIe" before "H100" (SXM), as torch.cuda.get_device_name says them.
PEAK_FLOPS = (("H100 NVL", (835e12, 417.5e12, 60e12)), ("H100 PCIe", (756e12, 378e12, 51e12)),
              ("H100", (989e12, 494.7e12, 67e12)), ("H200", (989e12, 494.7e12, 67e12)),
              ("B200", (2250e12, 1125e12, 75e12)), ("MI300X", (1307.4e12, 653.7e12, 163.4e12)),
              ("A100", (312e12, 156e12, 19.5e12)), ("L40S", (362e12, 183e12, 91.6e12)),
              ("A10G", (125e12, 62.5e12, 31.2e12)))


def peak_flops(device: torch.device, half_precision: bool) -> float | None:
    """The dense peak of the precision the matmuls run in: 16-bit, else TF32 when fp32 matmuls may use it
    (``torch.get_float32_matmul_precision()`` not "highest"), else plain fp32; None off CUDA or unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tf32 = torch.get_float32_matmul_precision() != "highest"
    for fragment, (half, tf32_peak, fp32_peak) in PEAK_FLOPS:
        if fragment in name:
            return half if half_precision else tf32_peak if tf32 else fp32_peak
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA; the CPU's maximum RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_duration(seconds: float) -> str:
    """``1:02:03``, or ``2d 1:02:03`` past a day."""
    rest = int(round(seconds))
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Elapsed wall time and an ETA for the iterations left.

    The rate is measured from the end of this process's first iteration (``tick``; without ticks, its
    first log), so the warm-up of that iteration (allocator, compilation, caches) does not count, and a
    resumed run counts only its own iterations. Two iterations timed after it give the first ETA.
    """

    EARLY_ITERS = 2  # iterations timed after the first before an ETA is shown

    def __init__(self, total_iters: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_iters = total_iters
        self.clock = clock
        self.start = clock()
        self.mark: tuple[int, float] | None = None  # (iteration, time) the rate is measured from
        self._early_done = False

    def tick(self, iteration: int, settle: Callable[[], None] | None = None) -> float | None:
        """After each iteration: marks the first; returns the ETA once, when ``EARLY_ITERS`` more are timed.

        ``settle`` (a device synchronize) runs only on those two iterations, before the clock is read.
        """
        if self._early_done or (self.mark is not None and iteration - self.mark[0] < self.EARLY_ITERS):
            return None
        if settle is not None:
            settle()
        if self.mark is None:
            self.mark = (iteration, self.clock())
            return None
        self._early_done = True
        return self.update(iteration)["eta_s"]

    def update(self, iteration: int) -> dict[str, float | None]:
        now = self.clock()
        if self.mark is None:
            self.mark = (iteration, now)
        first, since = self.mark
        done = iteration - first
        timed = done >= self.EARLY_ITERS  # a rate from at least two iterations
        eta = (now - since) / done * max(self.total_iters - iteration, 0) if timed else None
        return {"elapsed_s": now - self.start, "eta_s": eta}

    def seconds_per_iteration(self, iteration: int) -> float:
        first, since = self.mark
        return (self.clock() - since) / max(iteration - first, 1)


def wandb_mode(mode: str, environ: Mapping[str, str]) -> str:
    """``logger.wandb_mode`` resolved: ``auto`` takes $WANDB_MODE if set, else online when $WANDB_API_KEY
    is set, else offline (a machine without credentials is treated as one without network)."""
    if mode != "auto":
        return mode
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class WandbSink:
    """One W&B run (rank 0) that receives every numeric metric, stepped by iteration."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_config: dict | None, run_id: str | None) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ConfigError(f"logger.wandb_project ({cfg.wandb_project!r}) needs the wandb package: "
                              "pip install 'anneal[wandb]'") from error
        save_dir = Path(cfg.wandb_save_dir) if cfg.wandb_save_dir else run_dir
        save_dir.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(cfg.wandb_mode, os.environ)
        log.info(f"W&B: starting ({mode})" + (f", continuing run {run_id}" if run_id else ""))
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_exp_name,
                              dir=str(save_dir), mode=mode, config=run_config, id=run_id,
                              resume="allow" if run_id else None, settings=wandb.Settings(silent=True))
        log.info(_wandb_line(mode, self.run, continued=run_id is not None))

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_finite_numbers(record), step=record["iteration"])

    def close(self) -> None:
        self.run.finish()


def _wandb_line(mode: str, run: Any, *, continued: bool) -> str:
    if mode == "disabled":
        return "W&B: disabled (logger.wandb_mode or $WANDB_MODE)"
    again = " (continued)" if continued else ""
    if mode != "offline":
        return f"W&B: {mode} run {run.url}{again}"
    where = Path(run.dir).parent  # <save dir>/wandb/offline-run-<time>-<id>
    return f"W&B: offline run {run.id}{again} in {where}; upload it with `wandb sync {where}`"


_WANDB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def continued_wandb_run(train_state: Mapping[str, Any] | None) -> str | None:
    """The W&B run id a checkpoint's train state recorded, when it is a plain id (the state is data)."""
    run_id = (train_state or {}).get("wandb_run_id")
    return run_id if isinstance(run_id, str) and _WANDB_ID.match(run_id) else None


def _finite_numbers(record: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in record.items() if key != "iteration" and not isinstance(value, bool)
            and isinstance(value, (int, float)) and math.isfinite(value)}


class MetricsLogger:
    """Writes ``metrics.jsonl`` in the run directory, TensorBoard scalars, W&B and a console line."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, *, enabled: bool, total_iters: int,
                 run_config: dict | None = None, wandb_run_id: str | None = None) -> None:
        """``wandb_run_id``: the W&B run to continue (the one a resumed checkpoint recorded)."""
        self.cfg = cfg
        self.enabled = enabled
        self.total_iters = total_iters
        self.path = run_dir / "metrics.jsonl"
        self.progress = Progress(total_iters)
        self._file = self._tb = self._wandb = None
        if enabled:
            console_logging()
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)
            self._tb = _tensorboard(Path(cfg.tensorboard_dir or run_dir / "tensorboard"))
            self._wandb = WandbSink(cfg, run_dir, run_config, wandb_run_id) if cfg.wandb_project else None
        self.wandb_run_id = self._wandb.run.id if self._wandb is not None else None  # saved in checkpoints

    def tick(self, iteration: int) -> None:
        """After every iteration: the first ETA as soon as it is measured, on its own line unless this
        iteration logs one anyway (a clock read per iteration; a device sync on two iterations only)."""
        if not self.enabled:
            return
        eta = self.progress.tick(iteration, settle=_settle)
        if eta is None or iteration % self.cfg.log_interval == 0 or iteration == self.total_iters:
            return
        per_iter = self.progress.seconds_per_iteration(iteration)
        elapsed = self.progress.clock() - self.progress.start
        log.info(f"{self._head(iteration)} | {per_iter:.2f} s per iteration | {_times(elapsed, eta)}")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if "loss" in record:  # a training record (not a validation one)
            record = {**record, **self.progress.update(record["iteration"])}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in _finite_numbers(record).items():
                self._tb.add_scalar(key, value, record["iteration"])
        if self._wandb is not None:
            self._wandb.log(record)
        log.info(self._console(record))

    def info(self, text: str) -> None:
        if self.enabled:
            for line in text.splitlines():  # one prefix per line in the console and in pretrain.log
                log.info(line)

    def _head(self, it: int) -> str:
        width = len(str(self.total_iters))
        return f"[{it:>{width}}/{self.total_iters} {100 * it / self.total_iters:3.0f}%]" \
            if self.cfg.progress_bar else f"iter {it}"

    def _console(self, r: dict[str, Any]) -> str:
        head = self._head(r["iteration"])
        if "loss" not in r:  # an evaluation: validation losses, downstream metrics
            return " | ".join([head, *_evaluation_parts(r)])
        parts = [head, f"samples {r['consumed_samples']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
                 f"wd {r['weight_decay']:.3g}", f"gnorm {r['grad_norm']:.3f}"]
        if "tokens_per_s" in r:
            parts += [f"{r['tokens_per_s'] / 1e3:.1f}k tok/s", f"{r['tflops_per_device']:.3f} TFLOP/s"]
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("skipped_iters"):
            parts.append(f"skipped {r['skipped_iters']}")
        if r.get("loss_scale", 1.0) != 1.0:
            parts.append(f"scale {r['loss_scale']:.3g}")
        parts.append(f"mem {r['peak_mem_mb']:.0f}MB")
        parts.append(_times(r["elapsed_s"], r["eta_s"]))
        return " | ".join(parts)

    def close(self) -> None:
        for sink in (self._file, self._tb, self._wandb):
            if sink is not None:
                sink.close()


def _evaluation_parts(r: dict[str, Any]) -> list[str]:
    """``valid_loss`` as loss and perplexity, then each ``valid_loss/<name>`` and ``eval/<task>/<metric>``."""
    parts = []
    if "valid_loss" in r:
        parts.append(f"validation loss {r['valid_loss']:.4f} ppl {math.exp(min(r['valid_loss'], 50)):.2f}")
    for key, value in r.items():
        if key.startswith(("valid_loss/", "eval/")) and isinstance(value, (int, float)):
            parts.append(f"{key} {value:.4f}")
    return parts


def _times(elapsed_s: float, eta_s: float | None) -> str:
    eta = f", ETA {format_duration(eta_s)}" if eta_s is not None else ""
    return f"elapsed {format_duration(elapsed_s)}{eta}"


def _settle() -> None:
    """Wait for the device's queued work, so that a time read is the work's (CUDA runs ahead of the host)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
        log.warning("anneal: tensorboard unavailable; metrics go to metrics.jsonl and the console")
        return None
    return SummaryWriter(log_dir=str(path))


class Throughput:
    """Tokens/s and TFLOP/s over the iterations since the last log, less the time ``excluded()`` (the first
    iteration's warm-up and compilation, evaluations, checkpoint saves); nothing when no tokens were timed."""

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

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside does not count (the window's start moves by it)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def read(self) -> dict[str, float | None]:
        if not self.tokens:
            self.start = time.perf_counter()
            return {}
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        flops = tokens_per_s * self.flops_per_token / self.world_size
        self.tokens, self.start = 0, time.perf_counter()
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": flops / 1e12,
                "mfu": flops / self.peak if self.peak else None}
