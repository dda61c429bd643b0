"""The optimizer of PyTorch's engine: per-parameter state over FSDP2 / tensor-parallel DTensor shards.

FSDP2 owns what the flat optimizer does by hand on the native engine: the parameters are fp32
shards (the master weights; bf16/fp16 exists only as FSDP2's gathered compute copy), gradients
arrive reduce-scattered and averaged over data parallel, in fp32, once per iteration (the trainer has
FSDP2 reduce in the last microbatch's backward only). This class adds Megatron's
step on top, with the same update kernels (``update_rules``) and the same rules:

- tensor parallel: the gradients of the per-head q/k norms are partial sums on each TP rank
  (``anneal.parallelize.tp_partial_parameters``); they are summed over the ``tp`` group first, all
  of them in one all-reduce;
- the global gradient norm counts every element once: each rank's squared sum of a shard is
  divided by the number of ranks holding that same shard (HSDP replicas, TP for replicated
  tensors), then one all-reduce over all ranks; the per-shard norms are one multi-tensor kernel on
  CUDA (``anneal.optim.norms.l2_norms``);
- fp16: the norm's one host sync finds inf/NaN, the step is skipped and the scale backs off;
- clipping and unscaling are folded into the fused kernel's ``grad_scale`` (Megatron's coefficient).

State is saved per parameter name (``state.<name>.exp_avg``) as DTensors with the parameter's
placements, so ``torch.distributed.checkpoint`` reshards it to any FSDP2/HSDP/TP layout and to one
process; the flat optimizer's state is laid out differently (one buffer), and the checkpointer says
so when a run asks to load one into the other.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from anneal.optim.base import StepResult, grad_scale, overflowed
from anneal.optim.loss_scaler import LossScaler
from anneal.optim.norms import l2_norms
from anneal.optim.param_groups import with_defaults
from anneal.optim.update_rules import UpdateRule


class FSDP2Optimizer:
    """One ``AnnealOptimizer`` over FSDP2-sharded (and tensor-parallel) fp32 parameters."""

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        *,
        update: UpdateRule,
        clip_grad: float,
        weight_decay: float,
        layout: str,
        compute_dtype: torch.dtype,
        loss_scaler: LossScaler | None = None,
        tp_partial: list[torch.Tensor] = (),
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.update = update
        self.clip_grad = clip_grad
        self.loss_scaler = loss_scaler
        self.layout = layout  # the mesh in words, for describe()
        self.compute_dtype = compute_dtype
        self.param_groups = [with_defaults(g, weight_decay) for g in param_groups]
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.names = [n for g in self.param_groups for n in _names(g)]
        for name, param in zip(self.names, self.params):
            if param.dtype != torch.float32:
                raise ValueError(f"FSDP2Optimizer: {name} is {param.dtype}; FSDP2 keeps fp32 parameters "
                                 "(MixedPrecisionPolicy casts the compute copy)")
        self._state = [{n: torch.zeros_like(_local(p)) for n in update.state_names} for p in self.params]
        self._steps = [torch.zeros((), dtype=torch.float32, device=_local(p).device) for p in self.params]
        self._replicas = [_replicas(p) for p in self.params]
        self._tp_partial = {id(p) for p in tp_partial}
        self._tp_group = tp_group
        self._norm_group = dist.group.WORLD if dist.is_initialized() else None
        self.num_updates = 0
        self.num_skipped = 0
        self._zero_norm = torch.zeros((), dtype=torch.float32, device=_local(self.params[0]).device)

    @property
    def backend(self) -> str:
        return f"fsdp2-{self.update.name}"

    def describe(self) -> str:
        mp = "fp32" if self.compute_dtype == torch.float32 else (
            f"{str(self.compute_dtype).removeprefix('torch.')} compute, fp32 parameters and reduction")
        return (f"{self.backend}: fused {self.update.name} over {sum(p.numel() for p in self.params):,} "
                f"parameters in {len(self.param_groups)} groups, {self.layout}, {mp}; "
                f"{self.state_bytes() / 2**20:.1f} MiB optimizer state on this rank")

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self._state for t in state.values())

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.loss_scaler is None else loss * self.loss_scaler.scale

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def step(self) -> StepResult:
        grads = self._local_grads()
        scale = self._loss_scale()
        need_norm = self.clip_grad > 0 or self.loss_scaler is not None
        grad_norm = self._global_norm(grads) / scale if need_norm else self._zero_norm
        if self.loss_scaler is not None and overflowed(self.loss_scaler, grad_norm):
            self.num_skipped += 1
            return StepResult(grad_norm, True, self._loss_scale(), self.num_skipped)
        self._apply_update(grads, grad_scale(grad_norm, self.clip_grad, scale))
        self.num_updates += 1
        return StepResult(grad_norm, False, self._loss_scale(), self.num_skipped)

    def reload_model_params(self) -> None:
        """Nothing to refresh: the fp32 parameters are the master weights (see ``AnnealOptimizer``)."""

    def _loss_scale(self) -> float:
        return 1.0 if self.loss_scaler is None else self.loss_scaler.scale

    def _local_grads(self) -> list[torch.Tensor]:
        """Each parameter's local gradient (zeros for an unused one), TP partial sums completed in one
        all-reduce over ``tp`` for all of them."""
        grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)) for p in self.params]
        partial = [g for p, g in zip(self.params, grads) if id(p) in self._tp_partial]
        if partial and self._tp_group is not None:
            _all_reduce_coalesced(partial, self._tp_group)
        return grads

    def _global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm of the (still loss-scaled) gradients, every element counted once across all ranks."""
        kept = [(g, r) for g, r in zip(grads, self._replicas) if g.numel()]
        norms = l2_norms([g for g, _ in kept])
        squares = [n.square() / r for n, (_, r) in zip(norms, kept)]
        total = torch.stack(squares).sum() if squares else self._zero_norm.clone()
        if self._norm_group is not None:
            dist.all_reduce(total, group=self._norm_group)
        return total.sqrt()

    @torch.no_grad()
    def _apply_update(self, grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> None:
        i = 0
        for group in self.param_groups:
            idx = [j for j in range(i, i + len(group["params"])) if grads[j].numel()]  # FSDP2 may leave none
            i += len(group["params"])
            if not idx:
                continue
            state = {n: [self._state[j][n] for j in idx] for n in self.update.state_names}
            self.update(group, [_local(self.params[j]) for j in idx], [grads[j] for j in idx], state,
                        [self._steps[j] for j in idx], grad_scale)

    # ---- checkpointing (torch.distributed.checkpoint) ----

    def state_dict(self) -> dict[str, Any]:
        """``state.<parameter name>.<kind>``: DTensors placed as their parameter, so DCP reshards them."""
        state: dict[str, Any] = {"num_updates": self.num_updates, "num_skipped": self.num_skipped,
                                 "state": {name: {k: _like(t, p) for k, t in s.items()}
                                           for name, p, s in zip(self.names, self.params, self._state)}}
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, state in zip(self.names, self._state):
            saved = state_dict["state"][name]
            for kind, tensor in state.items():
                source = _local(saved[kind])
                if source.data_ptr() != tensor.data_ptr():
                    tensor.copy_(source)
        self.num_updates = int(state_dict["num_updates"])
        for step in self._steps:
            step.fill_(self.num_updates)
        if self.loss_scaler is not None and "loss_scaler" in state_dict:
            self.loss_scaler.load_state_dict(state_dict["loss_scaler"])
        self.num_skipped = int(state_dict.get("num_skipped", 0))


def _all_reduce_coalesced(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Sum ``tensors`` over ``group`` in place with one collective (one flat copy of them)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` as a DTensor placed like ``param`` (sharing its storage), or itself for a plain one."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def _replicas(param: torch.Tensor) -> int:
    """How many ranks hold each element of ``param``'s local shard."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not isinstance(param, DTensor):
        return world
    mesh = param.device_mesh
    # Every placement but Replicate splits the tensor (FSDP2 over TP uses _StridedShard, not Shard).
    shards = math.prod(mesh.size(i) for i, p in enumerate(param.placements) if not p.is_replicate())
    return world // shards


def _names(group: dict[str, Any]) -> list[str]:
    names = group.get("param_names")
    if not names:
        raise ValueError("FSDP2Optimizer: param groups need 'param_names' (anneal.optim.param_groups)")
    return list(names)
