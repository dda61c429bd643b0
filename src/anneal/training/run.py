"""``run(cfg, derived)``: the one function that sees the whole config; builds, trains, reports."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import torch

from anneal import exits
from anneal.checkpoint import files
from anneal.checkpoint.checkpointer import Checkpointer
from anneal.checkpoint.files import SaveDirLock
from anneal.config.compose import to_yaml
from anneal.config.container import ConfigContainer
from anneal.config.derive import Derived
from anneal.context import DistContext
from anneal.data.datasets import RunData, build_data
from anneal.devices import describe_attention
from anneal.errors import AnnealError, RunError
from anneal.hf.importer import check_pretrained, load_pretrained
from anneal.model.documents import document_boundaries
from anneal.model.flops import flops_per_token, num_parameters
from anneal.optim import setup_optimizer
from anneal.optim.setup import model_dtype
from anneal.parallel import plan_layout
from anneal.parallelize import build_parallel_model
from anneal.planner import precision as precision_of
from anneal.resume import ResumePlan, plan_resume, write_lineage
from anneal.training.distributed import init_distributed, set_matmul_precision, shutdown
from anneal.training.downstream import DownstreamEvals
from anneal.training.metrics import MetricsLogger, Throughput, continued_wandb_run, peak_flops
from anneal.training.peers import PeerMonitor, is_lost_peer, transport_cause
from anneal.training.profiling import ProfilerWindow
from anneal.training.signals import StopSignals
from anneal.training.trainer import LoopParts, Trainer

log = logging.getLogger(__name__)


def run_dir() -> Path:
    """Hydra's run directory when launched through Hydra, else ./outputs/run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under Hydra (a Python caller)
        return Path("outputs") / "run"


def run(cfg: ConfigContainer, derived: Derived) -> int:
    """Train; return the exit code (``anneal.exits``). Errors propagate after the process group is gone."""
    # The parallel layout, checked before any process group or model exists; every consumer reads it.
    layout = plan_layout(cfg.train, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                         tp=cfg.model.tensor_model_parallel_size, fsdp=cfg.torch_engine,
                         replicate=cfg.dist.data_parallel_replicate_degree)
    from anneal.planner import check_fits  # the plan's memory against the device's free memory

    check_fits(cfg, layout, cfg.dist.device)
    files.check_load_target(cfg.checkpoint)  # a checkpoint.load with nothing to load, before anything is built
    check_pretrained(cfg.model, cfg.checkpoint.pretrained_checkpoint)  # model.* against its config.json
    _say(f"anneal: building the data (dataset.kind {cfg.dataset.kind})")
    # Resume, anneal branch or extension, decided from the checkpoint's state before anything is written (a
    # refused one leaves no save directory behind); its schedule sets where an anneal blend starts.
    plan = plan_resume(cfg, derived)
    data = build_data(cfg.dataset, seq_length=cfg.model.seq_length, vocab_size=cfg.model.vocab_size,
                      schedule=plan.derived.schedule)
    downstream = DownstreamEvals.for_run(cfg)  # its tokenizer and tasks, found before anything is started
    lock = _lock_save_dir(cfg)  # a second run on the same save directory is refused here
    ctx = init_distributed(cfg.dist, layout)
    stage = Stage()
    try:
        return _build_and_train(cfg, plan, ctx, data, stage, downstream)
    except RuntimeError as error:  # a collective that timed out becomes one line naming the stage
        raise stage.explain(error, ctx, cfg.dist.timeout_minutes) from error
    finally:
        _abandon_in_flight(stage.checkpointer)
        if lock is not None:
            lock.release()
        shutdown(ctx)


def _build_and_train(cfg: ConfigContainer, plan: ResumePlan, ctx: DistContext, data: RunData, stage: Stage,
                     downstream: DownstreamEvals | None) -> int:
    stage.now = "building the model and optimizer"
    torch.manual_seed(cfg.rng.seed)  # the same initial weights on every rank
    _say(f"anneal: building the model ({num_parameters(cfg.model) / 1e6:.2f}M parameters on {ctx.device}) "
         "and the optimizer")
    precision = set_matmul_precision(cfg.optimizer.tf32, ctx.device)  # before the model and the MFU's peak
    if ctx.device.type == "cuda":
        _say(f"anneal: fp32 matmuls at precision {precision!r} "
             + ("(TF32; optimizer.tf32=false for full fp32)" if precision != "highest" else "(full fp32)"))
    model = _build_model(cfg, ctx)
    attention = describe_attention(precision_of(cfg.optimizer), ctx.device.type,
                                   reset_attention_mask=cfg.dataset.reset_attention_mask,
                                   grouped_queries=cfg.model.num_kv_heads != cfg.model.num_attention_heads)
    _say(f"anneal: {attention}")  # the kernel picked for this device and dtype (README: Data)
    derived = plan.derived  # the schedule in force after the resume decision, and the run's length
    optimizer, scheduler = setup_optimizer(cfg.optimizer, cfg.scheduler, model, schedule=derived.schedule,
                                           dp_group=ctx.parallel.dp_group, resume=plan, layout=ctx.parallel,
                                           device=ctx.device)  # native engine: the model is built into it
    out = run_dir()
    metrics = MetricsLogger(cfg.logger, out, enabled=ctx.is_main, total_iters=derived.train_iters,
                            run_config=dataclasses.asdict(cfg),
                            wandb_run_id=_own_wandb_run(plan, cfg.checkpoint.save))
    half = cfg.optimizer.bf16 or cfg.optimizer.fp16
    throughput = Throughput(flops_per_token=flops_per_token(cfg.model), world_size=ctx.world_size,
                            peak=peak_flops(ctx.device, half))
    metrics.info(_banner(cfg, derived, ctx, optimizer, out))
    lineage = write_lineage(plan, out / "metrics.jsonl", enabled=ctx.is_main)
    checkpointer = Checkpointer(plan.checkpoint_config(cfg.checkpoint), model=model, optimizer=optimizer,
                                scheduler=scheduler, ctx=ctx, config_yaml=to_yaml(cfg), report=metrics.info,
                                lineage=lineage)
    stage.now = "loading the checkpoint"
    state = checkpointer.load()
    state.wandb_run_id = metrics.wandb_run_id or state.wandb_run_id  # saved with every checkpoint
    if cfg.checkpoint.pretrained_checkpoint and checkpointer.find() is None:  # nothing to resume: start from it
        load_pretrained(cfg.checkpoint.pretrained_checkpoint, model, optimizer, cfg.model)
        metrics.info(f"pretrained: loaded Hugging Face weights from {cfg.checkpoint.pretrained_checkpoint}")
    if state.iteration >= derived.train_iters:
        metrics.info(_already_complete(state.iteration, derived.train_iters))
        metrics.close()
        return exits.OK
    profiler = ProfilerWindow(cfg.profiling, out / "profile", rank=ctx.rank, device=ctx.device,
                              iteration=state.iteration)
    parts = LoopParts(model, optimizer, scheduler, data.train, data.valid, derived.ramp, checkpointer=checkpointer,
                      throughput=throughput, profiler=profiler,
                      documents=document_boundaries(cfg.dataset, data.eod), downstream=downstream)
    if downstream is not None:
        metrics.info(f"anneal: {cfg.downstream_eval.describe()}")
    trainer = Trainer(cfg.train, parts, ctx, metrics, train_iters=derived.train_iters,
                      log_interval=cfg.logger.log_interval, state=state,
                      grad_sync_each_microbatch=cfg.dist.fsdp_grad_sync_each_microbatch)
    stage.now, stage.trainer, stage.checkpointer = "training", trainer, checkpointer
    with _peer_monitor(cfg, ctx, trainer, checkpointer) as stage.monitor:
        try:
            with StopSignals(lambda: _abort_line(trainer, checkpointer)) as stop:
                trainer.train(stop)
        except RuntimeError as error:  # explained while the monitor still beats: a lost peer falls silent
            raise stage.explain(error, ctx, cfg.dist.timeout_minutes) from error
    stage.now, stage.trainer, stage.monitor = "finishing", None, None
    profiler.close()  # a window reaching past the last iteration still writes what it recorded
    if ctx.is_main and cfg.logger.plot_schedule:
        _plot(scheduler, derived, out, trainer, metrics, seq_length=cfg.model.seq_length)
    if cfg.compile.enable:
        metrics.info(_compile_line())
    metrics.info(_final_line(trainer, stop, checkpointer, metrics))
    metrics.close()
    return stop.exit_code


def _build_model(cfg: ConfigContainer, ctx: DistContext) -> torch.nn.Module:
    """The model laid out per the layout (sharded block by block on PyTorch's engine), compiled if asked."""
    # The native engine's model stays on the meta device here: its flat optimizer materialises it.
    dtype = model_dtype(cfg.optimizer) if ctx.parallel.fsdp else torch.float32
    return build_parallel_model(cfg.model, ctx.parallel, device=ctx.device, param_dtype=dtype,
                                reshard_after_forward=cfg.dist.fsdp_reshard_after_forward,
                                compile_backend=cfg.compile.backend if cfg.compile.enable else None)


def _own_wandb_run(plan: ResumePlan, save: str | None) -> str | None:
    """The W&B run to continue: the one this run's own checkpoint (in ``checkpoint.save``) recorded, on a
    resume or a restarted branch; a finetune, a new branch or a checkpoint from elsewhere starts a new one."""
    if plan.kind == "fresh" or plan.checkpoint is None or save is None:
        return None
    if plan.checkpoint.resolve().parent != Path(save).resolve():
        return None
    return continued_wandb_run(plan.meta.get("train"))


def _say(line: str) -> None:
    """A start-up line as it happens, from rank 0 (Hydra's job logging writes it to pretrain.log too)."""
    if int(os.environ.get("RANK", "0")) == 0:
        log.info(line)


def _plot(scheduler, derived: Derived, out: Path, trainer: Trainer, metrics: MetricsLogger, *,
          seq_length: int) -> None:
    """The schedule in force (after any resume decision) with the applied lr/wd drawn over it; its CSV
    counts consumed tokens too."""
    from anneal.plot import plot_run

    png = plot_run(scheduler.schedule, derived.ramp, derived.train_iters, out / "schedule.png",
                   applied=trainer.applied, seq_length=seq_length)
    metrics.info(f"schedule plot: {png}")


def _peer_monitor(cfg: ConfigContainer, ctx: DistContext, trainer: Trainer, checkpointer: Checkpointer):
    """The heartbeat and stall watch of this rank while it trains (``anneal.training.peers``); none alone."""
    if ctx.world_size == 1:
        return contextlib.nullcontext()

    def stalled(named: str) -> None:  # on the monitor's thread: the main one waits in a collective
        exits.report(RunError(f"{named}; {_resume_hint(checkpointer)}"))
        exits.record(exits.FAILED, run_dir())
        os._exit(exits.FAILED)  # before the watchdog aborts the process (NCCL) or gloo's timeout fires

    return PeerMonitor.for_job(rank=ctx.rank, world_size=ctx.world_size, timeout_s=cfg.dist.timeout_minutes * 60,
                               progress=lambda: trainer.state.iteration, on_stall=stalled)


class Stage:
    """What the run is doing now, for the one line a stalled or lost peer's error becomes."""

    def __init__(self) -> None:
        self.now = "joining the process group"
        self.trainer: Trainer | None = None
        self.checkpointer: Checkpointer | None = None
        self.monitor: PeerMonitor | None = None

    def explain(self, error: RuntimeError, ctx: DistContext, timeout_minutes: float) -> RuntimeError:
        if isinstance(error, AnnealError):  # already one line of ours
            return error
        where = self.now if self.trainer is None else f"{self.now} after iteration {self.trainer.state.iteration}"
        resume = f"; {_resume_hint(self.checkpointer)}" if self.checkpointer is not None else ""
        if is_lost_peer(error):
            lost = self.monitor.lost() if self.monitor is not None else ""
            return RunError(f"lost {lost or 'a peer rank'} while {where}: its process or node is gone "
                            f"({transport_cause(error)}){resume}")
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            return error
        return RunError(f"a collective timed out after dist.timeout_minutes ({timeout_minutes}) while {where}: "
                        f"another rank stalled or died (see its log){resume}")


def _resume_hint(checkpointer: Checkpointer) -> str:
    latest = checkpointer.latest()
    return f"relaunch to resume from {latest}" if latest is not None else "no checkpoint saved yet"


def _compile_line() -> str:
    """What torch.compile made of the blocks: one graph serves every identical block; more are recompiles."""
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    return f"compile: {graphs} graph(s), {breaks} graph break(s) (torch._dynamo counters)"


def _already_complete(iteration: int, train_iters: int) -> str:
    return (f"already complete: the checkpoint is at iteration {iteration} and train.train_iters is "
            f"{train_iters}; nothing to train. To continue, set train.train_iters above {iteration}")


def _final_line(trainer: Trainer, stop: StopSignals, checkpointer: Checkpointer, metrics: MetricsLogger) -> str:
    it = trainer.state.iteration
    waited = f" ({checkpointer.end_note})" if checkpointer.end_note else ""  # checkpoint.async_save
    if stop.signum is None:
        return f"done: {it} iterations, metrics in {metrics.path}{waited}"
    latest = checkpointer.latest()
    saved = f"checkpoint {latest}{waited}" if latest is not None else "nothing saved (no checkpoint.save)"
    return f"{stop.name}: stopped cleanly after iteration {it}; {saved}; exit code {stop.exit_code}"


def _abandon_in_flight(checkpointer: Checkpointer | None) -> None:
    """After an error (a finished run has none in flight): the save in flight, if any, is never marked latest,
    and its thread ends before the process group goes; one line says which."""
    note = checkpointer.abandon() if checkpointer is not None else ""
    if note:
        _say(note)


def _abort_line(trainer: Trainer, checkpointer: Checkpointer) -> str:
    abandoned = checkpointer.abandon(wait=False)  # the process leaves at once: no thread to wait for
    latest = checkpointer.latest()
    return (f"Ctrl-C again: aborted at iteration {trainer.state.iteration} without saving; "
            + (f"{abandoned}; " if abandoned else "")
            + (f"the latest checkpoint is {latest}" if latest is not None else "no checkpoint was saved"))


def _lock_save_dir(cfg: ConfigContainer) -> SaveDirLock | None:
    if not cfg.checkpoint.save or int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = SaveDirLock(Path(cfg.checkpoint.save))
    files.remove_partials(Path(cfg.checkpoint.save))  # left by a save that crashed; never marked latest
    return lock


def _banner(cfg: ConfigContainer, derived: Derived, ctx, optimizer, out: Path) -> str:
    n = num_parameters(cfg.model)
    return "\n".join([
        f"anneal: {n / 1e6:.2f}M parameters, {ctx.world_size} rank(s) on {ctx.device}, "
        f"{ctx.parallel.describe()}"
        f" ({ctx.backend or 'no process group'}), optimizer backend {optimizer.backend}",
        f"anneal: {derived.train_iters} iterations, global batch {cfg.train.global_batch_size}, "
        f"micro batch {cfg.train.micro_batch_size}, {derived.train_samples} samples; run dir {out}",
    ])
