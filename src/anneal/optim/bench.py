"""Optimizer-step benchmark: anneal's optimizer against PyTorch's fused AdamW, on this machine, in one run.

Everything is timed in the same run: an in-place ``x.mul_(a)`` over 400 MB (the memory-bandwidth
yardstick), ``torch.optim.AdamW(fused=True)`` with and without ``clip_grad_norm_``, anneal's
optimizer on one rank, and per rank at two gloo ranks (anneal's ``native-zero1`` split into its
phases, and PyTorch's ``ZeroRedundancyOptimizer`` for comparison). Effective traffic counts
7 x 4 bytes per parameter per step (read p, g, m, v; write p, m, v).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from anneal.config.optimizer import OptimizerConfig
from anneal.optim import collectives as comm
from anneal.optim.base import grad_scale
from anneal.scheduler import Schedule

BYTES_PER_PARAM = 7 * 4
HIDDEN = 2048


def make_model(num_params: int, bias: bool = False) -> torch.nn.Module:
    """Square linear layers holding about ``num_params`` fp32 parameters.

    Without biases by default: a dozen large tensors is the fastest case for PyTorch's fused
    AdamW. With 2-thread OpenMP on a 2-vCPU VM each small tensor (a bias) can cost milliseconds in
    the fused CPU kernel; the ``bias=True`` row shows that cost.
    """
    layers = max(1, round(num_params / (HIDDEN * HIDDEN)))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(HIDDEN, HIDDEN, bias=bias) for _ in range(layers)])


def interleaved_ms(
    cases: dict[str, Callable[[], object]], repeats: int, barrier: bool = False
) -> dict[str, float]:
    """Median ms of each case, timed round-robin so that drifting machine speed hits all alike."""
    for fn in cases.values():  # warm up: first touches, lazy allocations
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            if barrier:
                dist.barrier()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _mul_case(num_bytes: int) -> Callable[[], object]:
    x = torch.ones(num_bytes // 4)
    return lambda: x.mul_(1.0000001)


def bandwidth_gbs(num_bytes: int, ms: float) -> float:
    """GB/s of an in-place update (read + write) over ``num_bytes``."""
    return 2 * num_bytes / (ms / 1e3) / 1e9


def _fill_grads(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3


def _torch_adamw_case(num_params: int, clip: float, bias: bool = False) -> Callable[[], object]:
    model = make_model(num_params, bias)
    _fill_grads(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step() -> None:
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        opt.step()

    return step


def build_anneal(model: torch.nn.Module, clip: float, dp_group: dist.ProcessGroup | None):
    """anneal's distributed optimizer (``native-zero1``; at one rank it shards nothing)."""
    from anneal.optim import setup_optimizer

    config = OptimizerConfig(
        lr=1e-4, min_lr=1e-5, weight_decay=0.1, clip_grad=clip, use_distributed_optimizer=True
    )
    schedule = Schedule(
        init_lr=1e-4, max_lr=1e-4, min_lr=1e-5, lr_warmup_steps=0, lr_decay_steps=1000,
        lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=1000, wd_incr_style="constant",
    )  # fmt: skip
    flags = SimpleNamespace(override_opt_param_scheduler=False, use_checkpoint_opt_param_scheduler=False)
    optimizer, _ = setup_optimizer(config, flags, model, schedule=schedule, dp_group=dp_group)
    gen = torch.Generator().manual_seed(1)
    optimizer._flat_grad.copy_(torch.randn(optimizer._flat_grad.shape, generator=gen) * 1e-3)
    return optimizer


def one_rank_results(num_params: int, repeats: int, inplace_bytes: int = 400_000_000) -> dict[str, float]:
    cases = {
        "mul_ms": _mul_case(inplace_bytes),
        "torch_fused_ms": _torch_adamw_case(num_params, clip=0.0),
        "anneal_ms": build_anneal(make_model(num_params), 0.0, None).step,
        "torch_fused_clip_ms": _torch_adamw_case(num_params, clip=1.0),
        "anneal_clip_ms": build_anneal(make_model(num_params), 1.0, None).step,
        "torch_fused_bias_ms": _torch_adamw_case(num_params, clip=0.0, bias=True),
        "anneal_bias_ms": build_anneal(make_model(num_params, bias=True), 0.0, None).step,
    }
    return interleaved_ms(cases, repeats)


def two_rank_worker(rank: int, world: int, port: int, num_params: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.group.WORLD
    cases = {"mul_ms": _mul_case(400_000_000 // world)}
    cases["torch_fused_full_ms"] = _torch_adamw_case(num_params, clip=0.0)  # plain DP: every rank updates all
    cases.update(_anneal_phase_cases(num_params, group))
    cases.update(_zero_redundancy_cases(num_params, group))
    result = interleaved_ms(cases, repeats, barrier=True)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # PLATFORM.md: avoids gloo's crash at interpreter exit


def _anneal_phase_cases(num_params: int, group: dist.ProcessGroup) -> dict[str, Callable[[], object]]:
    opt = build_anneal(make_model(num_params), 1.0, group)
    grads = opt._shard_grads()
    denom = float(opt.world_size)
    scale = grad_scale(opt._global_norm(grads) / denom, opt.clip_grad, denom)
    return {
        "zero1_step_ms": opt.step,
        "zero1_reduce_ms": lambda: comm.reduce_gradients(opt._flat_grad, opt.layout, group, True),
        "zero1_norm_ms": lambda: opt._global_norm(grads),
        "zero1_update_ms": lambda: opt._apply_update(grads, scale),
        "zero1_gather_ms": lambda: comm.gather_parameters(opt._flat_param, opt.layout, group),
    }


def _zero_redundancy_cases(num_params: int, group: dist.ProcessGroup) -> dict[str, Callable[[], object]]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_model(num_params)
    _fill_grads(model)
    opt = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4, weight_decay=0.1, fused=True
    )

    def reduce() -> None:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)

    return {"zro_reduce_ms": reduce, "zro_step_ms": opt.step}


def two_rank_results(num_params: int, repeats: int) -> dict[str, float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        args = (2, free_port(), num_params, repeats, out)
        mp.start_processes(_spawn_entry, args=args, nprocs=2, start_method="spawn")
        return torch.load(out)


def _spawn_entry(rank: int, *args) -> None:
    two_rank_worker(rank, *args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(num_params: int = 50_000_000, repeats: int = 7) -> dict[str, float]:
    """All timings (ms) and the parameter count actually used."""
    r: dict[str, float] = {"num_params": sum(p.numel() for p in make_model(num_params).parameters())}
    r["num_bias_params"] = (
        sum(p.numel() for p in make_model(num_params, bias=True).parameters()) - r["num_params"]
    )
    r["threads"] = torch.get_num_threads()
    r.update(one_rank_results(num_params, repeats))
    r.update({f"r2_{k}": v for k, v in two_rank_results(num_params, repeats).items()})
    return r


def effective_gbs(num_params: float, ms: float) -> float:
    return BYTES_PER_PARAM * num_params / (ms / 1e3) / 1e9


def format_table(r: dict[str, float]) -> str:
    """The results side by side: step time, ratio to fused AdamW, effective traffic vs ``mul_``."""
    n = r["num_params"]
    bw1, bw2 = bandwidth_gbs(400_000_000, r["mul_ms"]), bandwidth_gbs(400_000_000, r["r2_mul_ms"])
    base, base_clip = r["torch_fused_ms"], r["torch_fused_clip_ms"]
    header = (
        f"optimizer step, {n / 1e6:.1f}M fp32 parameters, {int(r['threads'])} threads (1 rank) / 1 thread per rank "
        f"(2 gloo ranks)\nin-place x.mul_(a) over 400 MB: {bw1:.1f} GB/s in 1 process, {bw2:.1f} GB/s in all "
        "over 2 processes (200 MB each, concurrently)\n"
    )
    rows = [("", "ms", "ratio", "eff GB/s", "of mul_ BW")]

    def row(label: str, ms: float, ref: float, traffic_params: float | None, bw: float) -> None:
        eff = effective_gbs(traffic_params, ms) if traffic_params else None
        rows.append(
            (
                label,
                f"{ms:8.1f}",
                f"{ms / ref:5.2f}",
                f"{eff:6.1f}" if eff else "",
                f"{eff / bw:5.2f}" if eff else "",
            )
        )

    row("torch AdamW(fused=True), 1 rank                [ref]", base, base, n, bw1)
    row("anneal, 1 rank, clip_grad=0", r["anneal_ms"], base, n, bw1)
    row("torch clip_grad_norm_ + AdamW(fused), 1 rank   [ref]", base_clip, base_clip, n, bw1)
    row("anneal, 1 rank, clip_grad=1", r["anneal_clip_ms"], base_clip, n, bw1)
    nb = n + r["num_bias_params"]
    row(
        "torch AdamW(fused), same + a bias per layer    [ref]",
        r["torch_fused_bias_ms"],
        r["torch_fused_bias_ms"],
        nb,
        bw1,
    )
    row(
        "anneal, same + a bias per layer, clip_grad=0", r["anneal_bias_ms"], r["torch_fused_bias_ms"], nb, bw1
    )
    full = r["r2_torch_fused_full_ms"]
    rows.append(("2 gloo ranks, 1 thread each, per rank; ratio to the [ref] in this block:", "", "", "", ""))
    row("  torch AdamW(fused) on all params (plain DP)  [ref]", full, full, 2 * n, bw2)
    row("  anneal native-zero1 update (its half)", r["r2_zero1_update_ms"], full, n, bw2)
    row("  anneal native-zero1 grad norm (+ all_reduce)", r["r2_zero1_norm_ms"], full, None, bw2)
    row("  anneal native-zero1 grad all_reduce (gloo)", r["r2_zero1_reduce_ms"], full, None, bw2)
    row("  anneal native-zero1 param broadcast (gloo)", r["r2_zero1_gather_ms"], full, None, bw2)
    row("  anneal native-zero1 whole step, clip_grad=1", r["r2_zero1_step_ms"], full, None, bw2)
    row("  torch ZeroRedundancyOptimizer step (upd+bcast)", r["r2_zro_step_ms"], full, None, bw2)
    row("  torch per-parameter grad all_reduce (DDP-like)", r["r2_zro_reduce_ms"], full, None, bw2)
    rows.append(
        (
            "1-rank rows vs 2-rank rows: anneal update per rank / torch fused 1 rank",
            "",
            f"{r['r2_zero1_update_ms'] / base:5.2f}",
            "",
            "",
        )
    )
    widths = [max(len(x[i]) for x in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths)))
        for x in rows
    ]
    return header + "\n".join(lines)
