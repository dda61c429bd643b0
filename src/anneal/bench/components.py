"""In-process figures: the scheduler's cost per step, the preview's cost, checkpoint save/load."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from anneal.bench.stats import Stat, interleaved, ratios
from anneal.scheduler import OptimizerParamScheduler, Schedule, lr_at, wd_at

SCHEDULE = Schedule(init_lr=0.0, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=16_000, lr_decay_steps=9_600_000,
                    lr_decay_style="WSD", start_wd=0.0, end_wd=0.1, wd_incr_steps=9_600_000,
                    wd_incr_style="cosine", wsd_decay_steps=1_920_000, lr_wsd_decay_style="minus_sqrt")


class _Groups:
    def __init__(self, n: int) -> None:
        self.param_groups = [{"max_lr": 3e-4 * (1 + i % 2), "min_lr": 3e-5, "wd_mult": float(i % 2)}
                             for i in range(n)]


def scheduler_figures(repeats: int, steps: int = 20_000, points: int = 1_000_000) -> dict[str, Stat]:
    sched = OptimizerParamScheduler(_Groups(10), **vars(SCHEDULE))

    def step_ns() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            sched.step(32)
        return (time.perf_counter() - start) / steps * 1e9

    def preview() -> float:
        start = time.perf_counter()
        step = SCHEDULE.lr_decay_steps // points
        for k in range(points):
            lr_at(SCHEDULE, k * step, 3e-4, 3e-5)
            wd_at(SCHEDULE, k * step, 0.0, 0.1)
        return time.perf_counter() - start

    runs = interleaved({"step": step_ns, "preview": preview}, repeats=repeats)
    return {"scheduler_step_ns_10_groups": Stat.of(runs["step"], "ns"),
            "schedule_1m_points_s": Stat.of(runs["preview"], "s")}


def checkpoint_figures(repeats: int) -> dict[str, Stat]:
    """anneal's checkpoint of a ~30M-parameter model with Adam state vs torch.save/torch.load of it."""
    import torch

    from anneal.checkpoint.checkpointer import Checkpointer, split_tensors
    from anneal.config.model import ModelConfig
    from anneal.config.optimizer import OptimizerConfig
    from anneal.config.runtime import CheckpointConfig
    from anneal.model.qwen3 import build_model
    from anneal.optim import setup_optimizer
    from anneal.context import DistContext, TrainState

    model = build_model(ModelConfig(num_layers=8, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                                    num_query_groups=4, kv_channels=64, vocab_size=8192, seq_length=64))
    schedule = Schedule(0.0, 1e-3, 0.0, 0, 100, "constant", 0.0, 0.0, 100, "constant")
    flags = type("Flags", (), {"override_opt_param_scheduler": False, "use_checkpoint_opt_param_scheduler": True})
    optimizer, scheduler = setup_optimizer(OptimizerConfig(lr=1e-3), flags, model, schedule=schedule)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None)
    tensors = {"model": model.state_dict(), "optimizer": split_tensors(optimizer.state_dict())[0]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ck = Checkpointer(CheckpointConfig(save=str(root / "ck")), model=model, optimizer=optimizer,
                          scheduler=scheduler, ctx=ctx, config_yaml="", report=lambda _: None)
        counter = iter(range(1, 10_000))

        def anneal_save() -> None:
            ck.save(TrainState(iteration=next(counter)))

        def torch_save() -> None:
            torch.save(tensors, root / "plain.pt")

        def torch_save_fsync() -> None:  # the same durability as anneal's save, which fsyncs its files
            torch.save(tensors, root / "plain.pt")
            fd = os.open(root / "plain.pt", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        def anneal_load() -> None:
            ck._last_saved = None
            ck.load()

        def torch_load() -> None:
            torch.load(root / "plain.pt", weights_only=True)

        runs = interleaved({"anneal_save": anneal_save, "torch_save": torch_save,
                            "torch_save_fsync": torch_save_fsync, "anneal_load": anneal_load,
                            "torch_load": torch_load}, repeats=repeats)
    params = sum(p.numel() for p in model.parameters())
    return {"checkpoint_params": Stat.of([params], "parameters"),
            "checkpoint_save_s": Stat.of(runs["anneal_save"], "s"),
            "checkpoint_save_vs_torch_save": ratios(runs["anneal_save"], runs["torch_save"]),
            "checkpoint_save_vs_torch_save_fsync": ratios(runs["anneal_save"], runs["torch_save_fsync"]),
            "checkpoint_load_s": Stat.of(runs["anneal_load"], "s"),
            "checkpoint_load_vs_torch_load": ratios(runs["anneal_load"], runs["torch_load"])}


def checksum_figures(repeats: int, size_bytes: int = 256 << 20) -> dict[str, Stat]:
    """CRC32 throughput of one rank over a file it just wrote (in the page cache, as a save's files are)."""
    from anneal.checkpoint import files

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "__0_0.distcp"
        path.write_bytes(os.urandom(size_bytes))
        files.checksums(path.parent, [path.name])  # warm-up: the file is read once before timing

        def gib_per_s() -> float:
            start = time.perf_counter()
            files.checksums(path.parent, [path.name])
            return size_bytes / 2**30 / (time.perf_counter() - start)

        rates = [gib_per_s() for _ in range(repeats)]
    return {"checksum_gib_per_s_per_rank": Stat.of(rates, "GiB/s")}
