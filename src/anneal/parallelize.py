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

import torch
from torch import nn

from anneal.config.model import ModelConfig
from anneal.model.qwen3 import Qwen3Model, build_model
from anneal.parallel import COLWISE, ROWWISE, TP_PARTIAL, ParallelDims



def build_parallel_model(cfg: ModelConfig, dims: ParallelDims, *, device: torch.device, param_dtype: torch.dtype,
                         reshard_after_forward: bool, compile_backend: str | None = None) -> nn.Module:
    """The model laid out per ``dims``: the one builder of runs, tests and the bench.

    On PyTorch's engine (``dims.fsdp``) it is never whole on a rank: one block at a time is materialised,
    initialised, tensor-parallelised, compiled and sharded (peak: the root's parameters and one block,
    fp32). The native engine shards nothing here (its optimizer does): the model is built whole and its
    blocks compiled. The parts are initialised in ``named_parameters`` order, so the weights equal
    ``build_model``'s under the same seed: every layout starts where a single process does.
    """
    block = functools.partial(_parallelize_block, dims=dims, param_dtype=param_dtype,
                              reshard_after_forward=reshard_after_forward, compile_backend=compile_backend)
    if not dims.fsdp:
        model = build_model(cfg, device=device)
        for layer in model.layers:
            block(layer)
        return model
    cfg.validate()
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    _materialise(model, model.embedding, "embedding.", device)
    for i, layer in enumerate(model.layers):
        _materialise(model, layer, f"layers.{i}.", device)
        block(layer)
    for name in ("final_norm", "output_layer"):
        if getattr(model, name) is not None:
            _materialise(model, getattr(model, name), f"{name}.", device)
    _shard_root(model, dims, param_dtype)
    return model


def _materialise(model: nn.Module, part: nn.Module, prefix: str, device: torch.device) -> None:
    part.to_empty(device=device)
    model.init_weights(prefix)


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
