"""The native engine's construction peak against its steady state, measured on this machine.

``construction_peak_ratio`` builds the model and the optimizer as a run does (``build_parallel_model``,
then ``setup_optimizer``) in a fresh process that is rank 0 of ``dp_size`` data-parallel ranks: a fake
process group (``torch.testing``'s ``FakeStore``) gives the optimizer its shard without other processes,
and nothing is sent while building. Memory is the process's resident set (torch's CPU allocator keeps no
statistics): ``VmHWM`` (the peak) and ``VmRSS`` once ``setup_optimizer`` returns (the steady state), both
above the RSS before building. The peak includes the steady state, so a build without a transient peak
gives 1.0. The planner's two figures for the same rank come with them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from anneal.bench.stats import Stat
from anneal.config.model import ModelConfig

MIB = 2**20
PRECISIONS = ("fp32", "bf16", "fp16")


def qwen3_0p6b() -> ModelConfig:
    """Qwen3-0.6B's shape (596M parameters, tied embedding of 156M), from its recipe."""
    from anneal.recipes import RECIPES

    return RECIPES["qwen3_0p6b"]().model


def construction_child(model: dict, precision: str, dp_size: int, zero1: bool) -> dict:
    """Run in a fresh process: RSS bytes before building, at the peak and after ``setup_optimizer``.

    Linux only: writing 5 to ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current RSS,
    so what ``import torch`` touched does not count.
    """
    import torch
    import torch.distributed as dist

    from anneal.optim import setup_optimizer
    from anneal.parallel import single_process
    from anneal.parallelize import build_parallel_model

    torch.set_num_threads(os.cpu_count() or 1)  # no timing compared here: use the whole machine
    group = None
    if dp_size > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dp_size)
        group = dist.group.WORLD
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, start = _status_kib("VmRSS"), time.perf_counter()
    torch.manual_seed(0)
    built = build_parallel_model(ModelConfig(**model), single_process(), device=torch.device("cpu"),
                                 param_dtype=torch.float32, reshard_after_forward=True)
    optimizer, _ = setup_optimizer(_optimizer(precision, zero1), _FLAGS, built, schedule=_schedule(),
                                   dp_group=group, device=torch.device("cpu"))
    seconds = time.perf_counter() - start
    return {"base": base * 1024, "peak": _status_kib("VmHWM") * 1024, "steady": _status_kib("VmRSS") * 1024,
            "seconds": seconds, "parameters": optimizer.layout.total}


def construction_peak_ratio(model: ModelConfig | None = None, *, precision: str = "bf16", dp_size: int = 64,
                            zero1: bool = True) -> dict[str, Stat]:
    """Peak RSS while building ÷ RSS after ``setup_optimizer`` (above the RSS before building), one rank.

    Defaults: Qwen3-0.6B, bf16, ZeRO-1 over 64 ranks (about 4 GiB; 10–20 s on 2 cores). Also the
    measured MiB, the planner's construction and steady figures for that rank and the build's seconds.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision ({precision!r}) must be one of {PRECISIONS}")
    model = model or qwen3_0p6b()
    args = json.dumps([dataclasses.asdict(model), precision, dp_size, zero1])
    code = ("import json; from anneal.bench.construction import construction_child as child; "
            f"print(json.dumps(child(*json.loads({args!r}))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    m = json.loads(done.stdout.splitlines()[-1])
    peak, steady = m["peak"] - m["base"], m["steady"] - m["base"]
    planned_build, planned_steady = _planned(model, precision, dp_size, zero1)
    return {"construction_parameters": Stat.of([m["parameters"]], "parameters"),
            "construction_peak_mib": Stat.of([peak / MIB], "MiB"),
            "construction_steady_mib": Stat.of([steady / MIB], "MiB"),
            "construction_peak_vs_steady": Stat.of([peak / steady], "ratio"),
            "construction_planned_vs_steady": Stat.of([planned_build / planned_steady], "ratio"),
            "construction_s": Stat.of([m["seconds"]], "s")}


def _planned(model: ModelConfig, precision: str, dp_size: int, zero1: bool) -> tuple[int, int]:
    """The planner's (construction, steady model state) bytes for rank 0 of this layout."""
    from anneal.parallel import ParallelDims
    from anneal.planner import construction_bytes, parameter_shapes, state_bytes

    dims = ParallelDims(world_size=dp_size, rank=0, dp_size=dp_size, dp_rank=0)
    optimizer, shapes = _optimizer(precision, zero1), parameter_shapes(model)
    return (construction_bytes(optimizer, dims, shapes),
            state_bytes(model, optimizer, dims, shapes=shapes).total)


def _optimizer(precision: str, zero1: bool):
    from anneal.config.optimizer import OptimizerConfig

    return OptimizerConfig(lr=1e-4, bf16=precision == "bf16", fp16=precision == "fp16",
                           use_distributed_optimizer=zero1, distributed_backend="native")


def _schedule():
    from anneal.scheduler import Schedule

    return Schedule(0.0, 1e-4, 0.0, 0, 100, "constant", 0.0, 0.0, 100, "constant")


_FLAGS = type("Flags", (), {"override_opt_param_scheduler": False,
                            "use_checkpoint_opt_param_scheduler": False})  # the scheduler's two fields


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
