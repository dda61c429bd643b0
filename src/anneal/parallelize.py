"""Apply the layout to a built model on PyTorch's engine: tensor parallel, ``torch.compile``, FSDP2.

The order is torchtitan's: tensor parallel first (DTensor over the ``tp`` mesh), then compile each
transformer block, then ``fully_shard`` each block and the root over the data-parallel mesh (HSDP
when it has a replicate dimension).

- **Tensor parallel** (``model.tensor_model_parallel_size``): q/k/v and gate/up column-wise, o and
  down row-wise, so each rank holds heads / TP query heads and query groups / TP key-value heads
  (grouped-query attention splits as a whole) and ffn / TP of the MLP; one all-reduce after
  attention and one after the MLP. The embedding, the output layer and every norm are replicated:
  the loss is then the plain (or chunked) cross-entropy on every TP rank, with no vocab-parallel
  collective (README: Scaling gives the measured cost). The per-head q/k norms see only this rank's
  heads, so their gradients are partial sums: ``tp_partial_parameters`` names them and the
  optimizer sums them over the ``tp`` group before anything reads a gradient.
- **FSDP2**: parameters stay fp32 and sharded (they are the optimizer's master weights); forward
  and backward gather them in ``param_dtype`` (bf16/fp16, or fp32) and gradients are reduced in
  fp32, as torchtitan's ``MixedPrecisionPolicy``. ``reshard_after_forward`` frees the gathered
  parameters of a block after its forward (ZeRO-3) or keeps them until backward (ZeRO-2-like).
- **compile** (``compile.enable``): each block's forward is compiled in place (names unchanged, so
  checkpoints do not see it), traced at the first forward, after the optimizer exists; on the
  native engine that is after the flat buffers rebound the parameters, which is what it needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from anneal.config.model import ModelConfig
from anneal.model.qwen3 import DecoderLayer, Qwen3Model
from anneal.parallel import COLWISE, ROWWISE, TP_PARTIAL, ParallelDims


def build_parallel_model(cfg: ModelConfig, dims: ParallelDims, *, device: torch.device, param_dtype: torch.dtype,
                         reshard_after_forward: bool, compile_backend: str | None = None) -> nn.Module:
    """The model laid out per ``dims``: the one builder of runs, tests and the bench.

    On PyTorch's engine (``dims.fsdp``) it is never whole on a rank: one block at a time is materialised,
    initialised, tensor-parallelised, compiled and sharded (peak: the root's parameters and one block,
    fp32). On the native engine the model stays on the meta device (its blocks compiled): the flat
    optimizer materialises it, block by block, straight into its flat buffers
    (``setup_optimizer(..., device=device)``, through ``deferred_init``), so the model is never whole in
    fp32 beside them. The parts are initialised in ``named_parameters`` order, so the weights equal
    ``build_model``'s under the same seed: every layout starts where a single process does.
    """
    block = functools.partial(_parallelize_block, dims=dims, param_dtype=param_dtype,
                              reshard_after_forward=reshard_after_forward, compile_backend=compile_backend)
    cfg.validate()
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    if not dims.fsdp:
        for layer in model.layers:
            block(layer)
        return model
    for prefix, part in init_parts(model):
        part.to_empty(device=device)
        model.init_weights(prefix)
        if isinstance(part, DecoderLayer):
            block(part)
    _shard_root(model, dims, param_dtype)
    return model


def init_parts(model: Qwen3Model) -> list[tuple[str, nn.Module]]:
    """(name prefix, module) of the parts initialised one at a time, in ``named_parameters`` order:
    the embedding, each layer, the final norm and the output layer (when not tied)."""
    layers = [(f"layers.{i}.", layer) for i, layer in enumerate(model.layers)]
    tail = [(f"{name}.", getattr(model, name)) for name in ("final_norm", "output_layer")]
    return [("embedding.", model.embedding), *layers, *((p, part) for p, part in tail if part is not None)]


@dataclass(frozen=True)
class MetaBlock:
    """Parameters of a model on the meta device that one ``init`` call initialises, drawing from the RNG as
    the whole model's ``init_weights()`` does at that point."""

    params: tuple[nn.Parameter, ...]
    init: Callable[[], None]

    def materialise(self, device: torch.device) -> None:
        """Give each parameter fp32 storage on ``device`` and initialise it; the Parameter objects stay the
        same (the optimizer's param groups hold them)."""
        for param in self.params:
            storage = torch.empty(param.shape, dtype=torch.float32, device=device)
            torch.utils.swap_tensors(param, nn.Parameter(storage, requires_grad=param.requires_grad))
        self.init()


@dataclass(frozen=True)
class DeferredInit:
    """How a model built on the meta device gets its weights: on ``device``, one block at a time."""

    device: torch.device
    blocks: tuple[MetaBlock, ...]

    def materialise(self) -> None:
        """Every block in fp32, each parameter its own tensor: the model ``build_model`` gives."""
        for block in self.blocks:
            block.materialise(self.device)


def deferred_init(model: nn.Module, device: torch.device | None) -> DeferredInit | None:
    """The blocks of ``build_parallel_model``'s native-engine model, still on the meta device; None when the
    model already has its weights."""
    named = list(model.named_parameters())
    if not any(p.is_meta for _, p in named):
        return None
    if device is None:
        raise ValueError("the model is on the meta device (build_parallel_model, native engine): "
                         "pass the device to materialise it on (setup_optimizer(..., device=...))")
    blocks = [MetaBlock(tuple(p for name, p in named if name.startswith(prefix)),
                        functools.partial(model.init_weights, prefix)) for prefix, _ in init_parts(model)]
    return DeferredInit(torch.device(device), tuple(blocks))


def _parallelize_block(layer: nn.Module, dims: ParallelDims, *, param_dtype: torch.dtype,
                       reshard_after_forward: bool, compile_backend: str | None) -> None:
    """Tensor parallel, compile, then FSDP2, on one transformer block (torchtitan's order)."""
    if dims.tp_size > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {name: ColwiseParallel() for name in COLWISE} | {name: RowwiseParallel() for name in ROWWISE}
        parallelize_module(layer, dims.tp_mesh, plan)
    if compile_backend is not None:
        layer.compile(backend=compile_backend)
    if dims.fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(layer, mesh=dims.fsdp_mesh, mp_policy=_policy(param_dtype),
                    reshard_after_forward=reshard_after_forward)


def _shard_root(model: nn.Module, dims: ParallelDims, param_dtype: torch.dtype) -> None:
    from torch.distributed.fsdp import fully_shard

    # The root (embedding, final norm, output layer) is gathered for the whole step: its parameters are
    # used first and last, so resharding them after forward would only gather them twice.
    fully_shard(model, mesh=dims.fsdp_mesh, mp_policy=_policy(param_dtype), reshard_after_forward=False)


def _policy(param_dtype: torch.dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def tp_partial_parameters(model: nn.Module, dims: ParallelDims) -> list[nn.Parameter]:
    """Parameters whose gradient each tensor-parallel rank holds only a part of (sum over ``tp``)."""
    if dims.tp_size == 1:
        return []
    return [p for name, p in model.named_parameters() if name.endswith(TP_PARTIAL)]


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor ``full`` into ``param``, which may be a DTensor shard of any placement.

    Every rank passes the same ``full``: it becomes a replicated DTensor and is redistributed to the
    parameter's placements, a local slice with no communication (also FSDP2's strided shards over TP).
    """
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    mesh = param.device_mesh
    whole = DTensor.from_local(full.to(param.dtype), mesh, [Replicate()] * mesh.ndim, run_check=False)
    param.to_local().copy_(whole.redistribute(mesh, param.placements).to_local())
