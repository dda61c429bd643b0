"""What ``dry_run=true`` prints: the derived schedule, the data, the resource plan, then the resolved config.

Nothing is started or allocated: the model is built on the meta device for its parameter shapes.
The plan targets ``plan.device`` (an accelerator of ``anneal.devices``, or this machine) and lays the
config's parallel layout (tensor parallel, FSDP2/HSDP) over ``plan.world_size`` ranks, else
``WORLD_SIZE`` when it is set, else over 1, 8 and 64 data-parallel shards.
"""

from __future__ import annotations

import os

from anneal.config.compose import to_yaml
from anneal.config.container import ConfigContainer
from anneal.config.derive import Derived
from anneal.config.torch_scheduler import TorchSchedule
from anneal.data.spec import valid_keys
from anneal.errors import ConfigError
from anneal.log_format import human

DEFAULT_DATA_PARALLEL_SHARDS = (1, 8, 64)


def schedule_table(cfg: ConfigContainer, derived: Derived) -> str:
    seq = cfg.model.seq_length
    s = derived.schedule
    if isinstance(s, TorchSchedule):
        return "\n".join(_torch_lines(cfg, s) + _boundary_rows(derived, seq))
    lines = [
        f"schedule: lr {s.lr_decay_style}"
        + (f" (anneal {s.lr_wsd_decay_style})" if s.lr_decay_style == "WSD" else "")
        + f", max_lr {s.max_lr:g}, min_lr {s.min_lr:g}, init_lr {s.init_lr:g};"
        f" wd {s.wd_incr_style} {s.start_wd:g} -> {s.end_wd:g}",
        f"steps count samples: scheduler.step(global_batch_size) each iteration "
        f"(global batch {cfg.train.global_batch_size}, {seq} tokens per sample)",
    ]
    return "\n".join(lines + _boundary_rows(derived, seq))


def _boundary_rows(derived: Derived, seq: int) -> list[str]:
    lines = [f"{'phase boundary':<28}{'iteration':>12}{'samples':>16}{'tokens':>12}"]
    for name, samples, iteration, tokens in derived.phase_rows(seq):
        lines.append(f"{name:<28}{iteration:>12}{_exact(samples):>16}{human(tokens):>12}")
    return lines


def _torch_lines(cfg: ConfigContainer, s: TorchSchedule) -> list[str]:
    """The torch schedule's class, kwargs and warmup, in place of Megatron's phase table."""
    steps = "once per iteration"
    if s.follows_metric:
        steps = (f"on the validation loss after each evaluation (train.eval_interval = "
                 f"{cfg.train.eval_interval} iterations), once the warmup is over")
    lines = [f"schedule: {s.describe()}", f"steps: {steps}"]
    if s.warmup_iters:
        handover = "" if s.follows_metric else "; the schedule's iterations count from its end (SequentialLR)"
        lines.append(f"warmup: {s.warmup_style} from {s.warmup_start_factor:g} x lr over {s.warmup_iters} "
                     f"iterations{handover}")
    lines.append(f"lr: from each param group's max_lr (optimizer.lr {s.max_lr:g}); "
                 f"wd constant {s.weight_decay:g}")
    return lines


def _exact(samples: float) -> str:
    """Samples as an integer when whole (7680000, not 7.68e+06); a warmup fraction may not be."""
    return str(int(samples)) if float(samples).is_integer() else f"{samples:.6g}"



def validation_lines(cfg: ConfigContainer) -> list[str]:
    """The tokens each evaluation reads: ``train.eval_iters`` global batches of every validation set (the main
    split, then ``dataset.extra_valid_data_path``'s sets). Evaluation k, at iteration k × eval_interval, reads
    each set's samples [(k - 1) · eval_iters · gbs, k · eval_iters · gbs), into reshuffled epochs when the set
    is shorter (Megatron's validation iterator); the end of training adds one more."""
    t, seq = cfg.train, cfg.model.seq_length
    if not t.eval_interval or not t.eval_iters:
        return ["validation: off (train.eval_interval is null or train.eval_iters is 0)"]
    sets = valid_keys(cfg.dataset)
    per_set = t.eval_iters * t.global_batch_size * seq
    keys = ", ".join(key for key, _ in sets)
    lines = [f"validation: {t.eval_iters} iterations × {t.global_batch_size} samples × {seq} tokens = "
             f"{human(per_set)} tokens per set, {len(sets)} set(s) ({keys}) every {t.eval_interval} "
             f"iterations and after the last; {human(per_set * len(sets))} tokens per evaluation, each reading "
             "the next samples of its set"]
    lines += [f"  {key} also per blend component: {', '.join(parts)}" for key, parts in sets if parts]
    return lines


def world_sizes(cfg: ConfigContainer) -> tuple[int, ...]:
    """``plan.world_size``, else ``WORLD_SIZE`` when set (as under torchrun), else the ranks of 1, 8 and 64
    shards of the layout."""
    if cfg.plan.world_size is not None:
        return (cfg.plan.world_size,)
    world = os.environ.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 0:
        return (int(world),)
    ranks_per_shard = cfg.model.tensor_model_parallel_size * cfg.dist.data_parallel_replicate_degree
    return tuple(n * ranks_per_shard for n in DEFAULT_DATA_PARALLEL_SHARDS)


def report(cfg: ConfigContainer, derived: Derived) -> str:
    return "\n".join(report_parts(cfg, derived))


def report_parts(cfg: ConfigContainer, derived: Derived):
    """The report in parts, the answer first: the schedule at once, the data, then the plan (which imports
    torch), the resume decision, and the resolved config last.

    First, what the run checks before it builds (the data files' headers and metadata; ConfigError as the
    run would raise it), and the resume decision: with a branch or an extension, every table shows the
    schedule that will run, not the configured one."""
    from anneal.data.sources import check_indexed  # imports numpy, not torch
    from anneal.resume_preview import plan_or_refusal, preview

    check_indexed(cfg.dataset, seq_length=cfg.model.seq_length, vocab_size=cfg.model.vocab_size)
    resume = plan_or_refusal(cfg, derived)
    runs = derived if isinstance(resume, ConfigError) else resume.derived  # the schedule in force
    notes = [f"note: {note}" for note in derived.notes] + _resume_note(resume)
    yield "\n".join(["# derived", *notes, schedule_table(cfg, runs)])
    from anneal.data.mix import mix_table  # imports numpy, not torch

    yield "\n".join(["# data", mix_table(cfg.dataset, runs, cfg.model.seq_length), *validation_lines(cfg),
                     cfg.downstream_eval.describe()])
    from anneal.plan_report import plan_table
    from anneal.planner import plan

    yield "\n".join(["# plan", plan_table(plan(cfg, runs.train_samples, world_sizes(cfg)), cfg)])
    if text := preview(cfg, resume):  # with a checkpoint to resume: the decision and its figure
        yield text
    yield "\n".join(["# resolved config", to_yaml(cfg)])


def _resume_note(resume) -> list[str]:
    """Says why the tables differ from the config when a branch or an extension sets the schedule."""
    if isinstance(resume, ConfigError) or resume.kind not in ("branch", "extend"):
        return []
    return [f"note: the schedule of the {resume.kind} from {resume.checkpoint}, which ends at iteration "
            f"{resume.derived.train_iters} (see # resume), not the configured one"]
