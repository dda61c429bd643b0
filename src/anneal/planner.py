"""The dry run's resource plan: parameters, per-rank memory under the config's layout, FLOPs and tokens.

The parameter shapes come from the real model built on the meta device (shapes only, nothing
allocated). A rank's model state depends on the engine (``anneal.parallel``):

- anneal's native one, Megatron's accounting per parameter::

      mixed precision (bf16/fp16): 2 B weights + 4 B fp32 main grads + 4 B fp32 master weights + Adam 8 B
      fp32:                        4 B weights + 4 B grads + Adam 8 B

  The distributed optimizer shards the optimizer state (master weights and Adam's m and v) over the
  data-parallel ranks, so with it a rank holds ``weights + grads + state / dp`` (Megatron: 6 + 12/dp
  bytes per parameter under bf16, against 18).
- PyTorch's (``dist.use_torch_fsdp2``): each tensor is this rank's shard (``local_shape``: tensor
  parallel's split, then FSDP2's ``torch.chunk`` on dim 0), held as fp32 parameters (4 B), fp32
  gradients (4 B) and Adam's m and v (8 B) or SGD's momentum (4 B); the parameters are the master
  weights, so there is no other copy. The bf16/fp16 copy exists only as FSDP2's gathered parameters:
  the root's (embedding, final norm, output layer) for the whole step plus two blocks (the one running
  and the one prefetched), or every block with ``dist.fsdp_reshard_after_forward=false``.

On top comes one microbatch's working memory (``b`` = micro batch, ``s`` = seq, ``h`` = hidden,
``a`` = heads, ``t`` = tensor parallel, ``L`` = layers, ``v`` = vocab). Activations follow
Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (Megatron's
accounting, tensor parallel without sequence parallel), per layer in 16-bit
``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` bytes (twice that in fp32): ``selective`` recompute drops the
attention-core term; ``full`` keeps each recomputed unit's input (``2·s·b·h``) plus the activations
of the unit being recomputed. The loss holds three fp32 ``[tokens, vocab]`` tensors at its peak
(``12·s·b·v`` bytes; measured on CPU) or three ``[chunk, vocab]`` ones with
``model.cross_entropy_chunk_size``; the output layer is replicated under tensor parallel, so these
are the full vocabulary on every rank. Communication buffers, the transient unsharded gradients of
one block and allocator slack are not counted.

When a rank does not fit, ``check_fits`` names the first single change, in a fixed order, that would.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from anneal.config.container import ConfigContainer, check_world
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.errors import ConfigError
from anneal.model.flops import flops_per_token, num_parameters
from anneal.parallel import COLWISE, ROWWISE, ParallelDims

MEMINFO = "/proc/meminfo"

MIB, GIB = 1024**2, 1024**3

Shapes = tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) of every parameter, in model order

TENSOR_PARALLEL_SIZES = (2, 4, 8)  # what the advice tries
TORCH_ENGINE = {"dist": {"use_torch_fsdp2": True}, "optimizer": {"use_distributed_optimizer": False}}


@dataclass(frozen=True)
class BytesPerParameter:
    weights: int
    grads: int
    master: int  # fp32 copy of the weights kept by the native optimizer (mixed precision only)
    moments: int  # Adam's m and v, or SGD's momentum buffer

    @property
    def state(self) -> int:
        """Optimizer state, the part the distributed optimizer shards."""
        return self.master + self.moments


@dataclass(frozen=True)
class StateBytes:
    """One rank's resident model state in bytes."""

    params: int
    grads: int
    optimizer: int  # moments, plus the native engine's fp32 master weights

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass(frozen=True)
class RankMemory:
    """Rank 0's memory (the largest shard) under a layout."""

    dims: ParallelDims
    microbatches: int | None  # per iteration and rank; None when the batch does not split over dp
    states: StateBytes  # under the config's engine and optimizer
    activations: float  # one microbatch's layer activations under the model's recompute setting
    logits: float  # the loss's fp32 logits at its peak (plain or chunked)
    gathered: int = 0  # FSDP2's gathered compute copies held at once (PyTorch's engine)
    replicated: StateBytes | None = None  # native engine: without the distributed optimizer
    sharded: StateBytes | None = None  # native engine: with it

    @property
    def peak(self) -> float:
        """Model states plus gathered parameters plus one microbatch's activations and logits."""
        return self.states.total + self.gathered + self.activations + self.logits


@dataclass(frozen=True)
class Plan:
    parameters: int  # counted on the meta-device model
    analytic_parameters: int  # anneal.model.flops.num_parameters
    tokens_per_iteration: int
    flops_per_iteration: float
    flops_per_run: float
    bytes_per_parameter: BytesPerParameter
    ranks: tuple[RankMemory, ...]
    unsplit: tuple[int, ...] = ()  # world sizes the config's tensor parallel and replicas do not divide
    shapes: Shapes = field(default=(), compare=False, repr=False)


def bytes_per_parameter(optimizer: OptimizerConfig) -> BytesPerParameter:
    """The native engine's bytes per parameter (Megatron's accounting)."""
    mixed = optimizer.bf16 or optimizer.fp16
    if optimizer.optimizer == "adam":
        moments = 8  # fp32 m and v
    else:
        moments = 4 if optimizer.sgd_momentum else 0  # fp32 momentum buffer
    return BytesPerParameter(weights=2 if mixed else 4, grads=4, master=4 if mixed else 0, moments=moments)


def parameter_shapes(model: ModelConfig) -> Shapes:
    """(name, shape) of every parameter of ``build_model(model)``, built on the meta device: no memory."""
    from anneal.model.qwen3 import build_model

    return tuple((name, tuple(p.shape)) for name, p in build_model(model, device="meta").named_parameters())


def meta_parameter_count(model: ModelConfig) -> int:
    """Parameters of ``build_model(model)``, built on the meta device."""
    return sum(math.prod(shape) for _, shape in parameter_shapes(model))


def _chunk(n: int, parts: int, index: int) -> int:
    """Rows in part ``index`` of ``torch.chunk`` over ``n``: ``ceil(n / parts)``, fewer or 0 at the end."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def tensor_parallel_dim(name: str) -> int | None:
    """The dim tensor parallel splits parameter ``name`` on: 0 column-wise, 1 row-wise, None replicated."""
    if not name.startswith("layers.") or not name.endswith(".weight"):
        return None
    block = name.split(".", 2)[2].removesuffix(".weight")  # layers.3.mlp.up_proj.weight -> mlp.up_proj
    return 0 if block in COLWISE else 1 if block in ROWWISE else None


def local_shape(name: str, shape: Sequence[int], tp: int = 1, tp_rank: int = 0, dp_shard: int = 1,
                shard_rank: int = 0) -> tuple[int, ...]:
    """Parameter ``name``'s shape on one rank of PyTorch's engine: tensor parallel's split, then FSDP2's.

    Tensor parallel splits q/k/v and gate/up on dim 0, o and down on dim 1, into ``tp`` parts and keeps
    everything else whole; FSDP2 then chunks the tensor-parallel part on dim 0 over ``dp_shard`` ranks.
    Both follow ``torch.chunk``: parts of ``ceil(n / parts)`` rows, the last ones shorter or empty.
    """
    local = list(shape)
    dim = tensor_parallel_dim(name) if tp > 1 else None
    if dim is not None:
        local[dim] = _chunk(local[dim], tp, tp_rank)
    local[0] = _chunk(local[0], dp_shard, shard_rank)
    return tuple(local)


def state_bytes(model: ModelConfig, optimizer: OptimizerConfig, dims: ParallelDims, *, tp_rank: int = 0,
                shard_rank: int = 0, shapes: Shapes | None = None) -> StateBytes:
    """One rank's parameters, gradients and optimizer state, per parameter from the model's real shapes.

    ``tp_rank`` and ``shard_rank`` (the rank in ``dims.dp_shard``) place the rank on PyTorch's engine;
    rank 0 holds the largest shard. The native engine keeps every tensor whole, and with the
    distributed optimizer a ``ceil(N / dp)`` slice of the flat state buffer on every rank (padded).
    ``shapes`` (``parameter_shapes(model)``) saves building the model again.
    """
    shapes = parameter_shapes(model) if shapes is None else shapes
    per = bytes_per_parameter(optimizer)
    if not dims.fsdp:
        n = sum(math.prod(shape) for _, shape in shapes)
        owned = -(-n // dims.dp_size) if optimizer.use_distributed_optimizer else n
        return StateBytes(per.weights * n, per.grads * n, per.state * owned)
    local = sum(math.prod(local_shape(name, shape, dims.tp_size, tp_rank, dims.dp_shard, shard_rank))
                for name, shape in shapes)
    return StateBytes(params=4 * local, grads=4 * local, optimizer=per.moments * local)


def gathered_bytes(optimizer: OptimizerConfig, dims: ParallelDims, shapes: Shapes, *,
                   reshard_after_forward: bool) -> int:
    """FSDP2's gathered compute copies held at once: the root's parameters, plus two blocks or every block.

    The root (embedding, final norm, output layer) stays gathered for the whole step; with
    ``reshard_after_forward`` a block's are freed after its forward, so at most the running block and
    the prefetched one are held, otherwise every block's are held from forward to backward.
    """
    if not dims.fsdp:
        return 0
    size = 2 if optimizer.bf16 or optimizer.fp16 else 4
    root, blocks = 0, {}
    for name, shape in shapes:
        elements = math.prod(local_shape(name, shape, dims.tp_size))
        if name.startswith("layers."):
            block = name.split(".")[1]
            blocks[block] = blocks.get(block, 0) + elements
        else:
            root += elements
    held = min(2, len(blocks)) if reshard_after_forward else len(blocks)
    return size * (root + held * max(blocks.values(), default=0))


def activation_bytes(model: ModelConfig, micro_batch_size: int, optimizer: OptimizerConfig, *,
                     granularity: str | None, method: str | None = None,
                     num_layers: int | None = None) -> float:
    """One microbatch's layer activations per rank (Korthikanti et al.) under a recompute setting."""
    s, b, h, t = model.seq_length, micro_batch_size, model.hidden_size, model.tensor_model_parallel_size
    a, layers = model.num_attention_heads, model.num_layers
    scale = 2.0 if not (optimizer.bf16 or optimizer.fp16) else 1.0  # the formula counts 16-bit activations
    kept = s * b * h * (10 + 24 / t) * scale  # all but the attention core (scores, softmax, dropout)
    layer = kept + s * b * h * 5 * a * s / (h * t) * scale
    if granularity == "selective":
        return layers * kept
    if granularity != "full":
        return layers * layer
    block_input, n = 2 * s * b * h * scale, num_layers or layers  # replicated over tp (no sequence parallel)
    if method == "uniform":
        return math.ceil(layers / n) * block_input + n * layer  # unit inputs + the unit being recomputed
    return n * block_input + max(layers - n, 1) * layer  # block: the first n recomputed, the rest kept


def logits_bytes(model: ModelConfig, micro_batch_size: int, chunk_size: int) -> float:
    """The loss's peak: three fp32 [tokens, vocab] tensors, or [chunk, vocab] ones when chunked."""
    tokens = model.seq_length * micro_batch_size
    return 12.0 * (min(chunk_size, tokens) if chunk_size > 0 else tokens) * model.vocab_size


def working_memory(cfg: ConfigContainer) -> tuple[float, float]:
    """(activations, logits) bytes of one microbatch for the config's recompute, loss and tensor parallel."""
    m, b = cfg.model, cfg.train.micro_batch_size
    activations = activation_bytes(m, b, cfg.optimizer, granularity=m.recompute_granularity,
                                   method=m.recompute_method, num_layers=m.recompute_num_layers)
    return activations, logits_bytes(m, b, m.cross_entropy_chunk_size)


def config_layout(cfg: ConfigContainer, world_size: int) -> ParallelDims | None:
    """Rank 0 of the config's layout on ``world_size`` ranks; None when tp × replicas do not divide it."""
    tp, replicate = cfg.model.tensor_model_parallel_size, cfg.dist.data_parallel_replicate_degree
    if world_size % (tp * replicate):
        return None
    return ParallelDims(world_size=world_size, rank=0, dp_size=world_size // tp, dp_rank=0, tp_size=tp,
                        dp_replicate=replicate, fsdp=cfg.dist.use_torch_fsdp2)


def rank_memory(cfg: ConfigContainer, dims: ParallelDims, shapes: Shapes) -> RankMemory:
    """Rank 0's memory under ``dims`` with the config's engine, optimizer, recompute and loss."""
    try:
        microbatches = check_world(cfg.train, dims.dp_size)
    except ConfigError:
        microbatches = None
    native = {}
    if not dims.fsdp:  # the native table shows both optimizer settings
        for key, sharded in (("replicated", False), ("sharded", True)):
            optimizer = dataclasses.replace(cfg.optimizer, use_distributed_optimizer=sharded)
            native[key] = state_bytes(cfg.model, optimizer, dims, shapes=shapes)
    gathered = gathered_bytes(cfg.optimizer, dims, shapes,
                              reshard_after_forward=cfg.dist.fsdp_reshard_after_forward)
    return RankMemory(dims, microbatches, state_bytes(cfg.model, cfg.optimizer, dims, shapes=shapes),
                      *working_memory(cfg), gathered=gathered, **native)


def plan(cfg: ConfigContainer, train_samples: int, world_sizes: Sequence[int]) -> Plan:
    """The plan of ``cfg`` on each world size; ``train_samples`` from ``cfg.validate()`` (the batch ramp)."""
    shapes = parameter_shapes(cfg.model)
    seq = cfg.model.seq_length
    per_token = flops_per_token(cfg.model)
    tokens = cfg.train.global_batch_size * seq
    layouts = {world: config_layout(cfg, world) for world in world_sizes}
    return Plan(
        parameters=sum(math.prod(shape) for _, shape in shapes),
        analytic_parameters=num_parameters(cfg.model),
        tokens_per_iteration=tokens,
        flops_per_iteration=per_token * tokens,
        flops_per_run=per_token * train_samples * seq,
        bytes_per_parameter=bytes_per_parameter(cfg.optimizer),
        ranks=tuple(rank_memory(cfg, dims, shapes) for dims in layouts.values() if dims is not None),
        unsplit=tuple(world for world, dims in layouts.items() if dims is None),
        shapes=shapes,
    )


def plan_table(p: Plan, cfg: ConfigContainer) -> str:
    """The plan as the dry run prints it, with each world size against this machine's free memory."""
    same = "matches" if p.parameters == p.analytic_parameters else f"differs from ({p.analytic_parameters:,})"
    lines = [
        f"parameters           {p.parameters:,} ({_short(p.parameters)}; meta-device model, {same} "
        "the analytic count)",
        f"tokens / iteration   {p.tokens_per_iteration:,} (global batch {cfg.train.global_batch_size} × "
        f"seq {cfg.model.seq_length})",
        f"FLOPs / iteration    {p.flops_per_iteration:.3e} (forward + backward; "
        f"{p.flops_per_run:.3e} for the run)",
        *(_torch_lines(p, cfg) if cfg.dist.use_torch_fsdp2 else _native_lines(p, cfg)),
        *_fit_lines(p, cfg),
    ]
    return "\n".join(lines)


def _precision(optimizer: OptimizerConfig) -> str:
    return "bf16 mixed" if optimizer.bf16 else "fp16 mixed" if optimizer.fp16 else "fp32"


def _native_lines(p: Plan, cfg: ConfigContainer) -> list[str]:
    b = p.bytes_per_parameter
    distributed = cfg.optimizer.use_distributed_optimizer
    head = ("dp", "microbatches", "weights", "grads", "state", "total", "dist. state", "dist. total", "peak")
    rows = [(str(r.dims.dp_size), _micro(r), r.replicated.params, r.replicated.grads, r.replicated.optimizer,
             r.replicated.total, r.sharded.optimizer, r.sharded.total, r.peak) for r in p.ranks]
    used = ("'dist.' columns (optimizer.use_distributed_optimizer=true)" if distributed
            else "replicated columns (optimizer.use_distributed_optimizer=false)")
    return [
        f"memory per rank, native engine, {_precision(cfg.optimizer)}, {cfg.optimizer.optimizer}: weights "
        f"{b.weights} B + grads {b.grads} B + optimizer state {b.state} B (fp32 master {b.master} + moments "
        f"{b.moments}) per parameter;",
        f"  the distributed optimizer shards the state: {b.weights + b.grads} + {b.state}/dp B per parameter",
        *_working_lines(cfg),
        *_table(head, rows, p.ranks),
        f"  this config uses the {used}",
        "  microbatches: per rank per iteration; n/a: the global batch does not split over dp",
        "  peak: the columns in use plus one microbatch's activations and logits",
    ]


def _torch_lines(p: Plan, cfg: ConfigContainer) -> list[str]:
    moments = p.bytes_per_parameter.moments
    compute = _precision(cfg.optimizer).split()[0]
    reshard = ("plus two blocks (the running and the prefetched one)" if cfg.dist.fsdp_reshard_after_forward
               else "plus every block (dist.fsdp_reshard_after_forward=false)")
    head = ("world", "dp", "shard", "tp", "microbatches", "params", "grads", "optimizer", "gathered",
            "activations", "logits", "peak")
    rows = []
    for r in p.ranks:
        d, s = r.dims, r.states
        rows.append((*map(str, (d.world_size, d.dp_size, d.dp_shard, d.tp_size)), _micro(r),
                     s.params, s.grads, s.optimizer, r.gathered, r.activations, r.logits, r.peak))
    return [
        f"memory per rank, PyTorch's engine (FSDP2), {compute} compute, {cfg.optimizer.optimizer}: fp32 "
        f"params 4 B + fp32 grads 4 B + optimizer state {moments} B per element of the rank's shard "
        "(no master copy);",
        "  tensor parallel splits q/k/v, gate/up on dim 0 and o, down on dim 1 (the rest is replicated), "
        "FSDP2 chunks that on dim 0 over 'shard' ranks (× dp/shard HSDP replicas); rank 0's shard is the "
        "largest",
        f"  gathered: FSDP2's {compute} copies of the root's parameters (embedding, final norm, output "
        f"layer) {reshard}",
        *_working_lines(cfg),
        *_table(head, rows, p.ranks),
        "  microbatches: per rank per iteration; n/a: the global batch does not split over dp",
        "  peak: params + grads + optimizer + gathered + one microbatch's activations and logits",
    ]


def _micro(r: RankMemory) -> str:
    return str(r.microbatches) if r.microbatches is not None else "n/a"


def _table(head: tuple[str, ...], rows: list[tuple], ranks: Sequence[RankMemory]) -> list[str]:
    """Rows of labels then byte counts, right-aligned, in MiB or GiB; a unit line below."""
    unit, size = ("GiB", GIB) if max((r.peak for r in ranks), default=0) >= GIB else ("MiB", MIB)
    cells = [head] + [tuple(x if isinstance(x, str) else f"{x / size:.2f}" for x in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells] + [
        f"  {unit} per rank"]


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
    tp = f", tensor parallel {m.tensor_model_parallel_size}" if m.tensor_model_parallel_size > 1 else ""
    chunk = m.cross_entropy_chunk_size
    loss, other = (f"chunked per {chunk} tokens", 0) if chunk else ("plain", 1024)
    other_name = f"chunked per {other} tokens" if other else "plain"
    return [
        f"activations / microbatch ({mbs} × {m.seq_length} tokens{tp}): {_bytes(activations)} ({setting}); "
        + ", ".join(f"{name} {_bytes(x)}" for name, x in options.items()),
        f"logits / microbatch: {_bytes(logits)} ({loss}); {other_name} {_bytes(logits_bytes(m, mbs, other))}",
    ]


def _fit_lines(p: Plan, cfg: ConfigContainer) -> list[str]:
    """Each world size's peak against this machine's free memory, and what fits when it does not."""
    tp, replicate = cfg.model.tensor_model_parallel_size, cfg.dist.data_parallel_replicate_degree
    lines = [f"world {world}: n/a, model.tensor_model_parallel_size ({tp}) × "
             f"dist.data_parallel_replicate_degree ({replicate}) does not divide it" for world in p.unsplit]
    kind, free, source = free_memory(cfg.dist.device)
    if free is None:
        return lines + [f"free memory: unknown ({source}); not checked"]
    ranks_here = _ranks_here(kind)
    shared = f", shared by {ranks_here} ranks" if ranks_here > 1 else ""
    lines.append(f"free memory: {kind} has {free / GIB:.2f} GiB ({source}){shared}")
    for r in p.ranks:
        verdict = "fits" if r.peak * ranks_here <= free else "does not fit; " + _advice(
            cfg, r.dims.world_size, p.shapes, free / ranks_here)
        lines.append(f"world {r.dims.world_size}: peak {_bytes(r.peak)} per rank, {verdict}")
    return lines


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _short(n: float) -> str:
    """4022468096 -> '4.02B'."""
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def check_fits(cfg: ConfigContainer, layout: ParallelDims, device: str) -> None:
    """ConfigError when a rank's model states plus one microbatch's working memory exceed free memory.

    Called by the run with its layout (``anneal.parallel.plan_layout``) before any process group or
    model exists; every rank checks the largest shard. CPU ranks on one machine share its
    ``MemAvailable`` (``LOCAL_WORLD_SIZE`` of them); a CUDA rank has its device's free memory. The
    message names the first single change that would fit (``smallest_change``). The activations are
    Megatron's estimate and buffers are not counted, so a run that passes can still run out of memory.
    """
    kind, free, source = free_memory(device)
    if free is None:
        return
    shapes = parameter_shapes(cfg.model)
    memory = rank_memory(cfg, layout, shapes)
    ranks_here = _ranks_here(kind)
    if memory.peak * ranks_here <= free:
        return
    where = f"{kind} has {free / GIB:.2f} GiB free ({source})"
    raise ConfigError(_does_not_fit(cfg, memory, shapes, ranks_here, free, where))


def _ranks_here(kind: str) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if kind == "cpu" else 1


def _does_not_fit(cfg: ConfigContainer, memory: RankMemory, shapes: Shapes, ranks_here: int, free: int,
                  where: str) -> str:
    dims, b = memory.dims, bytes_per_parameter(cfg.optimizer)
    if dims.fsdp:
        per = f"4+4+{b.moments} B per element of the rank's shard, {dims.describe()}"
    else:
        distributed = cfg.optimizer.use_distributed_optimizer
        per = f"{b.weights}+{b.grads}+{b.state} B per parameter" + (
            f", the state sharded over {dims.dp_size} ranks" if distributed else "")
    gathered = f" and FSDP2's gathered parameters {memory.gathered / GIB:.2f} GiB" if memory.gathered else ""
    ranks = f" × {ranks_here} ranks on this machine" if ranks_here > 1 else ""
    parameters = sum(math.prod(shape) for _, shape in shapes)
    return (f"model ({parameters:,} parameters) does not fit: weights, grads and optimizer state need "
            f"{memory.states.total / GIB:.2f} GiB per rank{ranks} ({per}), one microbatch's activations and "
            f"logits {(memory.activations + memory.logits) / GIB:.2f} GiB{gathered}, "
            f"{memory.peak / GIB:.2f} GiB in all, but {where}; "
            + _advice(cfg, dims.world_size, shapes, free / ranks_here))


def _advice(cfg: ConfigContainer, world_size: int, shapes: Shapes, room: float) -> str:
    found = smallest_change(cfg, world_size, shapes, room)
    if found is None:
        return (f"no single change of recompute, loss chunking, optimizer sharding, FSDP2 or tensor parallel "
                f"fits on {_ranks(world_size)}: pick a smaller model or run on more ranks")
    override, memory = found
    return f"it fits with {override} ({memory.peak / GIB:.2f} GiB per rank)"


def smallest_change(cfg: ConfigContainer, world_size: int, shapes: Shapes,
                    room: float) -> tuple[str, RankMemory] | None:
    """The first single change (``candidates``' order) under which rank 0 needs at most ``room`` bytes."""
    for override, changed in candidates(cfg, world_size):
        dims = config_layout(changed, world_size)
        if dims is None:
            continue
        memory = rank_memory(changed, dims, shapes)
        if memory.peak <= room:
            return override, memory
    return None


def candidates(cfg: ConfigContainer, world_size: int) -> Iterator[tuple[str, ConfigContainer]]:
    """Single changes that save memory, cheapest first, as (command-line overrides, changed config)."""
    m, fsdp = cfg.model, cfg.dist.use_torch_fsdp2
    if m.recompute_granularity is None:
        yield ("model.recompute_granularity=selective",
               _with(cfg, model={"recompute_granularity": "selective"}))
    if (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) != ("full", "uniform", 1):
        yield ("model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1",
               _with(cfg, model={"recompute_granularity": "full", "recompute_method": "uniform",
                                 "recompute_num_layers": 1}))
    if not m.cross_entropy_chunk_size:
        yield "model.cross_entropy_chunk_size=4096", _with(cfg, model={"cross_entropy_chunk_size": 4096})
    if world_size > 1 and not fsdp and not cfg.optimizer.use_distributed_optimizer:
        yield ("optimizer.use_distributed_optimizer=true",
               _with(cfg, optimizer={"use_distributed_optimizer": True}))
    engine = "" if fsdp else "dist.use_torch_fsdp2=true optimizer.use_distributed_optimizer=false"
    if world_size > 1 and not fsdp:
        yield engine, _with(cfg, **TORCH_ENGINE)
    for tp in TENSOR_PARALLEL_SIZES:
        changed = _with(cfg, model={"tensor_model_parallel_size": tp}, **({} if fsdp else TORCH_ENGINE))
        if tp > m.tensor_model_parallel_size and world_size % tp == 0 and _valid(changed.model):
            yield f"{engine} model.tensor_model_parallel_size={tp}".lstrip(), changed


def _with(cfg: ConfigContainer, **sections: dict) -> ConfigContainer:
    """A copy of ``cfg`` with some fields of some sections replaced (``model={"...": value}``)."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                       for name, fields in sections.items()})


def _valid(model: ModelConfig) -> bool:
    try:
        model.validate()
    except ConfigError:
        return False
    return True


def free_memory(device: str) -> tuple[str, int | None, str]:
    """(cpu or cuda, free bytes or None when unknown, where the figure comes from)."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return "cuda", None, "no CUDA device on this machine"
        index = int(os.environ.get("LOCAL_RANK", "0"))
        free, _ = torch.cuda.mem_get_info(index)
        return "cuda", int(free), f"torch.cuda.mem_get_info on cuda:{index}"
    try:
        with open(MEMINFO) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return "cpu", int(fields["MemAvailable"].split()[0]) * 1024, f"MemAvailable in {MEMINFO}"
    except (OSError, KeyError, ValueError):
        return "cpu", None, MEMINFO
