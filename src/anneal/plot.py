"""Schedule plots and tables: the planned lr and wd over a run, phases shaded and labelled.

The values come from ``anneal.scheduler``'s pure ``lr_at`` / ``wd_at``, the functions the training
loop applies (and the parity tests check), evaluated at the scheduler's own argument: the samples
consumed before each iteration. Long runs are sampled, not vectorised: evenly spaced iterations plus
the ones on both sides of every phase boundary, so each kink is drawn exactly where it is.
A ``TorchSchedule`` is drawn by stepping the real torch scheduler once per iteration (on a dummy
optimizer), which is exact but slower: ``TORCH_PREVIEW_MAX_ITERS`` caps it, with a note on the plot.
matplotlib is imported when a plot is drawn, never at import.
"""

from __future__ import annotations

import csv
import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from anneal.config.batch import BatchRamp
from anneal.config.torch_scheduler import TorchSchedule
from anneal.scheduler.branch import branch_point, branch_schedule
from anneal.scheduler.schedule import Schedule, lr_at, phases, wd_at

DEFAULT_POINTS = 2000
PHASE_COLORS = {"warmup": "#fde0c5", "stable": "#d8ecd4", "constant": "#d8ecd4", "anneal": "#d6e2f5",
                "decay": "#d6e2f5", "min lr": "#e4e4e4"}
OTHER_PHASE_COLOR = "#e6ddf0"  # a torch schedule's main phase, named after its class
# A torch scheduler steps in 5-8 µs: 300k iterations take 1.5-2.5 s to preview, 1M iterations 5-8 s.
TORCH_PREVIEW_MAX_ITERS = 1_000_000
TITLE_WIDTH = 120  # characters on one line of a schedule figure's title (13 inches at 12 pt)


@dataclass(frozen=True)
class Phase:
    """One stretch of the schedule: steps (samples) in ``(start_samples, end_samples]``."""

    name: str
    start_samples: float
    end_samples: float
    start_iteration: int  # iterations completed when the phase starts and ends (as the dry run counts)
    end_iteration: int


@dataclass(frozen=True)
class Curve:
    """The planned lr and wd of one configuration at a set of iterations."""

    label: str
    iterations: list[int]
    samples: list[float]  # consumed before each iteration: the scheduler's num_steps during it
    lr: list[float]
    wd: list[float]
    phases: tuple[Phase, ...]
    seq_length: int | None = None
    note: str = ""  # shown on the plot: what the curve cannot show (a metric-driven lr, a cap)

    def phase_at(self, steps: float) -> str:
        """The phase whose branch of ``lr_at`` gives the lr after ``steps``."""
        return next((p.name for p in self.phases if steps <= p.end_samples), self.phases[-1].name)


def planned(schedule: Schedule, ramp: BatchRamp,
            iterations: Sequence[int]) -> tuple[list[float], list[float]]:
    """lr and wd applied during each iteration k (the scheduler's value after k - 1 iterations)."""
    lrs, wds = [], []
    for k in iterations:
        steps = ramp.samples_after(max(k - 1, 0))
        lrs.append(lr_at(schedule, steps, schedule.max_lr, schedule.min_lr))
        wds.append(wd_at(schedule, steps, schedule.start_wd, schedule.end_wd))
    return lrs, wds


def phase_spans(schedule: Schedule, ramp: BatchRamp, train_iters: int) -> tuple[Phase, ...]:
    """The phases of ``schedule`` in a run of ``train_iters`` iterations, in order, empty ones left out."""
    p = phases(schedule)
    if schedule.lr_decay_style == "constant":
        ends = [("warmup", p.warmup_end), ("constant", float("inf"))]
    else:
        decay = "anneal" if schedule.lr_decay_style == "WSD" else "decay"
        ends = [("warmup", p.warmup_end), ("stable", p.anneal_start), (decay, p.decay_end),
                ("min lr", float("inf"))]
    run_end = ramp.samples_after(train_iters)
    spans, start = [], 0.0
    for name, end in ends:
        end = min(end, run_end)
        if end > start:
            spans.append(Phase(name, start, end, ramp.iterations_for(start), ramp.iterations_for(end)))
            start = end
    return tuple(spans)


def sample_iterations(train_iters: int, spans: Sequence[Phase], points: int = DEFAULT_POINTS) -> list[int]:
    """Every iteration when ``points`` is 0 or covers the run, else ``points`` evenly spaced ones
    plus the iterations around each phase boundary."""
    if points <= 0 or train_iters <= points:
        return list(range(1, train_iters + 1))
    even = {1 + round(i * (train_iters - 1) / (points - 1)) for i in range(points)}
    ends = {k for span in spans for k in (span.start_iteration, span.end_iteration)}
    edges = {k + d for k in ends for d in (-1, 0, 1, 2)}  # the lr after k iterations is applied in k + 1
    return sorted(even | {k for k in edges if 1 <= k <= train_iters})


def curve(schedule: Schedule | TorchSchedule, ramp: BatchRamp, train_iters: int, *, label: str = "",
          seq_length: int | None = None, points: int = DEFAULT_POINTS) -> Curve:
    if isinstance(schedule, TorchSchedule):
        return torch_curve(schedule, ramp, train_iters, label=label, seq_length=seq_length, points=points)
    spans = phase_spans(schedule, ramp, train_iters)
    iterations = sample_iterations(train_iters, spans, points)
    lrs, wds = planned(schedule, ramp, iterations)
    samples = [ramp.samples_after(k - 1) for k in iterations]
    return Curve(label, iterations, samples, lrs, wds, spans, seq_length)


def branch_curve(parent: Schedule, ramp: BatchRamp, at_iteration: int, anneal_iters: int, wsd_style: str, *,
                 label: str = "", seq_length: int | None = None, points: int = DEFAULT_POINTS) -> Curve:
    """An anneal branch of ``parent`` after ``at_iteration`` (``anneal.scheduler.branch``), drawn from there on."""
    steps = ramp.samples_after(at_iteration)
    point = branch_point(parent, steps, f"the branch at iteration {at_iteration}")
    end = at_iteration + anneal_iters
    schedule = branch_schedule(parent, point, ramp.samples_after(end), wsd_style)
    label = label or f"branch at {at_iteration:,}: {anneal_iters:,}-iteration {wsd_style} anneal"
    return after(curve(schedule, ramp, end, label=label, seq_length=seq_length, points=points), at_iteration)


def after(c: Curve, iteration: int) -> Curve:
    """The part of ``c`` after ``iteration`` (what a branch or a resume adds to its parent)."""
    keep = [i for i, k in enumerate(c.iterations) if k > iteration]
    pick = lambda values: [values[i] for i in keep]  # noqa: E731
    return replace(c, iterations=pick(c.iterations), samples=pick(c.samples), lr=pick(c.lr), wd=pick(c.wd))


def torch_curve(schedule: TorchSchedule, ramp: BatchRamp, train_iters: int, *, label: str = "",
                seq_length: int | None = None, points: int = DEFAULT_POINTS) -> Curve:
    """The lr the torch scheduler applies at sampled iterations (every one stepped), wd constant."""
    from anneal.scheduler.torch_schedules import preview_lrs  # imports torch

    drawn = min(train_iters, TORCH_PREVIEW_MAX_ITERS)
    ends = [("warmup", schedule.warmup_iters), (schedule.class_name, drawn)]
    spans, start = [], 0
    for name, end in ends:
        if end > start:
            spans.append(Phase(name, ramp.samples_after(start), ramp.samples_after(end), start, end))
            start = end
    iterations = sample_iterations(drawn, spans, points)
    notes = []
    if schedule.follows_metric:
        notes.append(f"{schedule.class_name}: after the warmup the lr depends on the validation loss; "
                     "drawn flat at its initial value")
    if drawn < train_iters:
        notes.append(f"torch schedules are stepped one iteration at a time: drawn up to iteration {drawn:,} "
                     f"of {train_iters:,}")
    return Curve(label, iterations, [ramp.samples_after(k - 1) for k in iterations],
                 preview_lrs(schedule, iterations), [schedule.weight_decay] * len(iterations), tuple(spans),
                 seq_length, note="\n".join(notes))


def write_csv(curves: Sequence[Curve], path: Path) -> Path:
    """One row per plotted point: config, iteration, consumed samples and tokens before it, lr, wd, phase.
    ``config`` is left out when no curve has a label, ``consumed_tokens`` when none knows its sequence
    length."""
    columns = ["config", "iteration", "consumed_samples", "consumed_tokens", "lr", "weight_decay", "phase"]
    if not any(c.label for c in curves):
        columns.remove("config")
    if all(c.seq_length is None for c in curves):
        columns.remove("consumed_tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for c in curves:
            for k, steps, lr, wd in zip(c.iterations, c.samples, c.lr, c.wd):
                tokens = "" if c.seq_length is None else steps * c.seq_length
                writer.writerow({"config": c.label, "iteration": k, "consumed_samples": steps,
                                 "consumed_tokens": tokens, "lr": repr(lr), "weight_decay": repr(wd),
                                 "phase": c.phase_at(steps)})
    return path


def plot_schedules(curves: Sequence[Curve], path: Path, title: str = "") -> Path:
    """PNG: lr (top) and wd (bottom) against iterations (left) and consumed samples (right).

    The first curve's phases are shaded and listed in the legend below; the other curves' phase
    boundaries are dashed lines in their colour. With several curves, their legend sits below the
    panels too (inside one it would cover a curve or a phase's name); a long title wraps.
    """
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    title_lines = textwrap.wrap(title or "planned learning rate and weight decay", TITLE_WIDTH) or [""]
    legend_rows = max(len(curves) if len(curves) > 1 else 0, len(curves[0].phases) if len(curves) > 1
                      else -(-len(curves[0].phases) // 2)) + 1  # + the legend's title
    top_in, bottom_in = 0.75 + 0.25 * len(title_lines), 0.7 + 0.17 * legend_rows  # margins, inches
    height = 5.4 + top_in + bottom_in  # the panels keep their size whatever the margins hold
    fig, axes = plt.subplots(2, 2, figsize=(13, height), sharex="col", sharey="row", height_ratios=[3, 1])
    reference = curves[0]
    for col, unit in enumerate(("iteration", "samples")):
        for row, values in enumerate(("lr", "wd")):
            ax = axes[row][col]
            _shade(ax, reference.phases, unit, labels=row == 0)
            for i, c in enumerate(curves):
                ax.plot(c.iterations if unit == "iteration" else c.samples, getattr(c, values), color=f"C{i}",
                        lw=1.6, label=c.label or None)
                if i and row == 0:
                    _boundaries(ax, c.phases, unit, color=f"C{i}")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.grid(alpha=0.3, lw=0.5)
        axes[1][col].set_xlabel("iteration" if unit == "iteration" else "consumed samples")
    _tokens_axis(axes[0][1], curves)
    axes[0][0].set_ylabel("learning rate")
    axes[1][0].set_ylabel("weight decay")
    axes[0][0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(curves) > 1:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower left", bbox_to_anchor=(0.07, 0.01),
                   fontsize=8, frameon=False, title="curves", title_fontsize=8, alignment="left")
        _phase_legend(fig, reference.phases, f"shaded: the phases of {reference.label}", ncol=1,
                      loc="lower right", anchor=(0.98, 0.01))
    else:
        _phase_legend(fig, reference.phases, None, ncol=min(len(reference.phases), 2), loc="lower center",
                      anchor=(0.5, 0.01))
    _notes(axes[0][0], curves)
    fig.suptitle("\n".join(title_lines), y=1 - 0.2 / height, va="top")
    # fixed margins: tight_layout would draw the figure once more (half the time of a 300k-iteration plot)
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - top_in / height, bottom=bottom_in / height,
                        hspace=0.08, wspace=0.05)
    return _save(fig, path)


def plot_run(schedule: Schedule | TorchSchedule, ramp: BatchRamp, train_iters: int, path: Path,
             applied: Sequence[dict] = (), title: str = "", *, seq_length: int | None = None) -> Path:
    """PNG of the planned schedule over ``train_iters`` iterations, with ``applied`` points drawn over it,
    and a CSV of the planned points beside it (``consumed_tokens`` when ``seq_length`` is given).
    ``schedule`` is the one in force after a resume (``scheduler.schedule``), not the config's, so the
    two agree under use-checkpoint, branch or extend."""
    plt = _pyplot()
    c = curve(schedule, ramp, train_iters, seq_length=seq_length)
    fig, (ax_lr, ax_wd) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
    _shade(ax_lr, c.phases, "iteration", labels=True)
    ax_lr.plot(c.iterations, c.lr, label="planned lr", color="C0")
    ax_wd.plot(c.iterations, c.wd, label="planned weight decay", color="C1")
    if applied:
        its = [a["iteration"] for a in applied]
        ax_lr.scatter(its, [a["lr"] for a in applied], s=12, color="C3", label="applied lr", zorder=3)
        ax_wd.scatter(its, [a["weight_decay"] for a in applied], s=12, color="C3", label="applied wd",
                      zorder=3)
    ax_lr.set_ylabel("learning rate")
    ax_wd.set_ylabel("weight decay")
    ax_wd.set_xlabel("iteration")
    style = schedule.class_name if isinstance(schedule, TorchSchedule) else schedule.lr_decay_style
    ax_lr.set_title(title or f"{style} schedule, {train_iters} iterations")
    _notes(ax_lr, [c])
    ax_lr.legend(loc="upper right")
    ax_wd.legend(loc="lower right")
    fig.tight_layout()
    write_csv([c], path.with_suffix(".csv"))  # the planned values drawn, to check against the applied ones
    return _save(fig, path)


def _pyplot():
    # A first import in a fresh environment builds matplotlib's font cache and logs "generated new
    # fontManager" at INFO, which a run's log (INFO and up) would carry: keep only its warnings.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def output_path(name: str, folder: str = "") -> Path:
    """Where a figure goes when no path is given: Hydra's run directory when launched through Hydra,
    else ``outputs/<folder>/<name>`` under the working directory (git ignores ``outputs/``)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / name
    return Path("outputs") / folder / name


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _span(phase: Phase, unit: str) -> tuple[float, float]:
    if unit == "iteration":
        return phase.start_iteration, phase.end_iteration
    return phase.start_samples, phase.end_samples


def _shade(ax, spans: Sequence[Phase], unit: str, labels: bool) -> None:
    total = _span(spans[-1], unit)[1] or 1
    for phase in spans:
        lo, hi = _span(phase, unit)
        ax.axvspan(lo, hi, color=PHASE_COLORS.get(phase.name, OTHER_PHASE_COLOR), alpha=0.7, lw=0)
        if not labels:
            continue
        if (hi - lo) / total > 0.08:
            ax.text((lo + hi) / 2, 0.03, phase.name, transform=ax.get_xaxis_transform(), ha="center",
                    fontsize=9)
        elif phase is not spans[-1]:  # too narrow to hold its name: mark where it ends
            ax.text(hi, 0.97, f" {phase.name} ends", transform=ax.get_xaxis_transform(), rotation=90,
                    va="top", ha="left", fontsize=8, color="0.35")


def _boundaries(ax, spans: Sequence[Phase], unit: str, color: str) -> None:
    for phase in spans[1:]:
        ax.axvline(_span(phase, unit)[0], color=color, ls="--", lw=0.9, alpha=0.8)


def _tokens_axis(ax, curves: Sequence[Curve]) -> None:
    """Consumed tokens along the top of the samples panel, when every curve has the same sequence length."""
    lengths = {c.seq_length for c in curves}
    if len(lengths) != 1 or None in lengths:
        return
    from matplotlib.ticker import EngFormatter

    seq = lengths.pop()
    top = ax.secondary_xaxis("top", functions=(lambda s: s * seq, lambda t: t / seq))
    top.set_xlabel(f"consumed tokens ({seq} per sample)")
    top.xaxis.set_major_formatter(EngFormatter(sep=""))


def _notes(ax, curves: Sequence[Curve]) -> None:
    """Each curve's note in a box in the middle of the lr panel."""
    labelled = len(curves) > 1
    text = "\n".join(f"{c.label + ': ' if c.label and labelled else ''}{c.note}" for c in curves if c.note)
    if text:
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.2",
                bbox={"boxstyle": "round", "facecolor": "#fff6d5", "edgecolor": "0.6"})


def _phase_legend(fig, spans: Sequence[Phase], title: str | None, *, ncol: int, loc: str,
                  anchor: tuple[float, float]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=PHASE_COLORS.get(p.name, OTHER_PHASE_COLOR),
                     label=f"{p.name}: iterations {p.start_iteration:,}–{p.end_iteration:,}, "
                     f"samples {p.start_samples:,.0f}–{p.end_samples:,.0f}")
               for p in spans]
    fig.legend(handles=handles, loc=loc, bbox_to_anchor=anchor, ncol=ncol, fontsize=8, frameon=False,
               title=title, title_fontsize=8)


def plot_resume(trained: Sequence[dict], to_come: Curve, at_iteration: int, path: Path, *, kind: str = "resume",
                title: str = "") -> Path:
    """PNG of a resume or a branch: the lr and wd already applied (``trained``: metrics records of the
    parent runs) and the ones to come (``to_come``), with the resume or branch point marked."""
    plt = _pyplot()
    fig, (ax_lr, ax_wd) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
    for ax, key, name in ((ax_lr, "lr", "lr"), (ax_wd, "wd", "weight_decay")):
        if trained:
            ax.plot([r["iteration"] for r in trained], [r[name] for r in trained], color="0.35", lw=1.6,
                    label="trained (parent metrics.jsonl)")
        joined = trained[-1:]  # the line to come starts at the last trained point
        ax.plot([r["iteration"] for r in joined] + to_come.iterations, [r[name] for r in joined] + getattr(to_come, key),
                color="C0", lw=1.6, label=to_come.label or "to come")
        ax.axvline(at_iteration, color="C3", ls="--", lw=1)
        ax.grid(alpha=0.3, lw=0.5)
    ax_lr.text(at_iteration, 0.97, f" {kind} point: iteration {at_iteration:,}",
               transform=ax_lr.get_xaxis_transform(), va="top", ha="left", fontsize=8, color="C3")
    ax_lr.set_ylabel("learning rate")
    ax_wd.set_ylabel("weight decay")
    ax_wd.set_xlabel("iteration")
    ax_lr.set_title(title or f"{kind} preview")
    ax_lr.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    write_csv([to_come], path.with_suffix(".csv"))
    return _save(fig, path)
