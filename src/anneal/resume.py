"""What a run resumes into, decided before anything is built: a resume, an anneal branch or an extension.

``plan_resume(cfg, derived)`` reads the checkpoint's ``state.json`` (no torch) and returns the
``Derived`` that will actually run, so the loop, the metrics, the end-of-run plot and the dry run
all see the schedule in force after the resume decision:

- **branch** (``scheduler.anneal_branch_iters=K``): from the parent checkpoint at iteration N, the
  lr anneals over K iterations (``scheduler.lr_wsd_decay_style``) down to the parent's ``min_lr``
  and the run ends at N+K (``anneal.scheduler.branch``). Its checkpoints go to ``checkpoint.save``,
  which must not be the parent's directory; once that holds a checkpoint, the branch resumes from it.
- **extend**: a run resumed in its stable phase with a longer ``train.train_iters`` (or decay) moves
  the anneal start and the decay end; once the anneal has begun it is refused, with the branch to run.
- **resume** otherwise: the scheduler's own rule (strict, override or use-checkpoint) settles it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from anneal.checkpoint import files
from anneal.config.derive import Derived
from anneal.errors import ConfigError
from anneal.scheduler.branch import (branch_bounds, branch_point, branch_schedule, extended, extension_refusal,
                                     is_extension)
from anneal.scheduler.param_scheduler import saved_settings
from anneal.scheduler.schedule import Schedule, phases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePlan:
    kind: str  # "fresh", "resume", "branch" or "extend"
    derived: Derived  # the schedule in force after the decision, and the run's length
    checkpoint: Path | None = None  # what to load
    meta: dict = field(default_factory=dict)  # the checkpoint's state.json
    lineage: dict = field(default_factory=dict)  # what this run's checkpoints and metrics record
    param_group_bounds: list[dict] | None = None  # the groups' lr bounds, when the branch sets them
    lines: tuple[str, ...] = ()  # printed before training (and by the dry run)

    def checkpoint_config(self, cfg):
        """The ``checkpoint`` section with ``load`` pointing at this plan's checkpoint (a branch resumes
        from its own latest checkpoint even though ``checkpoint.load`` names the parent)."""
        return cfg if self.checkpoint is None or self.kind == "fresh" else replace(cfg, load=str(self.checkpoint))

    @property
    def resume_mode(self) -> str | None:
        """The scheduler's load mode when this plan, not the config-vs-checkpoint rule, decides."""
        return self.kind if self.kind in ("branch", "extend") else None


def plan_resume(cfg, derived: Derived) -> ResumePlan:
    """The plan for ``cfg`` (the whole config: checkpoint, scheduler and model sections are read)."""
    k = getattr(cfg.scheduler, "anneal_branch_iters", None)
    path = files.find_checkpoint(cfg.checkpoint.load, cfg.checkpoint.save, prefer_own=bool(k))
    if path is None:
        if k:
            raise ConfigError(f"scheduler.anneal_branch_iters ({k}) needs checkpoint.load: the parent checkpoint "
                              "to branch from")
        return ResumePlan("fresh", derived, lineage={"kind": "root"})
    from anneal.checkpoint.guards import verified_state  # imports torch: only when there is a checkpoint

    meta = verified_state(path)  # a foreign or damaged checkpoint is refused here, naming the fallback
    lineage = meta.get("lineage") or {"kind": "root"}
    if cfg.checkpoint.finetune:
        return ResumePlan("fresh", derived, path, meta, lineage={"kind": "root", "finetuned_from": str(path)})
    megatron = isinstance(derived.schedule, Schedule) and meta["scheduler"].get("kind") != "torch"
    if k and not megatron:
        raise ConfigError(f"scheduler.anneal_branch_iters ({k}) needs Megatron's schedules on both sides "
                          "(lr_decay_style), not a torch.optim.lr_scheduler schedule")
    own = lineage.get("kind") == "branch" and _inside(path, cfg.checkpoint.save)
    if own:  # a branch resumes as it was planned, whatever the parent's settings on the command line
        if k and k != lineage["anneal_iters"]:
            raise ConfigError(f"scheduler.anneal_branch_iters ({k}) differs from the branch's own "
                              f"({lineage['anneal_iters']}) in {path.parent}: a branch resumes as planned; to anneal "
                              "over another length, branch from the parent into a new checkpoint.save")
        return _resume_branch(derived, path, meta, lineage)
    if k:
        return _branch(cfg, derived, path, meta, lineage, k)
    plan = ResumePlan("resume", derived, path, meta, lineage)
    return _extend(cfg, plan) if megatron and _strict(cfg.scheduler) else plan


def checkpoint_schedule(state: dict, fallback: Schedule) -> Schedule:
    """The ``Schedule`` a checkpoint's scheduler state was in (``fallback`` fills keys Megatron omits)."""
    return replace(fallback, **saved_settings(state))


def _branch(cfg, derived: Derived, path: Path, meta: dict, lineage: dict, k: int) -> ResumePlan:
    save = cfg.checkpoint.save
    if not save or _inside(path, save):
        raise ConfigError(f"checkpoint.save ({save}) must be a new directory for the branch, not the parent's "
                          f"({path.parent}): a branch never writes into its parent")
    parent = checkpoint_schedule(meta["scheduler"], derived.schedule)
    train = meta["train"]
    n, steps = train["iteration"], meta["scheduler"]["num_steps"]
    point = branch_point(parent, steps, f"{path} (iteration {n})")
    ramp = derived.ramp
    end_samples = ramp.samples_after(n + k)
    end_steps = steps + (end_samples - train["consumed_samples"])
    branch = branch_schedule(parent, point, end_steps, cfg.scheduler.lr_wsd_decay_style)
    bounds_before = files.saved_scheduler_state(meta)["param_group_bounds"] or []
    bounds = branch_bounds(parent, point, bounds_before)
    record = {"kind": "branch", "parent": str(path), "parent_lineage": lineage, "branch_iteration": n,
              "branch_samples": train["consumed_samples"], "branch_steps": steps, "anneal_iters": k,
              "end_iteration": n + k, "schedule_before": asdict(parent), "schedule_after": asdict(branch),
              "bounds_before": bounds_before, "bounds_after": bounds}
    seq = cfg.model.seq_length
    lines = (f"anneal branch from {path} at iteration {n} ({train['consumed_samples']} samples, "
             f"{train['consumed_samples'] * seq:,} tokens): lr {branch.max_lr:g} anneals "
             f"({branch.lr_wsd_decay_style}) to {branch.min_lr:g} over {k} iterations "
             f"({end_samples - train['consumed_samples']} samples), ending at iteration {n + k} "
             f"({end_samples} samples, {end_samples * seq:,} tokens); checkpoints in {save}",)
    derived = replace(derived, schedule=branch, train_iters=n + k, train_samples=end_samples)
    return ResumePlan("branch", derived, path, meta, record, bounds, lines)


def _resume_branch(derived: Derived, path: Path, meta: dict, lineage: dict) -> ResumePlan:
    schedule = checkpoint_schedule(meta["scheduler"], derived.schedule)
    end = lineage["end_iteration"]
    bounds = meta["scheduler"].get("param_group_bounds")
    lines = (f"resuming the anneal branch in {path.parent} (from {lineage['parent']} at iteration "
             f"{lineage['branch_iteration']}, ending at iteration {end})",)
    derived = replace(derived, schedule=schedule, train_iters=end, train_samples=derived.ramp.samples_after(end))
    return ResumePlan("branch", derived, path, meta, lineage, bounds, lines)


def _extend(cfg, plan: ResumePlan) -> ResumePlan:
    derived, state = plan.derived, plan.meta["scheduler"]
    before = checkpoint_schedule(state, derived.schedule)
    if not is_extension(before, derived.schedule):
        return plan  # nothing moved, or more than the length: the scheduler's strict rule reports it
    steps = state["num_steps"]
    why = extension_refusal(before, derived.schedule, steps)
    if why:
        raise ConfigError(f"train.train_iters ({derived.train_iters}): cannot extend the run from {plan.checkpoint}: "
                          f"{why}. {_branch_hint(cfg, plan, before, derived.train_iters)}")
    seq, ramp = cfg.model.seq_length, derived.ramp
    schedule = extended(before, derived.schedule)
    old, new = phases(before), phases(schedule)
    lines = ["extending the run in its stable phase (checkpoint at "
             f"{plan.meta['train']['iteration']} iterations, {steps} samples):",
             f"{'':<12}{'before':>34}{'after':>34}"]
    for name, a, b in (("anneal start", old.anneal_start, new.anneal_start),
                       ("decay end", old.decay_end, new.decay_end)):
        lines.append(f"{name:<12}{_where(a, ramp, seq):>34}{_where(b, ramp, seq):>34}")
    if schedule.wd_incr_style != "constant":
        lines.append(f"weight decay: the checkpoint's {schedule.wd_incr_style} ramp continues unchanged "
                     f"(ends at {_where(schedule.wd_incr_steps, ramp, seq)})")
    return replace(plan, kind="extend", derived=replace(derived, schedule=schedule), lines=tuple(lines))


def _branch_hint(cfg, plan: ResumePlan, before: Schedule, train_iters: int) -> str:
    """The branch command that ends at ``train_iters`` from the last checkpoint in the stable phase."""
    save = plan.checkpoint.parent
    anneal_start = plan.derived.ramp.iterations_for(phases(before).anneal_start)
    stable = [p for p in files.completed(save) if (files.iteration_of(p) or 0) <= anneal_start]
    if not stable:
        return (f"No checkpoint in {save} is in the stable phase (up to iteration {anneal_start}): "
                "there is nothing to branch from")
    n = files.iteration_of(stable[-1])
    k = train_iters - n
    if k < 1:
        return f"Its last stable checkpoint is at iteration {n}, past train.train_iters ({train_iters})"
    return (f"To anneal from its last stable checkpoint (iteration {n}) and end at iteration {train_iters}, run a "
            f"branch: scripts/pretrain.py <the run's overrides> checkpoint.load={stable[-1]} "
            f"checkpoint.save={save}_branch{n} scheduler.anneal_branch_iters={k}")


def _where(samples: float, ramp, seq: int) -> str:
    return f"it {ramp.iterations_for(samples)} / {samples:g} smp / {samples * seq:,.0f} tok"


def _inside(path: Path, save: str | None) -> bool:
    return save is not None and Path(save).resolve() == path.resolve().parent


def _strict(scheduler) -> bool:
    return not (scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler)


def write_lineage(plan: ResumePlan, metrics_path: Path, *, enabled: bool) -> dict:
    """The lineage this run's checkpoints record (with where its metrics go), also written beside the
    metrics as ``lineage.json``; the plan's lines are printed with it."""
    lineage = {**plan.lineage, "metrics": str(metrics_path.resolve())}
    if enabled:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        (metrics_path.parent / "lineage.json").write_text(json.dumps(lineage, indent=1))
        for line in plan.lines:
            log.info(line)  # the launcher's one log format, also in pretrain.log
    return lineage
