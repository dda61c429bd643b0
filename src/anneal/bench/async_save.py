"""How long a save blocks the loop: ``checkpoint.async_save`` against a synchronous save, side by side.

Both go through the launcher's ``Checkpointer`` (finite check, space check, DCP, checksums, manifest,
tracker) on about ``state_bytes`` of fp32 tensors in one process. Runs alternate; an async save's
write is waited for outside its timing, so neither save overlaps the other's measurement.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from anneal.bench.stats import Stat, interleaved, ratios

TENSOR_BYTES = 64 << 20  # the state comes in tensors of 64 MiB, like a model's large weights


class _Stub:
    """The optimizer and scheduler parts a checkpoint records, holding no state."""

    backend = "none"  # recorded in the checkpoint's metadata

    def state_dict(self) -> dict:
        return {}


def _model_of(state_bytes: int):
    """A module whose state dict is ``state_bytes`` (rounded to whole tensors) of random fp32 values."""
    import torch

    model = torch.nn.Module()
    for i in range(max(1, round(state_bytes / TENSOR_BYTES))):
        model.register_buffer(f"w{i}", torch.randn(TENSOR_BYTES // 4))
    return model


def async_blocking_ratio(state_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, Stat]:
    """Seconds a save blocks the caller, sync and async, and their ratio pair by pair (the issue's bar:
    async at most a quarter of sync); ``async_total_s`` adds the wait for the background write."""
    import torch

    from anneal.checkpoint.checkpointer import Checkpointer
    from anneal.config.runtime import CheckpointConfig
    from anneal.context import DistContext, TrainState

    model, stub = _model_of(state_bytes), _Stub()
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None)
    iterations = iter(range(1, 1_000_000))
    totals: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:

        def checkpointer(name: str, async_save: bool) -> Checkpointer:
            cfg = CheckpointConfig(save=str(Path(tmp) / name), most_recent_k=1, async_save=async_save)
            return Checkpointer(cfg, model=model, optimizer=stub, scheduler=stub, ctx=ctx, config_yaml="",
                                report=lambda _: None)

        sync, background = checkpointer("sync", False), checkpointer("async", True)

        def async_save() -> float:
            start = time.perf_counter()
            background.save(TrainState(iteration=next(iterations)))
            blocked_s = time.perf_counter() - start
            background.wait()  # outside the blocking time: the loop would be training meanwhile
            totals.append(time.perf_counter() - start)
            return blocked_s

        runs = interleaved({"sync": lambda: sync.save(TrainState(iteration=next(iterations))),
                            "async": async_save}, repeats=repeats)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"async_save_state_bytes": Stat.of([state], "bytes"),
            "sync_save_blocking_s": Stat.of(runs["sync"], "s"),
            "async_save_blocking_s": Stat.of(runs["async"], "s"),
            "async_save_total_s": Stat.of(totals[-repeats:], "s"),
            "async_save_blocking_ratio": ratios(runs["async"], runs["sync"])}
