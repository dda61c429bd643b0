"""``setup_optimizer``: optimizer config + scheduler config + model -> (optimizer, scheduler).

Backends (``optimizer.backend`` names what runs; the launcher prints ``optimizer.describe()``):

- ``use_distributed_optimizer=false``: ``torch-adamw-fused`` / ``torch-sgd-fused``: anneal's flat
  optimizer with state replicated on every data-parallel rank (gradients all-reduced in step).
- ``use_distributed_optimizer=true``: ``native-zero1``, the flat optimizer with state and fp32
  masters sharded (ZeRO-1); ``apex`` (Apex's DistributedFusedAdam) only when ``distributed_backend``
  is ``apex``, with CUDA parameters on an NCCL group (or one process). ``auto`` picks native: Apex has
  not yet run under a GPU test here, so it is never chosen silently; when it could run, the start-up
  log says so and names ``optimizer.distributed_backend=apex``.
- PyTorch's engine (a ``layout`` with ``fsdp``, the model already through ``anneal.parallelize``):
  ``fsdp2-adamw`` / ``fsdp2-sgd``, per-parameter state sharded as FSDP2 shards the parameters.

Mixed precision: on the native engine, with ``bf16`` / ``fp16`` this function casts the model's
parameters to that dtype (in place, keeping fp32 master copies inside the optimizer); the caller
does not cast the model. Gradients accumulate and are reduced in fp32 unless
``grad_reduce_in_fp32=false`` (native and Apex). On PyTorch's engine the parameters stay fp32 and
FSDP2 casts its gathered compute copy; its gradients are fp32 whatever ``grad_reduce_in_fp32`` says.

Construction: a native-engine model from ``build_parallel_model`` is still on the meta device; with
``device=`` the flat optimizer materialises it block by block into its buffers (each block initialised
in fp32, so the masters hold the fp32 values), never holding the whole fp32 model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from anneal.config.optimizer import OptimizerConfig
from anneal.errors import ConfigError
from anneal.optim.apex_backend import ApexOptimizer, apex_available
from anneal.optim.base import AnnealOptimizer
from anneal.optim.flat_optimizer import FlatOptimizer
from anneal.optim.fsdp2_optimizer import FSDP2Optimizer
from anneal.optim.loss_scaler import build_loss_scaler
from anneal.optim.param_groups import get_param_groups
from anneal.optim.update_rules import build_update_rule
from anneal.parallel import ParallelDims
from anneal.scheduler import ParamScheduler, Schedule, build_scheduler

if TYPE_CHECKING:
    from anneal.parallelize import DeferredInit

logger = logging.getLogger(__name__)


def setup_optimizer(
    optimizer_config: OptimizerConfig,
    scheduler_config: Any,
    model: torch.nn.Module,
    *,
    schedule: Schedule,
    dp_group: dist.ProcessGroup | None = None,
    resume: Any = None,
    layout: ParallelDims | None = None,
    device: torch.device | None = None,
) -> tuple[AnnealOptimizer, ParamScheduler]:
    """Build the optimizer over ``model``'s parameter groups, then the scheduler that drives it.

    ``scheduler_config`` needs ``override_opt_param_scheduler`` and
    ``use_checkpoint_opt_param_scheduler``; ``schedule`` carries the numbers (in samples);
    ``resume`` (an ``anneal.resume.ResumePlan``) makes a branch or an extension keep them on load;
    ``layout`` (``anneal.parallel``) selects PyTorch's engine when it has ``fsdp``; ``device``: where a
    model still on the meta device (``build_parallel_model`` on the native engine) is materialised.
    """
    optimizer_config.validate()
    groups = get_param_groups(model, optimizer_config, fallback_min_lr=schedule.min_lr)
    dtype = model_dtype(optimizer_config)
    if layout is not None and layout.fsdp:
        optimizer = build_fsdp2_optimizer(optimizer_config, groups, model, layout, dtype)
    else:
        from anneal.parallelize import deferred_init

        init = deferred_init(model, device)
        on_cuda = init.device.type == "cuda" if init is not None else _on_cuda(model)
        backend = select_backend(optimizer_config, on_cuda=on_cuda, group_backend=_group_backend(dp_group))
        _warn_unhonoured(optimizer_config, backend)
        optimizer = build_optimizer(optimizer_config, groups, backend=backend, dtype=dtype, dp_group=dp_group,
                                    init=init)
        _cast_frozen_parameters(model, dtype)  # after: a meta-device model's exist only once built
    scheduler = build_scheduler(optimizer, scheduler_config, schedule,
                                resume_mode=getattr(resume, "resume_mode", None),
                                param_group_bounds=getattr(resume, "param_group_bounds", None))
    logger.info("optimizer: %s", optimizer.describe())
    return optimizer, scheduler


def model_dtype(config: OptimizerConfig) -> torch.dtype:
    if config.bf16:
        return torch.bfloat16
    return torch.float16 if config.fp16 else torch.float32


def select_backend(config: OptimizerConfig, *, on_cuda: bool = False, group_backend: str | None = None) -> str:
    """``replicated``, ``native`` (ZeRO-1) or ``apex``; an explicit ``apex`` that cannot run is an error.

    ``on_cuda``: the parameters are on a CUDA device; ``group_backend``: the data-parallel group's
    backend (``nccl``, ``gloo``), None on one process without a group.
    """
    if not config.use_distributed_optimizer:
        return "replicated"
    choice = config.distributed_backend
    if choice == "apex":
        _check_apex(config, on_cuda, group_backend)
        return "apex"
    if choice == "auto" and config.optimizer == "adam" and on_cuda and group_backend in (None, "nccl") \
            and apex_available():
        logger.info("optimizer: NVIDIA Apex is available; optimizer.distributed_backend=apex runs its "
                    "DistributedFusedAdam (auto keeps native-zero1 until Apex has run under a GPU test)")
    return "native"


def _check_apex(config: OptimizerConfig, on_cuda: bool, group_backend: str | None) -> None:
    field = "optimizer.distributed_backend ('apex')"
    if config.optimizer != "adam":
        raise ConfigError(f"{field} runs only optimizer.optimizer 'adam', not {config.optimizer!r}")
    if not apex_available():
        raise ConfigError(f"{field} needs CUDA and NVIDIA Apex (apex.contrib.optimizers.distributed_fused_adam), "
                          "which are not available here; use 'auto' or 'native'")
    if not on_cuda:
        raise ConfigError(f"{field} needs the parameters on a CUDA device (dist.device), not on the CPU")
    if group_backend not in (None, "nccl"):
        raise ConfigError(f"{field} needs an NCCL process group, not {group_backend!r} (dist.backend)")


def _on_cuda(model: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def _group_backend(dp_group: dist.ProcessGroup | None) -> str | None:
    if dp_group is None and not dist.is_initialized():
        return None
    return str(dist.get_backend(dp_group)).lower()


def build_optimizer(
    config: OptimizerConfig,
    groups: list[dict[str, Any]],
    *,
    backend: str,
    dtype: torch.dtype,
    dp_group: dist.ProcessGroup | None,
    init: DeferredInit | None = None,
) -> AnnealOptimizer:
    """The native-engine optimizer over ``groups``; ``init`` (``anneal.parallelize.deferred_init``) when
    the model is still on the meta device: the flat optimizer builds it into its buffers block by block."""
    loss_scaler = build_loss_scaler(config)
    if backend == "apex":
        if init is not None:  # Apex takes a materialised fp32 model
            init.materialise()
        for group in groups:
            for param in group["params"]:
                param.data = param.data.to(dtype)
        return ApexOptimizer(groups, config, dtype=dtype, loss_scaler=loss_scaler, dp_group=dp_group)
    return FlatOptimizer(
        groups,
        update=build_update_rule(config),
        dtype=dtype,
        clip_grad=config.clip_grad,
        weight_decay=config.weight_decay,
        loss_scaler=loss_scaler,
        dp_group=dp_group,
        sharded=backend == "native",
        grad_reduce_in_fp32=config.grad_reduce_in_fp32,
        init=init,
    )


def build_fsdp2_optimizer(config: OptimizerConfig, groups: list[dict[str, Any]], model: torch.nn.Module,
                          layout: ParallelDims, dtype: torch.dtype) -> FSDP2Optimizer:
    """The optimizer over a model already sharded by ``anneal.parallelize`` (fp32 parameters)."""
    from anneal.parallelize import tp_partial_parameters

    for name in ("overlap_grad_reduce", "overlap_param_gather"):
        if getattr(config, name):
            logger.info("optimizer.%s: FSDP2 overlaps its collectives with compute already", name)
    if dtype != torch.float32 and not config.grad_reduce_in_fp32:
        logger.warning("optimizer.grad_reduce_in_fp32=false is not honoured by FSDP2: its gradients are "
                       "fp32 shards of fp32 parameters, reduced in fp32 (MixedPrecisionPolicy.reduce_dtype)")
    return FSDP2Optimizer(groups, update=build_update_rule(config), clip_grad=config.clip_grad,
                          weight_decay=config.weight_decay, layout=layout.describe(), compute_dtype=dtype,
                          loss_scaler=build_loss_scaler(config), tp_partial=tp_partial_parameters(model, layout),
                          tp_group=layout.tp_mesh.get_group() if layout.tp_size > 1 else None)


def _warn_unhonoured(config: OptimizerConfig, backend: str) -> None:
    """Say once, at start-up, which requested settings this backend does not honour."""
    if backend != "apex":
        for name in ("overlap_grad_reduce", "overlap_param_gather"):
            if getattr(config, name):
                logger.warning(
                    "optimizer.%s=true is not honoured by the %s backend: it reduces gradients and "
                    "gathers parameters inside step(), without overlap",
                    name,
                    "native-zero1" if backend == "native" else "replicated",
                )
    if config.loss_scale is not None and not config.fp16:
        logger.warning("optimizer.loss_scale (%s) is used only with fp16; ignored", config.loss_scale)
    if config.distributed_backend != "auto" and not config.use_distributed_optimizer:
        logger.warning(
            "optimizer.distributed_backend (%r) has no effect without use_distributed_optimizer",
            config.distributed_backend,
        )


def _cast_frozen_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters follow the model dtype too (trainable ones are cast by the optimizer)."""
    if dtype == torch.float32:
        return
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
