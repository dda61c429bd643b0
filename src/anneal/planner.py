"""The dry run's resource plan: parameters, per-rank memory by data-parallel size, FLOPs and tokens.

The parameter count comes from the real model built on the meta device (shapes only, nothing
allocated); memory is the weights, gradients and optimizer state per rank, Megatron's accounting:

    mixed precision (bf16/fp16): 2 B weights + 4 B fp32 main grads + 4 B fp32 master weights + Adam 8 B
    fp32:                        4 B weights + 4 B grads + Adam 8 B

The distributed optimizer shards the optimizer state (master weights and Adam's m and v) over the
data-parallel ranks, so with it a rank holds ``weights + grads + state / dp`` (Megatron: 6 + 12/dp
bytes per parameter under bf16, against 18). Activations, communication buffers and allocator
slack are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from anneal.config.container import ConfigContainer, check_world
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.errors import ConfigError
from anneal.model.flops import flops_per_token, num_parameters

MIB, GIB = 1024**2, 1024**3


@dataclass(frozen=True)
class BytesPerParameter:
    weights: int
    grads: int
    master: int  # fp32 copy of the weights kept by the optimizer (mixed precision only)
    moments: int  # Adam's m and v, or SGD's momentum buffer

    @property
    def state(self) -> int:
        """Optimizer state, the part the distributed optimizer shards."""
        return self.master + self.moments


@dataclass(frozen=True)
class RankMemory:
    data_parallel_size: int
    microbatches: int | None  # per iteration and rank; None when the batch does not split over dp
    weights: float  # bytes
    grads: float
    state: float  # replicated (every rank holds all of it)
    sharded_state: float  # with the distributed optimizer

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.state

    @property
    def sharded_total(self) -> float:
        return self.weights + self.grads + self.sharded_state


@dataclass(frozen=True)
class Plan:
    parameters: int  # counted on the meta-device model
    analytic_parameters: int  # anneal.model.flops.num_parameters
    tokens_per_iteration: int
    flops_per_iteration: float
    flops_per_run: float
    bytes_per_parameter: BytesPerParameter
    ranks: tuple[RankMemory, ...]


def bytes_per_parameter(optimizer: OptimizerConfig) -> BytesPerParameter:
    mixed = optimizer.bf16 or optimizer.fp16
    if optimizer.optimizer == "adam":
        moments = 8  # fp32 m and v
    else:
        moments = 4 if optimizer.sgd_momentum else 0  # fp32 momentum buffer
    return BytesPerParameter(weights=2 if mixed else 4, grads=4, master=4 if mixed else 0, moments=moments)


def meta_parameter_count(model: ModelConfig) -> int:
    """Parameters of ``build_model(model)``, built on the meta device: shapes only, no memory."""
    from anneal.model.qwen3 import build_model

    return sum(p.numel() for p in build_model(model, device="meta").parameters())


def rank_memory(cfg: ConfigContainer, parameters: int, data_parallel_size: int) -> RankMemory:
    per = bytes_per_parameter(cfg.optimizer)
    try:
        microbatches = check_world(cfg.train, data_parallel_size)
    except ConfigError:
        microbatches = None
    state = per.state * parameters
    return RankMemory(data_parallel_size, microbatches, per.weights * parameters, per.grads * parameters,
                      state, state / data_parallel_size)


def plan(cfg: ConfigContainer, train_samples: int, data_parallel_sizes: Sequence[int]) -> Plan:
    """The plan of ``cfg``; ``train_samples`` from ``cfg.validate()`` (it depends on the batch ramp)."""
    parameters = meta_parameter_count(cfg.model)
    seq = cfg.model.seq_length
    per_token = flops_per_token(cfg.model)
    tokens = cfg.train.global_batch_size * seq
    return Plan(
        parameters=parameters,
        analytic_parameters=num_parameters(cfg.model),
        tokens_per_iteration=tokens,
        flops_per_iteration=per_token * tokens,
        flops_per_run=per_token * train_samples * seq,
        bytes_per_parameter=bytes_per_parameter(cfg.optimizer),
        ranks=tuple(rank_memory(cfg, parameters, dp) for dp in data_parallel_sizes),
    )


def plan_table(p: Plan, cfg: ConfigContainer) -> str:
    """The plan as the dry run prints it."""
    b = p.bytes_per_parameter
    same = "matches" if p.parameters == p.analytic_parameters else f"differs from ({p.analytic_parameters:,})"
    precision = "bf16 mixed" if cfg.optimizer.bf16 else "fp16 mixed" if cfg.optimizer.fp16 else "fp32"
    lines = [
        f"parameters           {p.parameters:,} ({_short(p.parameters)}; meta-device model, {same} "
        "the analytic count)",
        f"tokens / iteration   {p.tokens_per_iteration:,} (global batch {cfg.train.global_batch_size} × "
        f"seq {cfg.model.seq_length})",
        f"FLOPs / iteration    {p.flops_per_iteration:.3e} (forward + backward; "
        f"{p.flops_per_run:.3e} for the run)",
        f"memory per rank, {precision}, {cfg.optimizer.optimizer}: weights {b.weights} B + grads {b.grads} B "
        f"+ optimizer state {b.state} B (fp32 master {b.master} + moments {b.moments}) per parameter;",
        f"  the distributed optimizer shards the state: {b.weights + b.grads} + {b.state}/dp B per "
        "parameter; activations not included",
        _memory_rows(p.ranks, cfg.optimizer.use_distributed_optimizer),
    ]
    return "\n".join(lines)


def _memory_rows(ranks: Sequence[RankMemory], distributed: bool) -> str:
    head = ("dp", "microbatches", "weights", "grads", "state", "total", "dist. state", "dist. total")
    unit, size = ("GiB", GIB) if max(r.total for r in ranks) >= GIB else ("MiB", MIB)
    rows = [head]
    for r in ranks:
        micro = str(r.microbatches) if r.microbatches is not None else "n/a"
        sizes = (r.weights, r.grads, r.state, r.total, r.sharded_state, r.sharded_total)
        rows.append((str(r.data_parallel_size), micro, *(f"{x / size:.2f}" for x in sizes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    used = ("'dist.' columns (optimizer.use_distributed_optimizer=true)" if distributed
            else "replicated columns (optimizer.use_distributed_optimizer=false)")
    note = f"  {unit} per rank; this config uses the {used}"
    notes = [note, "  microbatches: per rank per iteration; n/a: the global batch does not split over dp"]
    return "\n".join(lines + notes)


def _short(n: float) -> str:
    """4022468096 -> '4.02B'."""
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)
