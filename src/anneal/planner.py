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
``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` bytes (twice that in fp32). The ``5·a·s/(h·t)`` term is the
attention core's score matrices, stored only when SDPA runs its ``math`` kernel
(``anneal.devices.attention_kernel``); flash and memory-efficient SDPA keep none. Under grouped queries
the memory-efficient kernel (fp32 on CUDA) runs on K and V repeated to every query head (``d`` = head
dim), which it keeps for the backward: ``2·2·s·b·a·d/t`` more bytes per layer (16-bit terms), counted
whole on top of the formula (an upper bound: the grouped K and V they replace are freed). ``selective``
recomputes the attention core, so it drops the scores and the repeated K/V (and saves nothing under
flash); ``full`` keeps each recomputed unit's input (``2·s·b·h``) plus the activations of the unit being
recomputed. The loss holds three fp32 ``[tokens, vocab]`` tensors at its peak
(``12·s·b·v`` bytes; measured on CPU) or three ``[chunk, vocab]`` ones with
``model.cross_entropy_chunk_size``; the output layer is replicated under tensor parallel, so these
are the full vocabulary on every rank. Communication buffers, the transient unsharded gradients of
one block and allocator slack are not counted.

Packed documents (``dataset.reset_attention_mask``, ``anneal.model.documents``) change the attention
kernel (``anneal.devices.document_attention_kernel``) and add what one forward holds once for all layers
(``document_bytes``): on CPU, SDPA's flash kernel keeps no score matrices but keeps the additive
``[b, 1, s, s]`` mask in the attention dtype (``b·s²·2`` bytes in 16-bit, ``b·s²·4`` in fp32); on CUDA,
flex_attention keeps no score matrices either and its ``BlockMask`` is eight int32 tables of
``b·n²`` and ``b·n`` entries, ``n = ⌈s/128⌉`` (measured). ``dataset.reset_position_ids`` gathers the RoPE
tables per row: cos and sin ``[b, 1, s, d]`` in the attention dtype (``2·b·s·d`` values) instead of
``[s, d]``. Under tensor parallel every rank holds them whole (they broadcast over heads).

Building the model has its own peak, before any activation exists (``construction_bytes``): the
native engine builds the model on the meta device and its flat optimizer materialises it block by
block (embedding, each layer, final norm, output layer) straight into its flat parameter buffer and
fp32 master shard, so it holds those two and one block in fp32 (``B`` elements, the largest block):
``2·N + 4·N/dp + 4·B`` bytes under bf16/fp16 with the distributed optimizer, ``6·N + 4·B`` without;
fp32 ``4·N + 4·B``. Gradients and moments come only after, so it stays below the steady state
whenever ``4·B`` is below the gradients' bytes (always with fp32 gradients).
PyTorch's engine builds block by block (``build_parallel_model``): the root's fp32 parameters whole,
every block built so far as its fp32 shard, and one block whole. A rank needs the larger of the two
peaks.

When a rank does not fit, ``smallest_change`` names the first single change, in a fixed order, that
would, else the first pair of them; ``ranks_to_fit`` the fewest ranks on which the config fits as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from anneal.config.container import ConfigContainer, check_world
from anneal.config.model import ModelConfig
from anneal.config.optimizer import OptimizerConfig
from anneal.devices import (Target, attention_kernel, document_attention_kernel, machine_target,
                            planned_target)
from anneal.errors import ConfigError
from anneal.model.flops import flops_per_token, num_parameters
from anneal.parallel import COLWISE, ROWWISE, ParallelDims

MIB, GIB = 1024**2, 1024**3

Shapes = tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) of every parameter, in model order

TENSOR_PARALLEL_SIZES = (2, 4, 8)  # what the advice tries
MAX_RANKS = 4096  # the most ranks ranks_to_fit tries
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
    construction: float = 0  # while the engine builds the model and optimizer (construction_bytes)

    @property
    def peak(self) -> float:
        """The steady state: model states, gathered parameters, one microbatch's activations and logits."""
        return self.states.total + self.gathered + self.activations + self.logits

    @property
    def need(self) -> float:
        """What the rank needs: the larger of the steady and the construction peak."""
        return max(self.peak, self.construction)


@dataclass(frozen=True)
class Estimate:
    """Time on ``world_size`` ranks at a model FLOPs utilisation (the FLOPs of ``flops_per_token``)."""

    world_size: int
    mfu: float
    seconds_per_iteration: float
    seconds: float  # the whole run (the batch ramp included)
    tokens_per_day: float


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
    target: Target | None = None  # what the ranks run on
    kernel: str = "math"  # the attention kernel counted (anneal.devices.attention_kernel)
    shapes: Shapes = field(default=(), compare=False, repr=False)

    def estimate(self, world_size: int, mfu: float) -> Estimate | None:
        """Seconds per iteration, for the run and tokens per day on the target; None without its peak."""
        peak = self.target.peak_flops if self.target else None
        if not peak:
            return None
        rate = world_size * peak * mfu  # model FLOP/s of all ranks together
        per_token = self.flops_per_iteration / self.tokens_per_iteration
        return Estimate(world_size, mfu, self.flops_per_iteration / rate, self.flops_per_run / rate,
                        86400 * rate / per_token)


def bytes_per_parameter(optimizer: OptimizerConfig) -> BytesPerParameter:
    """The native engine's bytes per parameter (Megatron's accounting)."""
    mixed = optimizer.bf16 or optimizer.fp16
    if optimizer.optimizer == "adam":
        moments = 8  # fp32 m and v
    else:
        moments = 4 if optimizer.sgd_momentum else 0  # fp32 momentum buffer
    grads = 2 if mixed and not optimizer.grad_reduce_in_fp32 else 4  # fp32 main grads unless opted out
    return BytesPerParameter(weights=2 if mixed else 4, grads=grads, master=4 if mixed else 0, moments=moments)


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
        low_grads = (optimizer.bf16 or optimizer.fp16) and not optimizer.grad_reduce_in_fp32
        grads = per.grads * n + (4 * owned if low_grads else 0)  # 16-bit grads keep an fp32 copy of the shard
        return StateBytes(per.weights * n, grads, per.state * owned)
    local = sum(math.prod(local_shape(name, shape, dims.tp_size, tp_rank, dims.dp_shard, shard_rank))
                for name, shape in shapes)
    return StateBytes(params=4 * local, grads=4 * local, optimizer=per.moments * local)


def accumulated_grad_bytes(dims: ParallelDims, shapes: Shapes) -> int:
    """FSDP2 reducing once per iteration (``dist.fsdp_grad_sync_each_microbatch=false``): the unsharded fp32
    gradient of this rank's tensor-parallel part, kept across the microbatches before the last."""
    return 4 * sum(math.prod(local_shape(name, shape, dims.tp_size)) for name, shape in shapes)


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
                     granularity: str | None, scores: bool, expanded_kv: bool = False,
                     method: str | None = None, num_layers: int | None = None) -> float:
    """One microbatch's layer activations per rank (Korthikanti et al.) under a recompute setting.

    ``scores``: the attention kernel stores the score matrices (SDPA's math kernel); ``expanded_kv``: it
    keeps K and V repeated to every query head (the memory-efficient kernel under grouped queries). See
    the module.
    """
    s, b, h, t = model.seq_length, micro_batch_size, model.hidden_size, model.tensor_model_parallel_size
    a, d, layers = model.num_attention_heads, model.head_dim, model.num_layers
    scale = 2.0 if not (optimizer.bf16 or optimizer.fp16) else 1.0  # the formula counts 16-bit activations
    kept = s * b * h * (10 + 24 / t) * scale  # all but the attention core (scores, softmax, dropout)
    core = s * b * h * 5 * a * s / (h * t) * scale if scores else 0.0
    core += 2 * (2 * s * b * a * d / t) * scale if expanded_kv else 0.0  # K and V, [b, a/t, s, d] each
    layer = kept + core
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


FLEX_BLOCK = 128  # flex_attention's default sparse block (create_block_mask's BLOCK_SIZE)


def document_bytes(model: ModelConfig, micro_batch_size: int, optimizer: OptimizerConfig, kernel: str, *,
                   reset_position_ids: bool) -> float:
    """What packed documents add to one microbatch's forward, held once for all layers (see the module):
    the document mask as ``kernel`` holds it, and the per-row RoPE tables under ``reset_position_ids``."""
    s, b = model.seq_length, micro_batch_size
    itemsize = 2 if optimizer.bf16 or optimizer.fp16 else 4  # the attention dtype
    blocks = -(-s // FLEX_BLOCK)
    mask = {"sdpa+mask": itemsize * b * s * s,  # additive [b, 1, s, s], kept by SDPA for the backward
            "flex_attention": 4 * (4 * b * blocks * blocks + 4 * b * blocks)}.get(kernel, 0)
    rotary = 2 * b * s * model.head_dim * itemsize if reset_position_ids else 0  # cos, sin [b, 1, s, d]
    return float(mask + rotary)


def precision(optimizer: OptimizerConfig) -> str:
    return "bf16" if optimizer.bf16 else "fp16" if optimizer.fp16 else "fp32"


def kernel_of(cfg: ConfigContainer, device_type: str) -> str:
    """The kernel the config's attention runs on ``device_type`` (cpu or cuda): an SDPA kernel, or under
    ``dataset.reset_attention_mask`` the document kernel (``flex_attention`` or ``sdpa+mask``)."""
    if cfg.dataset.reset_attention_mask:
        return document_attention_kernel(precision(cfg.optimizer), device_type)
    return attention_kernel(precision(cfg.optimizer), device_type)


def kernel_keeps(m: ModelConfig, kernel: str) -> dict[str, bool]:
    """What the attention ``kernel`` keeps for the backward besides q, k, v: the score matrices (math), or
    K and V repeated to every query head (grouped queries on the memory-efficient kernel). The document
    kernels keep neither (their mask: ``document_bytes``)."""
    return {"scores": kernel == "math",
            "expanded_kv": m.num_kv_heads != m.num_attention_heads and kernel == "efficient"}


def working_memory(cfg: ConfigContainer, kernel: str) -> tuple[float, float]:
    """(activations, logits) bytes of one microbatch for the config's recompute, loss and tensor parallel;
    the activations include packed documents' mask and rotary tables (``document_bytes``)."""
    m, b = cfg.model, cfg.train.micro_batch_size
    activations = activation_bytes(m, b, cfg.optimizer, granularity=m.recompute_granularity,
                                   **kernel_keeps(m, kernel), method=m.recompute_method,
                                   num_layers=m.recompute_num_layers)
    activations += document_bytes(m, b, cfg.optimizer, kernel,
                                  reset_position_ids=cfg.dataset.reset_position_ids)
    return activations, logits_bytes(m, b, m.cross_entropy_chunk_size)


def construction_bytes(optimizer: OptimizerConfig, dims: ParallelDims, shapes: Shapes) -> int:
    """A rank's peak while the engine builds the model and the optimizer (see the module's docstring).

    Native: the flat optimizer allocates its parameter buffer (model dtype) and fp32 master shard, then
    materialises the meta-device model into them one block at a time, each in fp32 (``_materialise``);
    its gradients and moments come after, so with fp32 gradients this is at most the steady state.
    PyTorch's engine: ``build_parallel_model`` materialises the root whole and shards it last, and each
    block whole before sharding it.
    """
    blocks = block_elements(shapes)
    if not dims.fsdp:
        n = sum(math.prod(shape) for _, shape in shapes)
        per = bytes_per_parameter(optimizer)
        owned = -(-n // dims.dp_size) if optimizer.use_distributed_optimizer else n
        return per.weights * n + per.master * owned + 4 * max(blocks.values(), default=0)
    root, shards = 0, 0
    for name, shape in shapes:
        if name.startswith("layers."):
            shards += math.prod(local_shape(name, shape, dims.tp_size, 0, dims.dp_shard, 0))
        else:
            root += math.prod(shape)
    largest_layer = max((n for block, n in blocks.items() if block.startswith("layers.")), default=0)
    return 4 * (root + shards + largest_layer)


def block_elements(shapes: Shapes) -> dict[str, int]:
    """Elements of each part the builders initialise one at a time (``anneal.parallelize.init_parts``):
    ``embedding``, ``layers.N``, ``final_norm``, ``output_layer``."""
    blocks: dict[str, int] = {}
    for name, shape in shapes:
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        blocks[block] = blocks.get(block, 0) + math.prod(shape)
    return blocks


def config_layout(cfg: ConfigContainer, world_size: int) -> ParallelDims | None:
    """Rank 0 of the config's layout on ``world_size`` ranks; None when tp × replicas do not divide it."""
    tp, replicate = cfg.model.tensor_model_parallel_size, cfg.dist.data_parallel_replicate_degree
    if world_size % (tp * replicate):
        return None
    return ParallelDims(world_size=world_size, rank=0, dp_size=world_size // tp, dp_rank=0, tp_size=tp,
                        dp_replicate=replicate, fsdp=cfg.torch_engine)


def rank_memory(cfg: ConfigContainer, dims: ParallelDims, shapes: Shapes, kernel: str) -> RankMemory:
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
    states = state_bytes(cfg.model, cfg.optimizer, dims, shapes=shapes)
    if dims.fsdp and (microbatches or 1) > 1 and not cfg.dist.fsdp_grad_sync_each_microbatch:
        states = dataclasses.replace(states, grads=states.grads + accumulated_grad_bytes(dims, shapes))
    return RankMemory(dims, microbatches, states,
                      *working_memory(cfg, kernel), gathered=gathered,
                      construction=construction_bytes(cfg.optimizer, dims, shapes), **native)


def plan(cfg: ConfigContainer, train_samples: int, world_sizes: Sequence[int], *,
         target: Target | None = None, kernel: str | None = None) -> Plan:
    """The plan of ``cfg`` on each world size; ``train_samples`` from ``cfg.validate()`` (the batch ramp).

    ``target``: what the ranks run on (default: ``plan.device``, or this machine); ``kernel``: the
    attention kernel to count (default: the one that runs on the target).
    """
    target = target or planned_target(cfg.plan.device, cfg.dist.device)
    kernel = kernel or kernel_of(cfg, target.kind)
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
        ranks=tuple(rank_memory(cfg, dims, shapes, kernel) for dims in layouts.values() if dims is not None),
        unsplit=tuple(world for world, dims in layouts.items() if dims is None),
        target=target,
        kernel=kernel,
        shapes=shapes,
    )


def check_fits(cfg: ConfigContainer, layout: ParallelDims, device: str, target: Target | None = None) -> None:
    """ConfigError when a rank's peak (steady or while building) exceeds the device's free memory.

    Called by the run with its layout (``anneal.parallel.plan_layout``) before any process group or
    model exists; every rank checks the largest shard. ``target``: this machine's ``device`` unless
    given: a CUDA rank has its device's free memory (``torch.cuda.mem_get_info``), CPU ranks on one
    machine share its ``MemAvailable`` (``LOCAL_WORLD_SIZE`` of them). The attention kernel counted is
    the one that runs there. The message names the smallest change that would fit. The activations
    are Megatron's estimate and buffers are not counted, so a run that passes can still run out of memory.
    """
    target = target or machine_target(device)
    if target.free is None:
        return
    shapes, kernel = parameter_shapes(cfg.model), kernel_of(cfg, target.kind)
    memory = rank_memory(cfg, layout, shapes, kernel)
    if memory.need * target.ranks_here <= target.free:
        return
    where = f"{target.name} has {target.free / GIB:.2f} GiB free ({target.source})"
    raise ConfigError(_does_not_fit(cfg, memory, shapes, target, kernel, where))


def _does_not_fit(cfg: ConfigContainer, memory: RankMemory, shapes: Shapes, target: Target, kernel: str,
                  where: str) -> str:
    dims, b = memory.dims, bytes_per_parameter(cfg.optimizer)
    if dims.fsdp:
        per = f"4+4+{b.moments} B per element of the rank's shard, {dims.describe()}"
    else:
        distributed = cfg.optimizer.use_distributed_optimizer
        per = f"{b.weights}+{b.grads}+{b.state} B per parameter" + (
            f", the state sharded over {dims.dp_size} ranks" if distributed else "")
    gathered = f" and FSDP2's gathered parameters {memory.gathered / GIB:.2f} GiB" if memory.gathered else ""
    ranks = f" × {target.ranks_here} ranks on this machine" if target.ranks_here > 1 else ""
    parameters = sum(math.prod(shape) for _, shape in shapes)
    building = memory.construction > memory.peak
    build = f" (building the model: {memory.construction / GIB:.2f} GiB)" if building else ""
    return (f"model ({parameters:,} parameters) does not fit: weights, grads and optimizer state need "
            f"{memory.states.total / GIB:.2f} GiB per rank{ranks} ({per}), one microbatch's activations and "
            f"logits {(memory.activations + memory.logits) / GIB:.2f} GiB{gathered}, "
            f"{memory.peak / GIB:.2f} GiB in all{build}, but {where}; "
            + advice(cfg, dims.world_size, shapes, target.free / target.ranks_here, kernel))


def advice(cfg: ConfigContainer, world_size: int, shapes: Shapes, room: float, kernel: str) -> str:
    """The smallest change under which rank 0 fits in ``room`` bytes, and the fewest ranks as it is."""
    found = smallest_change(cfg, world_size, shapes, room, kernel)
    ranks = ranks_to_fit(cfg, world_size, shapes, room, kernel)
    more = f"as configured it fits on {_ranks(ranks)}" if ranks else ""
    if found is not None:
        override, memory = found
        fits = f"it fits with {override} ({memory.need / GIB:.2f} GiB per rank)"
        return f"{fits}; {more}" if more else fits
    return (f"no single change or pair of recompute, loss chunking, optimizer sharding, FSDP2 or tensor "
            f"parallel fits on {_ranks(world_size)}: "
            + (more or "pick a smaller model or a device with more memory"))


def smallest_change(cfg: ConfigContainer, world_size: int, shapes: Shapes, room: float,
                    kernel: str) -> tuple[str, RankMemory] | None:
    """The first single change (``candidates``' order), else the first pair, under which rank 0 needs at
    most ``room`` bytes: (command-line overrides, rank 0's memory), or None."""
    singles = list(candidates(cfg, world_size))
    pairs = ((f"{first} {second}", both) for first, changed in singles
             for second, both in candidates(changed, world_size) if second not in first)
    for override, changed in (*singles, *pairs):
        dims = config_layout(changed, world_size)
        if dims is None:
            continue
        memory = rank_memory(changed, dims, shapes, kernel)
        if memory.need <= room:
            return override, memory
    return None


def ranks_to_fit(cfg: ConfigContainer, world_size: int, shapes: Shapes, room: float,
                 kernel: str) -> int | None:
    """The fewest ranks, a power-of-two multiple of the layout's, above ``world_size`` on which rank 0 of
    the config as it is needs at most ``room`` bytes (up to ``MAX_RANKS``), or None."""
    unit = cfg.model.tensor_model_parallel_size * cfg.dist.data_parallel_replicate_degree
    world = unit
    while world <= MAX_RANKS:
        dims = config_layout(cfg, world)
        memory = rank_memory(cfg, dims, shapes, kernel) if world > world_size and dims is not None else None
        if memory is not None and memory.microbatches is not None and memory.need <= room:
            return world
        world *= 2
    return None


def candidates(cfg: ConfigContainer, world_size: int) -> Iterator[tuple[str, ConfigContainer]]:
    """Single changes that save memory, cheapest first, as (command-line overrides, changed config)."""
    m, fsdp = cfg.model, cfg.torch_engine
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
    synced = "dist.fsdp_grad_sync_each_microbatch=true"  # no unsharded gradient kept across microbatches
    if world_size > 1 and not fsdp:
        yield engine, _with(cfg, **TORCH_ENGINE)
        if not cfg.dist.fsdp_grad_sync_each_microbatch:
            lean = {**TORCH_ENGINE["dist"], "fsdp_grad_sync_each_microbatch": True}
            yield f"{engine} {synced}", _with(cfg, dist=lean, optimizer=TORCH_ENGINE["optimizer"])
    if fsdp and not cfg.dist.fsdp_grad_sync_each_microbatch:
        yield synced, _with(cfg, dist={"fsdp_grad_sync_each_microbatch": True})
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


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"
