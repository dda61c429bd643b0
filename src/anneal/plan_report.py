"""The dry run's plan as text: the memory table per rank, each world size's verdict on the target and the
time estimate. The numbers come from ``anneal.planner``; the target from ``anneal.devices``."""

from __future__ import annotations

from collections.abc import Sequence

from anneal.config.container import ConfigContainer
from anneal.config.optimizer import OptimizerConfig
from anneal.devices import ACCELERATORS, DEFAULT_MFU, MFU_ANCHOR, Target
from anneal.planner import (GIB, MIB, Estimate, Plan, RankMemory, activation_bytes, advice, document_bytes,
                            kernel_keeps, logits_bytes, working_memory)

KERNELS = {"flash": "SDPA flash attention, no score matrices stored",
           "efficient": "SDPA memory-efficient attention, no score matrices stored",
           "math": "SDPA math kernel, the [b, heads, s, s] score matrices stored (Korthikanti's 5as/h term)",
           "flex_attention": "flex_attention with a document mask (dataset.reset_attention_mask), no score "
                             "matrices stored",
           "sdpa+mask": "SDPA flash for CPU with an additive [b, 1, s, s] document mask "
                        "(dataset.reset_attention_mask), no score matrices stored"}


def plan_table(p: Plan, cfg: ConfigContainer) -> str:
    """The plan as the dry run prints it, with each world size against the target's memory and its time."""
    same = "matches" if p.parameters == p.analytic_parameters else f"differs from ({p.analytic_parameters:,})"
    lines = [
        f"parameters           {p.parameters:,} ({_short(p.parameters)}; meta-device model, {same} "
        "the analytic count)",
        f"tokens / iteration   {p.tokens_per_iteration:,} (global batch {cfg.train.global_batch_size} × "
        f"seq {cfg.model.seq_length})",
        f"FLOPs / iteration    {p.flops_per_iteration:.3e} (forward + backward; "
        f"{p.flops_per_run:.3e} for the run)",
        *(_torch_lines(p, cfg) if cfg.torch_engine else _native_lines(p, cfg)),
        *_fit_lines(p, cfg),
    ]
    return "\n".join(lines)


def _precision(optimizer: OptimizerConfig) -> str:
    return "bf16 mixed" if optimizer.bf16 else "fp16 mixed" if optimizer.fp16 else "fp32"


def _native_lines(p: Plan, cfg: ConfigContainer) -> list[str]:
    b = p.bytes_per_parameter
    distributed = cfg.optimizer.use_distributed_optimizer
    head = ("dp", "microbatches", "weights", "grads", "state", "total", "dist. state", "dist. total", "build",
            "peak")
    rows = [(str(r.dims.dp_size), _micro(r), r.replicated.params, r.replicated.grads, r.replicated.optimizer,
             r.replicated.total, r.sharded.optimizer, r.sharded.total, r.construction, r.peak)
            for r in p.ranks]
    used = ("'dist.' columns (optimizer.use_distributed_optimizer=true)" if distributed
            else "replicated columns (optimizer.use_distributed_optimizer=false)")
    return [
        f"memory per rank, native engine, {_precision(cfg.optimizer)}, {cfg.optimizer.optimizer}: weights "
        f"{b.weights} B + grads {b.grads} B + optimizer state {b.state} B (fp32 master {b.master} + moments "
        f"{b.moments}) per parameter;",
        f"  the distributed optimizer shards the state: {b.weights + b.grads} + {b.state}/dp B per parameter",
        *_working_lines(cfg, p.kernel),
        *_table(head, rows, p.ranks),
        f"  this config uses the {used}",
        "  microbatches: per rank per iteration; n/a: the global batch does not split over dp",
        f"  build: while the model is built into the optimizer's buffers ({_native_build(cfg.optimizer)})",
        "  peak: the columns in use plus one microbatch's activations and logits",
    ]


def _torch_lines(p: Plan, cfg: ConfigContainer) -> list[str]:
    moments = p.bytes_per_parameter.moments
    compute = _precision(cfg.optimizer).split()[0]
    reshard = ("plus two blocks (the running and the prefetched one)" if cfg.dist.fsdp_reshard_after_forward
               else "plus every block (dist.fsdp_reshard_after_forward=false)")
    head = ("world", "dp", "shard", "tp", "microbatches", "params", "grads", "optimizer", "gathered",
            "activations", "logits", "build", "peak")
    rows = []
    for r in p.ranks:
        d, s = r.dims, r.states
        rows.append((*map(str, (d.world_size, d.dp_size, d.dp_shard, d.tp_size)), _micro(r),
                     s.params, s.grads, s.optimizer, r.gathered, r.activations, r.logits, r.construction,
                     r.peak))
    return [
        f"memory per rank, PyTorch's engine (FSDP2), {compute} compute, {cfg.optimizer.optimizer}: fp32 "
        f"params 4 B + fp32 grads 4 B + optimizer state {moments} B per element of the rank's shard "
        "(no master copy);",
        "  tensor parallel splits q/k/v, gate/up on dim 0 and o, down on dim 1 (the rest is replicated), "
        "FSDP2 chunks that on dim 0 over 'shard' ranks (× dp/shard HSDP replicas); rank 0's shard is the "
        "largest",
        f"  gathered: FSDP2's {compute} copies of the root's parameters (embedding, final norm, output "
        f"layer) {reshard}",
        *_working_lines(cfg, p.kernel),
        *_table(head, rows, p.ranks),
        "  microbatches: per rank per iteration; n/a: the global batch does not split over dp",
        "  build: while the model is built block by block (the root's fp32 parameters whole, the blocks "
        "built so far as fp32 shards, one block whole)",
        "  grads: with more than one microbatch, plus the unsharded fp32 gradient kept until the last one's "
        "backward reduces it (dist.fsdp_grad_sync_each_microbatch=true: sharded only)",
        "  peak: params + grads + optimizer + gathered + one microbatch's activations and logits",
    ]


def _native_build(optimizer: OptimizerConfig) -> str:
    """What a rank holds at the native engine's construction peak (planner.construction_bytes)."""
    if optimizer.bf16 or optimizer.fp16:
        return "16-bit flat buffer + fp32 master shard + the largest block in fp32, materialised into them"
    return "flat buffer + the largest block in fp32, materialised into it"


def _micro(r: RankMemory) -> str:
    return str(r.microbatches) if r.microbatches is not None else "n/a"


def _table(head: tuple[str, ...], rows: list[tuple], ranks: Sequence[RankMemory]) -> list[str]:
    """Rows of labels then byte counts, right-aligned, in MiB or GiB; a unit line below."""
    unit, size = ("GiB", GIB) if max((r.need for r in ranks), default=0) >= GIB else ("MiB", MIB)
    cells = [head] + [tuple(x if isinstance(x, str) else f"{x / size:.2f}" for x in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells] + [
        f"  {unit} per rank"]


def _working_lines(cfg: ConfigContainer, kernel: str) -> list[str]:
    """One microbatch's activations and logits, this config's and the alternatives' (Korthikanti et al.)."""
    m, mbs, opt, keeps = cfg.model, cfg.train.micro_batch_size, cfg.optimizer, kernel_keeps(cfg.model, kernel)
    activations, logits = working_memory(cfg, kernel)
    full = m.recompute_num_layers if m.recompute_granularity == "full" else 1
    setting = (m.recompute_granularity or "no recompute") + (
        f", {m.recompute_method} {full}" if m.recompute_granularity == "full" else "")
    documents = document_bytes(m, mbs, opt, kernel, reset_position_ids=cfg.dataset.reset_position_ids)
    options = {"none": activation_bytes(m, mbs, opt, granularity=None, **keeps) + documents,
               "selective": activation_bytes(m, mbs, opt, granularity="selective", **keeps) + documents,
               "full uniform 1": activation_bytes(m, mbs, opt, granularity="full", method="uniform",
                                                  num_layers=1, **keeps) + documents}
    tp = f", tensor parallel {m.tensor_model_parallel_size}" if m.tensor_model_parallel_size > 1 else ""
    chunk = m.cross_entropy_chunk_size
    loss, other = (f"chunked per {chunk} tokens", 0) if chunk else ("plain", 1024)
    other_name = f"chunked per {other} tokens" if other else "plain"
    return [
        f"attention: {KERNELS[kernel]}" + (", K and V repeated to every query head (kept for the backward)"
                                           if keeps["expanded_kv"] else ""),
        f"activations / microbatch ({mbs} × {m.seq_length} tokens{tp}): {_bytes(activations)} ({setting}); "
        + ", ".join(f"{name} {_bytes(x)}" for name, x in options.items()),
        *([f"  of which packed documents: {_bytes(documents)} (the document mask once per forward"
           + (", cos and sin per row: dataset.reset_position_ids)" if cfg.dataset.reset_position_ids else ")")]
          if documents else []),
        f"logits / microbatch: {_bytes(logits)} ({loss}); {other_name} {_bytes(logits_bytes(m, mbs, other))}",
    ]


def _fit_lines(p: Plan, cfg: ConfigContainer) -> list[str]:
    """The target, then each world size's peak against its memory, what fits when not, and the time."""
    tp, replicate = cfg.model.tensor_model_parallel_size, cfg.dist.data_parallel_replicate_degree
    lines = [f"world {world}: n/a, model.tensor_model_parallel_size ({tp}) × "
             f"dist.data_parallel_replicate_degree ({replicate}) does not divide it" for world in p.unsplit]
    t = p.target
    lines.append(_target_line(t))
    for r in p.ranks:
        world = r.dims.world_size
        head = f"world {world}: peak {_bytes(r.peak)} per rank, building {_bytes(r.construction)}"
        if t.free is None:
            lines.append(f"{head}, not checked")
        elif r.need * t.ranks_here <= t.free:
            lines.append(f"{head}, fits")
        else:
            change = advice(cfg, world, p.shapes, t.free / t.ranks_here, p.kernel)
            lines.append(f"{head}, does not fit; {change}")
        if t.peak_flops:
            lines.append("  " + _time_line(p.estimate(world, cfg.plan.mfu), cfg, t))
    if not t.peak_flops:
        lines.append(f"time: no estimate, {t.name} has no known peak FLOP/s (plan.device names an accelerator)")
    return lines


def _target_line(t: Target) -> str:
    if t.name in ACCELERATORS:
        a = ACCELERATORS[t.name]
        return (f"target: {t.name} (plan.device), {t.free / GIB:.2f} GiB per rank ({a.capacity_gib:g} GiB "
                f"less the CUDA context), {a.bf16_flops / 1e12:g} TFLOP/s dense bf16 ({a.source})")
    if t.free is None:
        return f"target: this machine, {t.name}: free memory unknown ({t.source}); not checked"
    shared = f", shared by {t.ranks_here} ranks" if t.ranks_here > 1 else ""
    return f"target: this machine, {t.name} has {t.free / GIB:.2f} GiB free ({t.source}){shared}"


def _time_line(e: Estimate, cfg: ConfigContainer, t: Target) -> str:
    anchor = f"; {MFU_ANCHOR}" if cfg.plan.mfu == DEFAULT_MFU else ""
    return (f"time: {e.seconds_per_iteration:.3g} s / iteration, {_duration(e.seconds)} for the run, "
            f"{_short(e.tokens_per_day)} tokens / day on {e.world_size} × {t.name} at {e.mfu:.0%} MFU "
            f"(plan.mfu{anchor})")


def _duration(seconds: float) -> str:
    """3.4 days, 5.2 hours, 12 minutes."""
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _short(n: float) -> str:
    """4022468096 -> '4.02B'."""
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


