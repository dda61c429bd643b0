"""Schedule plots: the planned lr and wd over a run, phases shaded, applied values drawn over them.

The curves come from ``anneal.scheduler``'s pure functions, the ones the parity test checks.
matplotlib is imported when a plot is drawn, never at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anneal.config.batch import BatchRamp
from anneal.scheduler.schedule import Schedule, lr_at, phases, wd_at


def planned(schedule: Schedule, ramp: BatchRamp, iterations: Sequence[int]) -> tuple[list[float], list[float]]:
    """lr and wd applied during each iteration k (the scheduler's value after k - 1 iterations)."""
    lrs, wds = [], []
    for k in iterations:
        steps = ramp.samples_after(max(k - 1, 0))
        lrs.append(lr_at(schedule, steps, schedule.max_lr, schedule.min_lr))
        wds.append(wd_at(schedule, steps, schedule.start_wd, schedule.end_wd))
    return lrs, wds


def plot_run(schedule: Schedule, ramp: BatchRamp, train_iters: int, path: Path,
             applied: Sequence[dict] = (), title: str = "") -> Path:
    """PNG of the planned schedule over ``train_iters`` iterations, with ``applied`` points drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, train_iters // 2000)
    iterations = list(range(1, train_iters + 1, step)) + [train_iters]
    lrs, wds = planned(schedule, ramp, iterations)
    fig, (ax_lr, ax_wd) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
    _shade_phases(ax_lr, schedule, ramp)
    ax_lr.plot(iterations, lrs, label="planned lr", color="C0")
    ax_wd.plot(iterations, wds, label="planned weight decay", color="C1")
    if applied:
        its = [a["iteration"] for a in applied]
        ax_lr.scatter(its, [a["lr"] for a in applied], s=12, color="C3", label="applied lr", zorder=3)
        ax_wd.scatter(its, [a["weight_decay"] for a in applied], s=12, color="C3", label="applied wd", zorder=3)
    ax_lr.set_ylabel("learning rate")
    ax_wd.set_ylabel("weight decay")
    ax_wd.set_xlabel("iteration")
    ax_lr.set_title(title or f"{schedule.lr_decay_style} schedule, {train_iters} iterations")
    ax_lr.legend(loc="upper right")
    ax_wd.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shade_phases(ax, schedule: Schedule, ramp: BatchRamp) -> None:
    p = phases(schedule)
    warm, anneal, end = (ramp.iterations_for(x) for x in (p.warmup_end, p.anneal_start, p.decay_end))
    spans = [("warmup", 0, warm, "#fde0c5"), ("stable", warm, anneal, "#d8ecd4"), ("decay", anneal, end, "#d6e2f5")]
    for label, lo, hi, color in spans:
        if hi > lo:
            ax.axvspan(lo, hi, color=color, alpha=0.6, lw=0)
            ax.text((lo + hi) / 2, 0.02, label, transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
