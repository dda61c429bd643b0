"""A bare hand-written PyTorch loop over the same model, data and optimizer as the default run.

The yardstick for the launcher's overhead: ``python -m anneal.bench.bare_loop`` builds the tiny
Qwen3 model and the stdlib token windows with anneal's own builders on the launcher's device
(``dist.device``, as ``resolve_device`` picks it), then trains with ``torch.optim.AdamW(fused=True)``,
gradient accumulation and clipping, and nothing else: no scheduler, no metrics, no checkpoints. It
prints tokens/s over the iterations after the warm-up, timed between device synchronizations.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from anneal.config.compose import load
from anneal.config.runtime import DistributedConfig
from anneal.data.datasets import build_datasets
from anneal.data.loader import get_microbatch
from anneal.model.qwen3 import build_model
from anneal.training.distributed import resolve_device

T = TypeVar("T")


def baseline_device(dist_cfg: DistributedConfig) -> torch.device:
    """The launcher's device for ``dist_cfg``: its rule and its local rank (0 outside torchrun)."""
    return resolve_device(dist_cfg, int(os.environ.get("LOCAL_RANK", "0")))


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run what was queued on it (CUDA runs kernels after their calls return)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its seconds, counting the kernels it queues on ``device`` and none queued before it."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def _to_device(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """nanoGPT's copy: from pinned memory without blocking the host on CUDA; as is on the CPU."""
    if device.type == "cuda":
        return tokens.pin_memory().to(device, non_blocking=True)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load(args.overrides)
    device = baseline_device(cfg.dist)
    train, _ = build_datasets(cfg.dataset, seq_length=cfg.model.seq_length, vocab_size=cfg.model.vocab_size)
    torch.manual_seed(cfg.rng.seed)
    model = build_model(cfg.model, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    num_micro = gbs // mbs

    def iterations(first: int, end: int) -> torch.Tensor:
        """Iterations ``[first, end)``; the last microbatch's loss."""
        for it in range(first, end):
            opt.zero_grad(set_to_none=True)
            for micro in range(num_micro):
                tokens = _to_device(get_microbatch(train, consumed_samples=it * gbs, microbatch=micro,
                                                   micro_batch_size=mbs, dp_rank=0, dp_size=1), device)
                loss = model(tokens[:, :-1], labels=tokens[:, 1:])  # the loss the launcher computes (model.*)
                (loss / num_micro).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
            opt.step()
        return loss

    iterations(0, args.warmup)
    loss, elapsed = timed(lambda: iterations(args.warmup, args.iters), device)
    tokens = (args.iters - args.warmup) * gbs * cfg.model.seq_length
    print(json.dumps({"tokens_per_s": tokens / elapsed, "final_loss": loss.item()}))


if __name__ == "__main__":
    main()
