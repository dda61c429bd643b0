"""NVIDIA Apex's ``DistributedFusedAdam`` behind the ``AnnealOptimizer`` interface (CUDA only).

Apex is imported only inside ``apex_available()`` and ``ApexOptimizer``, and only when CUDA is
present: importing anneal never touches it. (The PyPI package named ``apex`` is unrelated; it
has no ``apex.contrib`` and is reported as unavailable.)

UNTESTED here: written against Apex's current ``DistributedFusedAdam`` API (``grad_sync``,
``unscale_grads``, ``grad_norm``, ``clip_grad_norm``, ``zero_grad`` resetting its grad scale);
the machine that built anneal had neither CUDA nor Apex. Its checkpoints hold each rank's bucket
shards under a per-rank key: they load only on the same number of ranks (Apex's bucketed shard
layout depends on the world size), unlike ``native-zero1``'s, which reshard N -> M.

``grad_reduce_in_fp32`` (the default) sets Apex's ``grad_sync_dtype`` to fp32: its ``_grad_copy``
hook adds each bf16/fp16 ``.grad`` into an fp32 gradient bucket (and frees the ``.grad``), so
microbatches accumulate in fp32, and the reduce-scatter and the shard it accumulates into are fp32.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from anneal.config.optimizer import OptimizerConfig
from anneal.optim.base import StepResult
from anneal.optim.loss_scaler import LossScaler

logger = logging.getLogger(__name__)

_APEX_MODULE = "apex.contrib.optimizers.distributed_fused_adam"


def apex_available() -> bool:
    """True when CUDA is present and Apex's DistributedFusedAdam imports."""
    if not torch.cuda.is_available():
        return False
    try:
        __import__(_APEX_MODULE)
    except (ImportError, OSError, RuntimeError) as exc:  # absent, or a CUDA extension that fails to load
        logger.debug("apex unavailable: %s", exc)
        return False
    return True


def _one_rank_group() -> dist.ProcessGroup:
    """The default group, made here as one NCCL rank on one process: DistributedFusedAdam needs a group
    (``process_group=None`` means the default one, which a single process has not built)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


class ApexOptimizer:
    backend = "apex"

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        config: OptimizerConfig,
        *,
        dtype: torch.dtype,
        loss_scaler: LossScaler | None,
        dp_group: dist.ProcessGroup | None,
    ) -> None:
        from apex.contrib.optimizers.distributed_fused_adam import DistributedFusedAdam

        dp_group = dp_group if dp_group is not None else _one_rank_group()
        self.clip_grad = config.clip_grad
        self.loss_scaler = loss_scaler
        self.num_skipped = 0
        self._opt = DistributedFusedAdam(
            [{k: v for k, v in g.items() if k != "param_names"} for g in param_groups],
            lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
            adam_w_mode=True, weight_decay=config.weight_decay, dtype=torch.float32,
            grad_sync_dtype=torch.float32 if config.grad_reduce_in_fp32 else dtype,
            param_sync_dtype=dtype, process_group=dp_group,
            average_grad_sync=True, overlap_grad_sync=config.overlap_grad_reduce,
            overlap_param_sync=config.overlap_param_gather, store_params=dtype != torch.float32,
        )  # fmt: skip
        self._opt.init_params()  # allocate the bucketed shards now, so state_dict() has its final shapes
        self.param_groups = self._opt.param_groups
        self._rank = dist.get_rank(dp_group) if dist.is_initialized() else 0
        self._world = dist.get_world_size(dp_group) if dist.is_initialized() else 1
        self._rank_key = f"apex_rank{self._rank}_of_{self._world}"

    def describe(self) -> str:
        return f"apex: DistributedFusedAdam over {self._world} ranks (overlap as configured)"

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.loss_scaler is None else loss * self.loss_scaler.scale

    def zero_grad(self) -> None:
        self._opt.zero_grad()  # also resets Apex's deferred grad scale and cached norm

    def step(self) -> StepResult:
        opt = self._opt
        opt.grad_sync()
        if self.loss_scaler is not None:
            opt.unscale_grads(torch.full((), 1.0 / self.loss_scaler.scale, device="cuda"))
        need_norm = self.clip_grad > 0 or self.loss_scaler is not None
        grad_norm = opt.grad_norm() if need_norm else torch.zeros((), device="cuda")
        if self.loss_scaler is not None:
            found_inf = not bool(torch.isfinite(grad_norm))
            self.loss_scaler.update(found_inf)
            if found_inf:
                self.num_skipped += 1
                opt.zero_grad()
                return StepResult(grad_norm, True, self.loss_scaler.scale, self.num_skipped)
        if self.clip_grad > 0:
            opt.clip_grad_norm(self.clip_grad)
        opt.step()
        scale = 1.0 if self.loss_scaler is None else self.loss_scaler.scale
        return StepResult(grad_norm, False, scale, self.num_skipped)

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Copy the model's parameters into Apex's fp32 ``params_shard`` (kept only under bf16/fp16).

        The same copy ``DistributedFusedAdam._init_param_state`` makes at construction, per fragment
        of this rank's shard; under fp32 Apex reads the model's parameters directly.
        """
        opt = self._opt
        for param in (p for group in opt.param_groups for p in group["params"]):
            for fragment in opt.state[param]["fragments"]:
                bucket = opt.state["buckets"][fragment.bucket_id]
                if not fragment.in_local_shard or bucket.params_shard is None:
                    continue
                values = param.detach().view(-1)[slice(*fragment.shard_param_range)]
                bucket.params_shard[slice(*fragment.shard_range)].copy_(values)

    def state_dict(self) -> dict[str, Any]:
        """This rank's Apex shards as tensors under a per-rank key: loads on the same number of ranks."""
        shards = {}
        for i, bucket in enumerate(self._opt.state["buckets"]):
            for name in _BUCKET_TENSORS:
                tensor = getattr(bucket, name, None)
                if tensor is not None:
                    shards[f"bucket{i}_{name}"] = tensor
        state: dict[str, Any] = {self._rank_key: shards, "num_updates": int(self._opt.state["step"])}
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        state["num_skipped"] = self.num_skipped
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._rank_key not in state_dict:
            saved = sorted(k for k in state_dict if k.startswith("apex_rank"))
            raise ValueError(
                f"no apex optimizer state for {self._rank_key} (found {saved}): apex cannot reshard"
            )
        live = self.state_dict()[self._rank_key]
        for key, tensor in state_dict[self._rank_key].items():
            if live[key].data_ptr() != tensor.data_ptr():
                live[key].copy_(tensor)
        self._opt.state["step"] = int(state_dict["num_updates"])
        if self.loss_scaler is not None and "loss_scaler" in state_dict:
            self.loss_scaler.load_state_dict(state_dict["loss_scaler"])
        self.num_skipped = int(state_dict.get("num_skipped", 0))


_BUCKET_TENSORS = ("params_shard", "param_remainders_shard", "exp_avg_shard", "exp_avg_sq_shard")
