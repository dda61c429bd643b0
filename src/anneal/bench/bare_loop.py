"""A bare hand-written PyTorch loop over the same model, data and optimizer as the default run.

The yardstick for the launcher's overhead: ``python -m anneal.bench.bare_loop`` builds the tiny
Qwen3 model and the stdlib token windows with anneal's own builders, then trains with
``torch.optim.AdamW(fused=True)``, gradient accumulation and clipping, and nothing else: no
scheduler, no metrics, no checkpoints. It prints tokens/s over the iterations after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from anneal.config.compose import load
from anneal.data.datasets import build_datasets
from anneal.data.loader import get_microbatch
from anneal.model.qwen3 import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load(args.overrides)
    train, _ = build_datasets(cfg.dataset, seq_length=cfg.model.seq_length, vocab_size=cfg.model.vocab_size)
    torch.manual_seed(cfg.rng.seed)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    num_micro = gbs // mbs
    for it in range(args.iters):
        if it == args.warmup:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for micro in range(num_micro):
            tokens = get_microbatch(train, consumed_samples=it * gbs, microbatch=micro, micro_batch_size=mbs,
                                    dp_rank=0, dp_size=1)
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])  # the loss the launcher computes (model.*)
            (loss / num_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
        opt.step()
    elapsed = time.perf_counter() - start
    tokens = (args.iters - args.warmup) * gbs * cfg.model.seq_length
    print(json.dumps({"tokens_per_s": tokens / elapsed, "final_loss": loss.item()}))


if __name__ == "__main__":
    main()
