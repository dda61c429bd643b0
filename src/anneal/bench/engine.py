"""PyTorch's engine against anneal's native one, and the chunked loss's memory, measured on this machine.

- **State per rank** (``state_figures``): parameters + gradients + optimizer state, summed over the
  tensors a rank really holds after one training step (local shards of DTensors; the model's
  parameters and ``.grad`` views on the native engine), for each layout in real gloo processes,
  as a ratio to one native process. Everything is fp32 (Adam), so the ratios compare layouts, not
  precisions: the torch engine keeps fp32 parameters whatever its compute dtype, and the native
  engine's bf16 adds an fp32 master copy (planner: 6 + 12/dp B per parameter against 16). The
  planner's figure (``anneal.planner.state_bytes``) is reported next to each measured one.
- **Step time** (``step_figures``): one full step (forward, backward, optimizer step) of FSDP2
  against the native ZeRO-1 optimizer on 2 gloo ranks with one thread each, in the same processes,
  alternated step by step; one native process on rank 0 as a reference (rank 1 waits meanwhile).
- **Loss peak** (``loss_figures``): ``linear_cross_entropy`` forward + backward, plain and chunked,
  each in a fresh process: peak RSS above the RSS once the inputs exist (torch's CPU allocator keeps
  no statistics, and ``tracemalloc`` does not see it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from anneal.bench.stats import Stat, ratios
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.config.training import TrainingConfig
from anneal.optim.bench import free_port
from anneal.parallel import ParallelDims, plan_layout, single_process, with_mesh
from anneal.planner import StateBytes, logits_bytes, state_bytes

MIB = 2**20
# 41.6M parameters (tied embedding 16.4M, 8 blocks of 3.1M): Qwen3's shape at a size 2 cores can step.
MODEL = ModelConfig(num_layers=8, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                    num_query_groups=4, kv_channels=64, vocab_size=32000, seq_length=256)
OPTIMIZER = OptimizerConfig(lr=1e-4)  # AdamW, fp32, clip_grad 1.0
TRAIN = TrainingConfig(train_iters=1, global_batch_size=4, micro_batch_size=1)  # splits over dp 1, 2 and 4
# name -> (world size, plan_layout keywords, native ZeRO-1); the native ones without "fsdp".
LAYOUTS: dict[str, tuple[int, dict, bool]] = {
    "native_replicated_2": (2, {}, False),
    "native_zero1_2": (2, {}, True),
    "fsdp2_2": (2, {"fsdp": True}, False),
    "tp2": (2, {"fsdp": True, "tp": 2}, False),
    "hsdp_2x2": (4, {"fsdp": True, "replicate": 2}, False),
    "tp2_fsdp2_2": (4, {"fsdp": True, "tp": 2}, False),
}
LOSS_SHAPE = (8192, 512, 32000)  # tokens, hidden, vocab: the plain fp32 logits are 1 GB
LOSS_CHUNK = 1024


def build(model_cfg: ModelConfig, dims: ParallelDims, *, zero1: bool = False) -> tuple[torch.nn.Module, Any]:
    """(model, optimizer) for ``dims`` in fp32: the native flat optimizer, or FSDP2's (the launcher's builder)."""
    from anneal.optim.param_groups import get_param_groups
    from anneal.optim.setup import build_fsdp2_optimizer, build_optimizer
    from anneal.parallelize import build_parallel_model, deferred_init

    torch.manual_seed(0)
    model = build_parallel_model(model_cfg, dims, device=torch.device("cpu"), param_dtype=torch.float32,
                                 reshard_after_forward=True)
    groups = get_param_groups(model, OPTIMIZER, fallback_min_lr=0.0)
    if dims.fsdp:
        return model, build_fsdp2_optimizer(OPTIMIZER, groups, model, dims, torch.float32)
    backend = "native" if zero1 else "replicated"
    return model, build_optimizer(OPTIMIZER, groups, backend=backend, dtype=torch.float32,
                                  dp_group=dims.dp_group, init=deferred_init(model, torch.device("cpu")))


def train_step(model, optimizer, tokens: torch.Tensor) -> None:
    optimizer.zero_grad()
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    optimizer.scale_loss(loss).backward()
    optimizer.step()


def batch(model_cfg: ModelConfig, rows: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model_cfg.vocab_size, (rows, seq + 1), generator=gen)


def measured_state(model, optimizer) -> StateBytes:
    """Bytes of the tensors this rank holds: local parameter shards, their gradients, optimizer state.

    On the native engine the parameters and gradients are views of flat buffers padded by fewer than
    dp elements; the padding is not counted (nor by the planner).
    """
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(model.parameters())
    return StateBytes(params=sum(_nbytes(local(p)) for p in params),
                      grads=sum(_nbytes(local(p.grad)) for p in params if p.grad is not None),
                      optimizer=optimizer.state_bytes())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def planned_state(model_cfg: ModelConfig, dims: ParallelDims, zero1: bool) -> StateBytes:
    """The planner's bytes for this rank (its place in ``tp`` and in ``dp_shard``)."""
    optimizer = dataclasses.replace(OPTIMIZER, use_distributed_optimizer=zero1)
    shard_rank = dims.dp_rank % dims.dp_shard
    return state_bytes(model_cfg, optimizer, dims, tp_rank=dims.tp_rank, shard_rank=shard_rank)


def one_layout_state(model_cfg: ModelConfig, dims: ParallelDims, zero1: bool) -> dict[str, list[int]]:
    """Measured and planned (params, grads, optimizer) bytes of this rank after one training step."""
    model, optimizer = build(model_cfg, dims, zero1=zero1)
    train_step(model, optimizer, batch(model_cfg, 1, 16, seed=dims.dp_rank))
    measured, planned = measured_state(model, optimizer), planned_state(model_cfg, dims, zero1)
    return {"measured": [measured.params, measured.grads, measured.optimizer],
            "planned": [planned.params, planned.grads, planned.optimizer]}


def _state_worker(rank: int, world: int, model_cfg: ModelConfig, names: list[str]) -> dict:
    out = {}
    for name in names:
        _, kwargs, zero1 = LAYOUTS[name]
        dims = with_mesh(plan_layout(TRAIN, world, rank, **kwargs), "cpu")
        out[name] = one_layout_state(model_cfg, dims, zero1)
    return out


def state_figures(model_cfg: ModelConfig = MODEL, layouts: Sequence[str] = tuple(LAYOUTS)) -> dict[str, Stat]:
    """Per-rank state of each layout ÷ one native process; min and max are over the layout's ranks."""
    one = one_layout_state(model_cfg, single_process(), zero1=False)
    one_measured, one_planned = sum(one["measured"]), sum(one["planned"])
    errors = [abs(m - p) for m, p in zip(one["measured"], one["planned"])]
    results = {"engine_params": Stat.of([one["measured"][0] / 4], "parameters"),  # fp32
               "engine_state_1_process_mib": Stat.of([one_measured / MIB], "MiB")}
    for world in sorted({LAYOUTS[name][0] for name in layouts}):
        names = [name for name in layouts if LAYOUTS[name][0] == world]
        by_rank = spawn(_state_worker, world, model_cfg, names)
        for name in names:
            ranks = [r[name] for r in by_rank]
            measured = [sum(r["measured"]) / one_measured for r in ranks]
            results[f"engine_state_{name}_vs_1"] = Stat.of(measured, "ratio")
            planned = [sum(r["planned"]) / one_planned for r in ranks]
            results[f"engine_state_{name}_planned_vs_1"] = Stat.of(planned, "ratio")
            errors += [abs(m - p) for r in ranks for m, p in zip(r["measured"], r["planned"])]
    # Largest |planned - measured| over every layout, rank and part (params, grads, optimizer state).
    results["engine_state_planner_error_bytes"] = Stat.of([max(errors)], "bytes")
    return results


def _step_worker(rank: int, world: int, model_cfg: ModelConfig, micro_batch: int, repeats: int) -> dict:
    """Round-robin steps of FSDP2, native ZeRO-1 and (rank 0 alone) one native process; seconds each."""
    train = TrainingConfig(train_iters=1, global_batch_size=world * micro_batch, micro_batch_size=micro_batch)
    tokens = batch(model_cfg, micro_batch, model_cfg.seq_length, seed=rank)
    engines = {"fsdp2": build(model_cfg, with_mesh(plan_layout(train, world, rank, fsdp=True), "cpu")),
               "zero1": build(model_cfg, with_mesh(plan_layout(train, world, rank), "cpu"), zero1=True)}
    cases: dict[str, Callable[[], None]] = {name: partial(train_step, *built, tokens)
                                            for name, built in engines.items()}
    single = build(model_cfg, single_process()) if rank == 0 else None
    cases["single"] = partial(train_step, *single, tokens) if single else lambda: None  # rank 1 waits
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):  # the first round warms up
        for name, fn in cases.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            if name != "single":
                dist.barrier()  # the step of the slower rank
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def step_figures(repeats: int, model_cfg: ModelConfig = MODEL, micro_batch: int = 1) -> dict[str, Stat]:
    """Median ms of one training step, 2 ranks × 1 thread, FSDP2 and native ZeRO-1 side by side."""
    times = spawn(_step_worker, 2, model_cfg, micro_batch, repeats)[0]
    return {"engine_step_fsdp2_2_ranks_ms": Stat.of([t * 1e3 for t in times["fsdp2"]], "ms"),
            "engine_step_zero1_2_ranks_ms": Stat.of([t * 1e3 for t in times["zero1"]], "ms"),
            "engine_step_1_process_ms": Stat.of([t * 1e3 for t in times["single"]], "ms"),
            "engine_step_fsdp2_vs_zero1": ratios(times["fsdp2"], times["zero1"])}


def loss_peak_child(tokens: int, hidden: int, vocab: int, chunk_size: int) -> int:
    """Run in a fresh process: peak RSS bytes of the loss's forward + backward above its inputs.

    Linux only: writing 5 to ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current RSS,
    so what the inputs' set-up or ``import torch`` once touched does not count.
    """
    from anneal.model.loss import linear_cross_entropy

    torch.set_num_threads(os.cpu_count() or 1)  # no timing here: use the whole machine
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen).mul_(0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    linear_cross_entropy(h[:8].detach(), w.detach()[:64], labels[:8] % 64, chunk_size)  # kernels' set-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    linear_cross_entropy(h, w, labels, chunk_size).backward()
    return (_status_kib("VmHWM") - base) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def _loss_peak(shape: tuple[int, int, int], chunk_size: int) -> float:
    code = f"from anneal.bench.engine import loss_peak_child; print(loss_peak_child(*{shape}, {chunk_size}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def loss_figures(repeats: int, shape: tuple[int, int, int] = LOSS_SHAPE,
                 chunk_size: int = LOSS_CHUNK) -> dict[str, Stat]:
    """Peak memory of ``linear_cross_entropy`` plain and chunked, alternated in fresh processes (Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {}
    plain, chunked = [], []
    for _ in range(repeats):
        plain.append(_loss_peak(shape, 0))
        chunked.append(_loss_peak(shape, chunk_size))
    tokens, _, vocab = shape
    planner_model = ModelConfig(vocab_size=vocab, seq_length=tokens)
    return {"loss_peak_plain_mib": Stat.of([b / MIB for b in plain], "MiB"),
            "loss_peak_chunked_mib": Stat.of([b / MIB for b in chunked], "MiB"),
            "loss_peak_chunked_vs_plain": ratios(chunked, plain),
            "loss_peak_plain_planned_mib": Stat.of([logits_bytes(planner_model, 1, 0) / MIB], "MiB"),
            "loss_peak_chunked_planned_mib": Stat.of([logits_bytes(planner_model, 1, chunk_size) / MIB],
                                                     "MiB")}


def spawn(fn: Callable[..., dict], world: int, *args) -> list[dict]:
    """``fn(rank, world, *args)`` in ``world`` gloo processes of one thread each; the dict of each rank."""
    import torch.multiprocessing as mp

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # PLATFORM.md: more threads than cores makes every rank crawl
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank")
            mp.start_processes(_entry, args=(fn, world, free_port(), out, args), nprocs=world,
                               start_method="spawn")
            return [json.loads(open(f"{out}.{rank}").read()) for rank in range(world)]
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _entry(rank: int, fn: Callable[..., dict], world: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = fn(rank, world, *args)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()  # PLATFORM.md: gloo can crash at interpreter exit; this sequence never did
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
