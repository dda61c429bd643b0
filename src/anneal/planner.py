"""The dry run's resource plan: parameters, per-rank memory by data-parallel size, FLOPs and tokens.

The parameter count comes from the real model built on the meta device (shapes only, nothing
allocated); memory is the weights, gradients and optimizer state per rank, Megatron's accounting:

    mixed precision (bf16/fp16): 2 B weights + 4 B fp32 main grads + 4 B fp32 master weights + Adam 8 B
    fp32:                        4 B weights + 4 B grads + Adam 8 B

The distributed optimizer shards the optimizer state (master weights and Adam's m and v) over the
data-parallel ranks, so with it a rank holds ``weights + grads + state / dp`` (Megatron: 6 + 12/dp
bytes per parameter under bf16, against 18).

On top comes one microbatch's working memory (``b`` = micro batch, ``s`` = seq, ``h`` = hidden,
``a`` = heads, ``L`` = layers, ``v`` = vocab). Activations follow Korthikanti et al., "Reducing
Activation Recomputation in Large Transformer Models" (Megatron's accounting), per layer in
16-bit ``s·b·h·(34 + 5·a·s/h)`` bytes (twice that in fp32): ``selective`` recompute drops the
``5·a·s/h`` attention-core term; ``full`` keeps each recomputed unit's input (``2·s·b·h``) plus the
activations of the unit being recomputed. The loss holds three fp32 ``[tokens, vocab]`` tensors at
its peak (``12·s·b·v`` bytes; measured on CPU) or three ``[chunk, vocab]`` ones with
``model.cross_entropy_chunk_size``. Communication buffers and allocator slack are not counted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from anneal.config.container import ConfigContainer, check_world
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.errors import ConfigError
from anneal.model.flops import flops_per_token, num_parameters

MEMINFO = "/proc/meminfo"

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
    activations: float = 0.0  # one microbatch's layer activations under the model's recompute setting
    logits: float = 0.0  # the loss's fp32 logits at its peak (plain or chunked)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.state

    @property
    def sharded_total(self) -> float:
        return self.weights + self.grads + self.sharded_state

    def peak(self, distributed: bool) -> float:
        """Model states (sharded or not) plus one microbatch's activations and logits."""
        return (self.sharded_total if distributed else self.total) + self.activations + self.logits


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


def activation_bytes(model: ModelConfig, micro_batch_size: int, optimizer: OptimizerConfig, *,
                     granularity: str | None, method: str | None = None,
                     num_layers: int | None = None) -> float:
    """One microbatch's layer activations (Korthikanti et al.) under a recompute setting."""
    s, b, h = model.seq_length, micro_batch_size, model.hidden_size
    a, layers = model.num_attention_heads, model.num_layers
    scale = 2.0 if not (optimizer.bf16 or optimizer.fp16) else 1.0  # the formula counts 16-bit activations
    layer = s * b * h * (34 + 5 * a * s / h) * scale
    if granularity == "selective":
        return layers * s * b * h * 34 * scale
    if granularity != "full":
        return layers * layer
    block_input, n = 2 * s * b * h * scale, num_layers or layers
    if method == "uniform":
        return math.ceil(layers / n) * block_input + n * layer  # unit inputs + the unit being recomputed
    return n * block_input + max(layers - n, 1) * layer  # block: the first n recomputed, the rest kept


def logits_bytes(model: ModelConfig, micro_batch_size: int, chunk_size: int) -> float:
    """The loss's peak: three fp32 [tokens, vocab] tensors, or [chunk, vocab] ones when chunked."""
    tokens = model.seq_length * micro_batch_size
    return 12.0 * (min(chunk_size, tokens) if chunk_size > 0 else tokens) * model.vocab_size


def working_memory(cfg: ConfigContainer) -> tuple[float, float]:
    """(activations, logits) bytes of one microbatch for the config's recompute and loss settings."""
    m, b = cfg.model, cfg.train.micro_batch_size
    activations = activation_bytes(m, b, cfg.optimizer, granularity=m.recompute_granularity,
                                   method=m.recompute_method, num_layers=m.recompute_num_layers)
    return activations, logits_bytes(m, b, m.cross_entropy_chunk_size)


def rank_memory(cfg: ConfigContainer, parameters: int, data_parallel_size: int) -> RankMemory:
    per = bytes_per_parameter(cfg.optimizer)
    try:
        microbatches = check_world(cfg.train, data_parallel_size)
    except ConfigError:
        microbatches = None
    state = per.state * parameters
    return RankMemory(data_parallel_size, microbatches, per.weights * parameters, per.grads * parameters,
                      state, state / data_parallel_size, *working_memory(cfg))


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
        "parameter",
        *_working_lines(cfg),
        _memory_rows(p.ranks, cfg.optimizer.use_distributed_optimizer),
    ]
    return "\n".join(lines)


def _working_lines(cfg: ConfigContainer) -> list[str]:
    """One microbatch's activations and logits, this config's and the alternatives' (Korthikanti et al.)."""
    m, mbs, opt = cfg.model, cfg.train.micro_batch_size, cfg.optimizer
    activations, logits = working_memory(cfg)
    full = m.recompute_num_layers if m.recompute_granularity == "full" else 1
    setting = (m.recompute_granularity or "no recompute") + (
        f", {m.recompute_method} {full}" if m.recompute_granularity == "full" else "")
    options = {"none": activation_bytes(m, mbs, opt, granularity=None),
               "selective": activation_bytes(m, mbs, opt, granularity="selective"),
               "full uniform 1": activation_bytes(m, mbs, opt, granularity="full", method="uniform",
                                                  num_layers=1)}
    chunk = m.cross_entropy_chunk_size
    loss, other = (f"chunked per {chunk} tokens", 0) if chunk else ("plain", 1024)
    other_name = f"chunked per {other} tokens" if other else "plain"
    return [
        f"activations / microbatch ({mbs} × {m.seq_length} tokens): {_bytes(activations)} ({setting}); "
        + ", ".join(f"{name} {_bytes(x)}" for name, x in options.items()),
        f"logits / microbatch: {_bytes(logits)} ({loss}); {other_name} {_bytes(logits_bytes(m, mbs, other))}",
    ]


def _bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _memory_rows(ranks: Sequence[RankMemory], distributed: bool) -> str:
    head = ("dp", "microbatches", "weights", "grads", "state", "total", "dist. state", "dist. total", "peak")
    unit, size = ("GiB", GIB) if max(r.peak(distributed) for r in ranks) >= GIB else ("MiB", MIB)
    rows = [head]
    for r in ranks:
        micro = str(r.microbatches) if r.microbatches is not None else "n/a"
        sizes = (r.weights, r.grads, r.state, r.total, r.sharded_state, r.sharded_total, r.peak(distributed))
        rows.append((str(r.data_parallel_size), micro, *(f"{x / size:.2f}" for x in sizes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    used = ("'dist.' columns (optimizer.use_distributed_optimizer=true)" if distributed
            else "replicated columns (optimizer.use_distributed_optimizer=false)")
    note = f"  {unit} per rank; this config uses the {used}"
    notes = [note, "  microbatches: per rank per iteration; n/a: the global batch does not split over dp",
             "  peak: the columns in use plus one microbatch's activations and logits"]
    return "\n".join(lines + notes)


def _short(n: float) -> str:
    """4022468096 -> '4.02B'."""
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def check_fits(cfg: ConfigContainer, world_size: int, device: str) -> None:
    """ConfigError when a rank's model states plus one microbatch's activations and logits exceed free memory.

    Called by the run before any process group or model exists, with the layout's data-parallel size.
    CPU ranks on one machine share its ``MemAvailable`` (``LOCAL_WORLD_SIZE`` of them); a CUDA rank has
    its device's free memory. The activations are Megatron's estimate and buffers are not counted, so a
    run that passes can still run out of memory.
    """
    parameters = num_parameters(cfg.model)
    memory = rank_memory(cfg, parameters, world_size)
    distributed = cfg.optimizer.use_distributed_optimizer
    need = memory.peak(distributed)
    kind, free, source = free_memory(device)
    if free is None:
        return
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if kind == "cpu" else 1
    if need * ranks_here <= free:
        return
    raise ConfigError(_does_not_fit(cfg, parameters, memory, world_size, ranks_here,
                                    f"{kind} has {free / GIB:.2f} GiB free ({source})"))


def _does_not_fit(cfg: ConfigContainer, parameters: int, memory: RankMemory, world_size: int, ranks_here: int,
                  free: str) -> str:
    b = bytes_per_parameter(cfg.optimizer)
    distributed = cfg.optimizer.use_distributed_optimizer
    states = memory.sharded_total if distributed else memory.total
    sharded = f", the state sharded over {world_size} ranks" if distributed else ""
    ranks = f" × {ranks_here} ranks on this machine" if ranks_here > 1 else ""
    hints = [] if distributed or world_size == 1 else ["shard the optimizer state "
                                                        "(optimizer.use_distributed_optimizer=true)"]
    if cfg.model.recompute_granularity is None:
        hints.append("recompute activations (model.recompute_granularity)")
    if not cfg.model.cross_entropy_chunk_size:
        hints.append("chunk the loss (model.cross_entropy_chunk_size)")
    working = (memory.activations + memory.logits) / GIB
    return (f"model ({parameters:,} parameters) does not fit: weights, grads and optimizer state need "
            f"{states / GIB:.2f} GiB per rank{ranks} ({b.weights}+{b.grads}+{b.state} B per parameter"
            f"{sharded}) and one microbatch's activations and logits {working:.2f} GiB, "
            f"{memory.peak(distributed) / GIB:.2f} GiB in all, but {free}; pick a smaller model, "
            + "".join(f"{hint}, " for hint in hints) + "or run on more ranks")


def free_memory(device: str) -> tuple[str, int | None, str]:
    """(cpu or cuda, free bytes or None when unknown, where the figure comes from)."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        index = int(os.environ.get("LOCAL_RANK", "0"))
        free, _ = torch.cuda.mem_get_info(index)
        return "cuda", int(free), f"torch.cuda.mem_get_info on cuda:{index}"
    try:
        with open(MEMINFO) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return "cpu", int(fields["MemAvailable"].split()[0]) * 1024, f"MemAvailable in {MEMINFO}"
    except (OSError, KeyError, ValueError):
        return "cpu", None, MEMINFO
