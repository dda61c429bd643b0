"""Shared by tests/optim: a tiny real causal LM, configs, a reference AdamW loop, a gloo launcher."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from anneal.config.optimizer import OptimizerConfig
from anneal_testing import free_port as _free_port
from anneal.optim import get_param_groups, setup_optimizer
from anneal.scheduler import OptimizerParamScheduler, Schedule

VOCAB, HIDDEN, HEADS, SEQ = 64, 32, 2, 16
GLOBAL_BATCH = 8


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.linear_qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.q_norm = nn.RMSNorm(self.head_dim)
        self.k_norm = nn.RMSNorm(self.head_dim)
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.linear_qkv(x).view(b, s, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, h))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden)
        self.self_attention = Attention(hidden, heads)
        self.mlp_norm = nn.RMSNorm(hidden)
        self.linear_fc1 = nn.Linear(hidden, 2 * hidden, bias=True)
        self.linear_fc2 = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.norm(x))
        return x + self.linear_fc2(F.gelu(self.linear_fc1(self.mlp_norm(x))))


class TinyLM(nn.Module):
    """Megatron/anneal naming: embedding.weight, layers.N.self_attention.{q,k}_norm.weight, output_layer.weight."""

    def __init__(self, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([Block(HIDDEN, HEADS) for _ in range(layers)])
        self.final_norm = nn.RMSNorm(HIDDEN)
        self.output_layer = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output_layer(self.final_norm(x))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def batches(num: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(num)]


SCHEDULE = Schedule(
    init_lr=1e-4, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=3 * GLOBAL_BATCH, lr_decay_steps=40 * GLOBAL_BATCH,
    lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=40 * GLOBAL_BATCH, wd_incr_style="constant",
)  # fmt: skip
FLAGS = SimpleNamespace(override_opt_param_scheduler=False, use_checkpoint_opt_param_scheduler=False)


def config(**overrides) -> OptimizerConfig:
    base = {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.1, "clip_grad": 0.3, "adam_beta2": 0.95,
            "distributed_backend": "native"}  # named: a test never depends on what ``auto`` finds installed
    return OptimizerConfig(**{**base, **overrides})


def build(dp_group: dist.ProcessGroup | None = None, **overrides):
    """(model, optimizer, scheduler) for TinyLM, always the same initial weights."""
    model = TinyLM()
    optimizer, scheduler = setup_optimizer(
        config(**overrides), FLAGS, model, schedule=SCHEDULE, dp_group=dp_group
    )
    return model, optimizer, scheduler


def train(
    model, optimizer, scheduler, data: list[torch.Tensor], steps: range, rank: int = 0, world: int = 1,
    micro: int = 1,
) -> list[float]:
    """Run ``steps`` of the training loop on this rank's slice of each global batch, in ``micro``
    microbatches (gradients accumulated as anneal's Trainer does).

    Returns per step the global loss and the optimizer's pre-clip gradient norm, interleaved as
    ``[loss, norm, loss, norm, ...]`` so that runs compare with one tolerance.
    """
    losses = []
    for i in steps:
        local = data[i].chunk(world)[rank]
        optimizer.zero_grad()
        loss = torch.zeros((), device=local.device)
        for tokens in local.chunk(micro):
            micro_loss = lm_loss(model, tokens) / micro
            optimizer.scale_loss(micro_loss).backward()
            loss += micro_loss.detach()
        result = optimizer.step()
        if not result.skipped:
            scheduler.step(GLOBAL_BATCH)
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
        losses += [global_loss.item() / world, result.grad_norm.item()]
    return losses


def reference(
    steps: int, data: list[torch.Tensor], clip_grad: float = 0.3
) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """Single-process torch.optim.AdamW on the global batch, same groups, clipping and schedule.

    Returns [loss, pre-clip norm, ...] as ``train``, final parameters and the optimizer state
    bytes (exp_avg + exp_avg_sq).
    """
    model = TinyLM()
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in get_param_groups(model, config())]
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    sched = OptimizerParamScheduler(opt, **SCHEDULE.__dict__, use_checkpoint_opt_param_scheduler=False)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = lm_loss(model, data[i])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), clip_grad if clip_grad > 0 else float("inf")
        )
        opt.step()
        sched.step(GLOBAL_BATCH)
        losses += [loss.item(), norm.item()]
    state_bytes = sum(
        t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step"
    )
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, state_bytes


def inf_at_first_element(grad: torch.Tensor) -> torch.Tensor:
    """A gradient hook (``param.register_hook``): the gradient backward made, its first element inf."""
    grad = grad.clone()
    grad.view(-1)[0] = float("inf")
    return grad


def masters(opt) -> torch.Tensor:
    """The flat optimizer's fp32 master weights, all of them, in its layout's order (a collective when sharded)."""
    if opt.dtype == torch.float32:
        return torch.cat([p.detach().reshape(-1) for p in opt.params]).clone()
    master = opt.state_dict()["master"]
    return (master.full_tensor() if hasattr(master, "full_tensor") else master).clone()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def assert_close_run(losses, params, ref_losses, ref_params, rel: float = 1e-5) -> None:
    for i, (a, b) in enumerate(zip(losses, ref_losses, strict=True)):
        what = ("loss", "grad norm")[i % 2]
        assert abs(a - b) <= rel * abs(b), f"step {i // 2 + 1}: {what} {a} vs reference {b}"
    for name, expected in ref_params.items():
        err = relative_error(params[name].float(), expected)
        assert err <= rel, f"{name}: relative error {err:.2e} > {rel}"


# ---- real gloo processes ----


def run_distributed(fn: Callable, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by gloo."""
    import torch.multiprocessing as mp

    port = _free_port()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # two processes on two cores: one thread each
    try:
        mp.start_processes(_entry, args=(fn, world_size, port, args), nprocs=world_size, start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)  # an exception propagates to the parent through mp
    # PLATFORM.md: gloo can crash at interpreter exit after a collective; this sequence never did.
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
