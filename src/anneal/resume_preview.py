"""The dry run's resume preview: the decision, the config-versus-checkpoint table, the schedule that will run.

The table comes from the scheduler's own ``load_state_dict`` (on the param groups this config builds,
on a meta-device model), so it is the one the run will print; the figure draws the lr and wd already
applied (the parents' ``metrics.jsonl``, followed through the lineage) and the ones to come.
"""

from __future__ import annotations

import json
from pathlib import Path

from anneal.checkpoint import files
from anneal.errors import ConfigError
from anneal.resume import ResumePlan, plan_resume
from anneal.scheduler.param_scheduler import OptimizerParamScheduler
from anneal.scheduler.schedule import Schedule

PREVIEW_PNG = "resume_preview.png"


def plan_or_refusal(cfg, derived) -> ResumePlan | ConfigError:
    """The run's resume plan, or the error it would stop with (shown with the rest of the dry run)."""
    try:
        return plan_resume(cfg, derived)
    except ConfigError as error:
        return error


def preview(cfg, plan: ResumePlan | ConfigError, out: Path | None = None) -> str:
    """The ``# resume`` part of the dry run for ``plan`` ("" when there is nothing to resume); draws ``out``."""
    if isinstance(plan, ConfigError):
        return f"# resume\nthe run would stop: {plan}"
    if plan.checkpoint is None or plan.kind == "fresh":
        return ""
    train = plan.meta["train"]
    lines = ["# resume", f"{plan.kind} from {plan.checkpoint} at iteration {train['iteration']} "
             f"({train['consumed_samples']} samples); the run ends at iteration {plan.derived.train_iters}",
             *plan.lines, decision_table(cfg, plan)]
    from anneal.plot import output_path  # outputs/dry_run/ (git ignores it), not the working directory

    png = draw(plan, out or output_path(PREVIEW_PNG, "dry_run"), seq_length=cfg.model.seq_length)
    return "\n".join([*lines, f"resume preview: {png} (planned points in {png.with_suffix('.csv').name})"])


def decision_table(cfg, plan: ResumePlan) -> str:
    """The table the run prints when it loads the checkpoint (or the error it stops with)."""
    if not isinstance(plan.derived.schedule, Schedule):
        return "(a torch.optim.lr_scheduler schedule: its settings are compared when the run loads the checkpoint)"
    groups = _Groups(_config_groups(cfg, plan.derived.schedule))
    try:
        scheduler = OptimizerParamScheduler.from_schedule(
            groups, plan.derived.schedule,
            use_checkpoint_opt_param_scheduler=cfg.scheduler.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=cfg.scheduler.override_opt_param_scheduler,
            resume_mode=plan.resume_mode, param_group_bounds=plan.param_group_bounds)
        state = files.saved_scheduler_state(plan.meta)
        return scheduler.load_state_dict(state).table()
    except ConfigError as error:
        return f"the run would stop when loading the checkpoint: {error}"


def draw(plan: ResumePlan, path: Path, *, seq_length: int | None = None) -> Path:
    from anneal.plot import after, curve, plot_resume

    n = plan.meta["train"]["iteration"]
    d = plan.derived
    to_come = after(curve(d.schedule, d.ramp, d.train_iters, label=f"{plan.kind}: to come", seq_length=seq_length), n)
    return plot_resume(trained_history(plan.meta), to_come, n, path, kind=plan.kind,
                       title=f"{plan.kind} from iteration {n:,} to {d.train_iters:,}")


def trained_history(meta: dict) -> list[dict]:
    """The lr and wd applied up to the checkpoint, by iteration, from each ancestor's ``metrics.jsonl``
    (a branch's own records first, then its parent's up to the branch point, and so on)."""
    by_iteration: dict[int, dict] = {}
    lineage, upto = meta.get("lineage") or {}, meta["train"]["iteration"]
    while lineage:
        for record in _records(lineage.get("metrics")):
            if record["iteration"] <= upto:
                by_iteration.setdefault(record["iteration"], record)
        if lineage.get("kind") != "branch":
            break
        lineage, upto = lineage.get("parent_lineage") or {}, lineage["branch_iteration"]
    return [by_iteration[k] for k in sorted(by_iteration)]


def _records(path: str | None) -> list[dict]:
    """The lr records of a run's ``metrics.jsonl``, which a checkpoint's lineage names: read only a file of
    that name, and only the lines that are records with an integer iteration."""
    if not path or Path(path).name != "metrics.jsonl" or not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "lr" in record and type(record.get("iteration")) is int:
            records.append(record)
    return records


def _config_groups(cfg, schedule: Schedule) -> list[dict]:
    """The lr bounds of the param groups this config builds (on a meta-device model: no memory)."""
    from anneal.model.qwen3 import build_model
    from anneal.optim.param_groups import get_param_groups

    groups = get_param_groups(build_model(cfg.model, device="meta"), cfg.optimizer, fallback_min_lr=schedule.min_lr)
    return [{k: g[k] for k in ("max_lr", "min_lr", "wd_mult") if k in g} for g in groups]


class _Groups:
    """Stands in for the optimizer: the scheduler only reads and writes ``param_groups``."""

    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = groups
