"""Optimizer figures: anneal's step against torch AdamW (foreach and fused), bandwidth, sharded state."""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist

from anneal.bench.stats import Stat, interleaved, ratios
from anneal.optim.bench import BYTES_PER_PARAM, build_anneal, free_port, make_model

INPLACE_BYTES = 400_000_000


def _torch_adamw(num_params: int, **kind) -> callable:
    model = make_model(num_params)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **kind).step


def step_figures(repeats: int, num_params: int = 50_000_000) -> dict[str, Stat]:
    x = torch.ones(INPLACE_BYTES // 4)
    anneal = build_anneal(make_model(num_params), 0.0, None)
    params = anneal.layout.total
    runs = interleaved({"mul": lambda: x.mul_(1.0000001), "foreach": _torch_adamw(num_params, foreach=True),
                        "fused": _torch_adamw(num_params, fused=True), "anneal": anneal.step}, repeats=repeats)
    bandwidth = [2 * INPLACE_BYTES / t for t in runs["mul"]]  # read + write, bytes/s
    traffic = [BYTES_PER_PARAM * params / t for t in runs["anneal"]]
    return {"optimizer_params": Stat.of([params], "parameters"),
            "optimizer_step_ms": Stat.of([t * 1e3 for t in runs["anneal"]], "ms"),
            "optimizer_vs_adamw_foreach": ratios(runs["anneal"], runs["foreach"]),
            "optimizer_vs_adamw_fused": ratios(runs["anneal"], runs["fused"]),
            "inplace_bandwidth_gbs": Stat.of([b / 1e9 for b in bandwidth], "GB/s"),
            "optimizer_traffic_of_inplace_bandwidth": Stat.of([a / b for a, b in zip(traffic, bandwidth)], "ratio")}


def _state_worker(rank: int, world: int, port: int, num_params: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    nbytes = build_anneal(make_model(num_params), 0.0, dist.group.WORLD).state_bytes()
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(nbytes))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # PLATFORM.md: gloo can crash at interpreter exit


def state_figures(num_params: int = 10_000_000) -> dict[str, Stat]:
    """Per-rank optimizer-state bytes of the distributed optimizer at 1 and at 2 gloo ranks."""
    import torch.multiprocessing as mp

    one = build_anneal(make_model(num_params), 0.0, None).state_bytes()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bytes")
        mp.start_processes(_state_worker, args=(2, port, num_params, out), nprocs=2, start_method="spawn")
        two = [int(open(f"{out}.{r}").read()) for r in range(2)]
    return {"dist_state_bytes_1_rank": Stat.of([one], "bytes"),
            "dist_state_bytes_per_rank_2_ranks": Stat.of(two, "bytes"),
            "dist_state_2_ranks_vs_1": Stat.of([b / one for b in two], "ratio")}
