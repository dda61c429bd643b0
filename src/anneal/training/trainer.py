"""The training loop: microbatches, one optimizer step, ``scheduler.step(global_batch_size)``.

Steps count consumed samples, as in Megatron: an iteration adds its global batch size to the
scheduler, and an iteration skipped for inf/NaN gradients (fp16) adds nothing to the scheduler,
while the data position moves on (Megatron does the same). The loop does no host sync except on
logging steps, where the metrics are read, and before a checkpoint is written, where the ranks
check together that the loss and gradient norm stayed finite (``anneal.training.health``).

SIGTERM or a first Ctrl-C stops the loop after the current iteration (under torchrun, within about
``signals.AGREE_EVERY_S`` seconds plus an iteration, where the ranks agree) and saves; a second Ctrl-C
aborts (``anneal.training.signals``).

On PyTorch's engine the gradients are reduced once per iteration, in the last microbatch's backward:
the microbatches before accumulate unsharded fp32 gradients (README: Scaling on PyTorch's engine).

The loss is the mean over the counted tokens of the whole global batch, across microbatches and
data-parallel ranks (Megatron's ``calculate_per_token_loss``). While every token counts, each microbatch
holds ``micro_batch_size × seq_length`` of them and that mean is the mean of the microbatch means, as
computed before; with ``dataset.eod_mask_loss`` the counts differ, so each microbatch's loss *sum* is
divided by the global count (over the data-parallel ranks, one all-reduce of one number an iteration,
with no host sync), and the gradients, the logged loss and the evaluations follow that definition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from anneal.config.batch import BatchRamp
from anneal.config.training import TrainingConfig
from anneal.context import DistContext, TrainState
from anneal.data.loader import Microbatches, device_copy
from anneal.faults import fault_iteration, kill_self, stop_self
from anneal.model.documents import DocumentBoundaries
from anneal.scheduler.protocol import ParamScheduler
from anneal.training.distributed import all_reduce_mean
from anneal.training.evaluation import Validation
from anneal.training.health import NonFiniteWatch
from anneal.training.metrics import MetricsLogger, Throughput, peak_memory_mb, reset_peak_memory
from anneal.training.profiling import ProfilerWindow
from anneal.training.signals import StopSchedule


class Checkpointer(Protocol):
    def due(self, state: TrainState) -> bool: ...  # a save is due at this iteration

    def maybe_save(self, state: TrainState, *, force: bool = False) -> None: ...

    def finish(self, state: TrainState) -> None: ...  # the last save, complete (async_save: waited for)

    def latest(self) -> Path | None: ...  # the newest complete checkpoint


@dataclass
class LoopParts:
    """What the loop drives, all built before it starts."""

    model: torch.nn.Module
    optimizer: Any  # anneal.optim AnnealOptimizer: scale_loss, zero_grad, step() -> StepResult
    scheduler: ParamScheduler
    train_data: Any  # anneal.data: gather(samples) -> [n, seq_length + 1] tokens
    valid_sets: Sequence[Any] | None  # anneal.data ValidSets: the main split first, then extra named sets
    ramp: BatchRamp
    checkpointer: Checkpointer | None = None
    throughput: Throughput | None = None
    profiler: ProfilerWindow | None = None
    documents: DocumentBoundaries = field(default_factory=DocumentBoundaries)  # dataset.reset_*, eod_mask_loss
    downstream: Any = None  # anneal.training.downstream.DownstreamEvals (downstream_eval.tasks), or None


class Trainer:
    def __init__(self, cfg: TrainingConfig, parts: LoopParts, ctx: DistContext, metrics: MetricsLogger, *,
                 train_iters: int, log_interval: int, state: TrainState | None = None,
                 grad_sync_each_microbatch: bool = False) -> None:
        self.cfg = cfg
        self.p = parts
        self.ctx = ctx
        self.metrics = metrics
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.state = state or TrainState()
        self.stop_requested = False  # set by anneal.training.signals.StopSignals (or a test)
        self.watch = NonFiniteWatch(ctx.device)
        self._stop: Any = None
        self.applied: list[dict[str, float]] = []  # lr/wd applied at each logged iteration, for the plot
        self._kill_at = fault_iteration("kill_at_iteration", ctx.rank)
        self._stop_at = fault_iteration("stop_at_iteration", ctx.rank)
        self._copy = device_copy(ctx.device)  # pinned, prefetched on a side stream on CUDA; as is on the CPU
        self.grad_sync_each_microbatch = grad_sync_each_microbatch  # dist.fsdp_grad_sync_each_microbatch
        self._agreements = StopSchedule()  # when the ranks agree on a stop signal
        self.validation = Validation(parts.valid_sets or (), cfg, ctx, parts.documents, self._copy)

    def train(self, stop: Any = None) -> TrainState:
        """Run to ``train_iters`` or until ``stop.signum`` is set (``StopSignals``); then save, and return once
        every save is complete (a save in the background, ``checkpoint.async_save``, is waited for)."""
        self._stop = stop
        self._loop()
        if self.state.iteration == self.train_iters and not self.stop_requested:
            self._final_evaluations()
        self._check_finite()
        if self.p.checkpointer is not None:
            self.p.checkpointer.finish(self.state)
        return self.state

    def _loop(self) -> None:
        s, start = self.state, self.state.iteration
        if self.p.throughput is not None:
            self.p.throughput.reset()  # time spent building and loading is not training throughput
        loss_sum = torch.zeros((), device=self.ctx.device)
        iters_in_window = 0
        self._agreements.start(start)
        while s.iteration < self.train_iters:
            if self._kill_at == s.iteration + 1:
                kill_self()  # test hook: SIGKILL as this iteration starts
            if self._stop_at == s.iteration + 1:
                stop_self()  # test hook: SIGSTOP, a stalled rank
            logging_step = (s.iteration + 1) % self.log_interval == 0 or s.iteration + 1 == self.train_iters
            if logging_step:  # read before the step: the lr/wd this iteration's update applies
                lr, wd = self._applied_lr_wd()
            with self._excluded(when=s.iteration == start):  # warm-up and compilation: not throughput
                loss, result = self.train_step()
            s.iteration += 1
            self.metrics.tick(s.iteration)  # a clock read: the first ETA once two iterations are timed
            if self.p.profiler is not None:
                self.p.profiler.step(s.iteration)  # opens or closes the profiling window on its edges
            self.watch.observe(s.iteration, loss, None if result.skipped else result.grad_norm)
            loss_sum += loss
            iters_in_window += 1
            if logging_step:
                self._log(loss_sum / iters_in_window, result, lr, wd)
                loss_sum.zero_()
                iters_in_window = 0
            if self.validation.due(s.iteration):
                with self._excluded():
                    self._log_eval()
            if self.p.downstream is not None and self.p.downstream.due(s.iteration):
                with self._excluded():
                    self._log_downstream()
            saving = self.p.checkpointer is not None and self.p.checkpointer.due(s)
            if logging_step or saving:
                self._check_finite()  # nothing non-finite is ever written
            if self.p.checkpointer is not None:  # after the evaluation, which a plateau schedule consumes
                with self._excluded():
                    self.p.checkpointer.maybe_save(s)
            if self._should_exit(synced=logging_step or saving):
                break

    def _excluded(self, when: bool = True):
        """``when``: time that is not training throughput (``Throughput.excluded``), nor its tokens."""
        t = self.p.throughput
        if t is None or not when:
            return contextlib.nullcontext()
        return _uncounted(t)

    def train_step(self) -> tuple[torch.Tensor, Any]:
        """One iteration: gradient accumulation over microbatches, then the optimizer and scheduler."""
        s, p, ctx, dims = self.state, self.p, self.ctx, self.ctx.parallel
        batch = p.ramp.batch_size_at(s.consumed_samples)
        num_micro = dims.microbatches(self.cfg, batch)
        p.model.train()
        p.optimizer.zero_grad()
        loss_sum = torch.zeros((), device=ctx.device)
        batches = self._microbatches(p.train_data, s.consumed_samples, num_micro)
        divisor = self._loss_divisor(batches, num_micro)
        reduction = "sum" if p.documents.eod_mask_loss else "mean"  # what the divisor divides
        for i, tokens in enumerate(batches):
            self._reduce_grads_in_backward(last=i == num_micro - 1)
            loss = p.model(**p.documents.inputs(tokens), reduction=reduction)
            p.optimizer.scale_loss(loss / divisor).backward()
            loss_sum += loss.detach()
        result = p.optimizer.step()
        if not result.skipped:
            p.scheduler.step(increment=batch)  # steps are samples
        else:
            s.skipped_iters += 1
        s.consumed_samples += batch
        if p.throughput is not None:
            p.throughput.add(batch * self.p.train_data.seq_length)
        return loss_sum / divisor, result

    def _loss_divisor(self, batches: Microbatches, num_micro: int) -> int | torch.Tensor:
        """What each microbatch's loss is divided by, so the iteration's gradient is that of the mean loss per
        counted token of the global batch (this rank's share of it, which the data-parallel mean completes).

        Every token counts: ``num_micro``, dividing each microbatch's mean (the computation as it always was).
        ``dataset.eod_mask_loss``: the global count of counted tokens over the data-parallel size, dividing each
        microbatch's sum; this rank's count is read from its host batches, and summed over the ranks on the
        device (a pinned copy and an all-reduce queued behind the step's work: no host sync).
        """
        documents, dims = self.p.documents, self.ctx.parallel
        if not documents.eod_mask_loss:
            return num_micro
        counted = batches.count(documents.counted_tokens)
        total = torch.tensor(float(counted), dtype=torch.float64)
        if self.ctx.device.type == "cuda":
            total = total.pin_memory().to(self.ctx.device, non_blocking=True)
        if dims.dp_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dims.dp_group)
        return (total.clamp(min=1.0) / dims.dp_size).float()

    def _reduce_grads_in_backward(self, *, last: bool) -> None:
        """PyTorch's engine: reduce the gradients in the last microbatch's backward only (FSDP2 accumulates
        the others unsharded, in fp32); with ``grad_sync_each_microbatch``, reduce-scatter in every backward
        and all-reduce over HSDP replicas in the last. The native engine reduces in ``optimizer.step()``."""
        if not self.ctx.parallel.fsdp:
            return
        if self.grad_sync_each_microbatch:
            self.p.model.set_requires_all_reduce(last)  # the sharded sums wait for the replicas' all-reduce
        else:
            self.p.model.set_requires_gradient_sync(last)  # reduce-scatter and HSDP all-reduce together

    def _microbatches(self, dataset: Any, consumed_samples: int, num_microbatches: int) -> Microbatches:
        """This rank's microbatches of the batch at ``consumed_samples``, each copied as the one before computes.

        Prefetching stops at the iteration's end: whether another iteration runs (a stop, an exit interval)
        and what comes first (an evaluation, a save) are known only after it, so nothing read ahead outlives
        a stop or a checkpoint, and each iteration reads its own batch size (a ramp) afresh. Little is lost:
        the host runs ahead of the GPU, so microbatch 0's copy overlaps the previous optimizer step.
        """
        dims = self.ctx.parallel
        return Microbatches(dataset, self._copy, consumed_samples=consumed_samples,
                            num_microbatches=num_microbatches, micro_batch_size=self.cfg.micro_batch_size,
                            dp_rank=dims.dp_rank, dp_size=dims.dp_size)

    def _applied_lr_wd(self) -> tuple[float, float]:
        """The lr and wd this iteration's update will use (what the scheduler last wrote)."""
        group = self.p.optimizer.param_groups[0]
        lr = group["lr"]
        return (float(lr) if not torch.is_tensor(lr) else lr.item()), self.p.scheduler.get_wd()

    def _log(self, mean_loss: torch.Tensor, result: Any, lr: float, wd: float) -> None:
        s = self.state
        record = {"iteration": s.iteration, "consumed_samples": s.consumed_samples,
                  "loss": all_reduce_mean(mean_loss, self.ctx.parallel).item(), "lr": lr, "weight_decay": wd,
                  "grad_norm": float(result.grad_norm), "loss_scale": float(result.loss_scale),
                  "skipped_iters": s.skipped_iters, "scheduler_num_steps": self.p.scheduler.num_steps}
        record.update(_group_lrs(self.p.optimizer.param_groups))
        if self.p.throughput is not None:
            record.update(self.p.throughput.read())
        record["peak_mem_mb"] = peak_memory_mb(self.ctx.device)
        reset_peak_memory(self.ctx.device)  # each log's peak is its own window's, not the build's
        self.applied.append({"iteration": s.iteration, "lr": lr, "weight_decay": wd})
        self.metrics.log(record)

    def _log_eval(self, *, final: bool = False) -> None:
        losses = self.validation.run(self.p.model, self.state.iteration)
        self.metrics.log({"iteration": self.state.iteration, "consumed_samples": self.state.consumed_samples,
                          **losses})
        if not final and "valid_loss" in losses:  # ReduceLROnPlateau steps on it; other schedules ignore it
            self.p.scheduler.observe(losses["valid_loss"])

    def _log_downstream(self) -> None:
        results = self.p.downstream.run(self.p.model, self.ctx.parallel.dp_group)
        self.metrics.log({"iteration": self.state.iteration, "consumed_samples": self.state.consumed_samples,
                          **results})

    def _final_evaluations(self) -> None:
        """After the last iteration, the evaluations its own interval did not run (Megatron evaluates at the
        end of training too); a run stopped early (a signal, train.exit_interval) skips them."""
        it = self.state.iteration
        with self._excluded():
            if self.validation and not self.validation.due(it):
                self._log_eval(final=True)
            if self.p.downstream is not None and not self.p.downstream.due(it):
                self._log_downstream()

    def _should_exit(self, synced: bool) -> bool:
        """Stop after this iteration: a stop signal on any rank, or ``train.exit_interval``.

        A single process reads its signal every iteration. Ranks agree in one tiny all-reduce, at
        iterations every rank picks alike: where the loop syncs anyway (``synced``: a log, a save), at an
        exit interval, and when ``StopSchedule`` is due (about every ``AGREE_EVERY_S`` seconds).
        """
        it = self.state.iteration
        interval = self.cfg.exit_interval
        by_interval = bool(interval) and it % interval == 0
        asked = self.stop_requested or getattr(self._stop, "signum", None) is not None
        if self.ctx.backend is None:
            stop = asked
        elif synced or by_interval or self._agreements.due(it):
            stop, slowest_s = _agree_on_stop(asked, self._agreements.elapsed_s(), self.ctx.device)
            self._agreements.agreed(it, slowest_s)
        else:
            return False
        self.stop_requested = stop
        return stop or by_interval

    def _check_finite(self) -> None:
        latest = self.p.checkpointer.latest() if self.p.checkpointer is not None else None
        self.watch.check(self.ctx, iteration=self.state.iteration, latest=str(latest) if latest else None)


def _agree_on_stop(asked: bool, elapsed_s: float, device: torch.device) -> tuple[bool, float]:
    """(whether any rank asked to stop, the slowest rank's ``elapsed_s``): one all-reduce of two numbers."""
    flags = torch.tensor([float(asked), elapsed_s], dtype=torch.float64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    any_asked, slowest_s = flags.tolist()  # the one host sync, every few seconds
    return any_asked > 0, slowest_s


def _group_lrs(groups: list[dict]) -> dict[str, float]:
    """Each distinct group lr beyond the first (decoupled embeddings, layer-wise multipliers)."""
    seen: dict[str, float] = {}
    first = groups[0]["lr"]
    for i, g in enumerate(groups[1:], start=1):
        lr = float(g["lr"]) if not torch.is_tensor(g["lr"]) else g["lr"].item()
        if lr != first and lr not in seen.values():
            seen[f"lr_group{i}"] = lr
    return seen


@contextlib.contextmanager
def _uncounted(throughput: Throughput):
    """Neither the time nor the tokens inside count in the throughput window."""
    tokens = throughput.tokens
    with throughput.excluded():
        yield
    throughput.tokens = tokens
