"""``anneal-compare-runs`` / ``scripts/compare_runs.py RUN_DIR ...``: a parent and its branches on one figure.

Each RUN_DIR is a run directory (Hydra's output directory, ``outputs/<date>/<time>/`` or
``hydra.run.dir``): its ``metrics.jsonl`` gives the curves, ``.hydra/config.yaml`` the tokens per
sample (``model.seq_length``) and ``lineage.json`` where a branch started. One panel per quantity
(train loss, ``valid_loss`` and every ``valid_loss/<name>``, every ``eval/<task>/<metric>``), against
tokens, one colour per run; then a table of the final values, ``*`` marking the best run of each column:

    anneal-compare-runs runs/parent_run runs/b20k_run runs/b40k_run --labels parent,b20k,b40k
    anneal-compare-runs outputs/2025-*/* --metrics loss,valid_loss* --output plots/branches.png

Reading a ``metrics.jsonl``:

- **Resumes.** A resumed run appends to the file; a training record whose iteration is not past the
  last one starts a new attempt, and the records of the earlier attempt from that iteration on are
  dropped (a resume after a crash re-logs them). Within an iteration the last value of a key wins.
- **Tokens** are consumed samples x ``model.seq_length``. A record without ``consumed_samples`` (a
  validation or eval record) takes the training record's of the same iteration, else the samples
  interpolated linearly between the nearest logged iterations (iteration 0 is 0 samples; a branch's
  first iteration follows its branch point), past the last one at the last interval's rate.
- **Train loss** is drawn raw and faint, and as a trailing mean of ``--smooth`` logged values; the
  table's final train loss is the mean of the last ``--smooth`` logged values (1: the last value).
"""

from __future__ import annotations

import argparse
import bisect
import fnmatch
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from anneal import exits
from anneal.errors import ConfigError
from anneal.log_format import human

TRAIN = "loss"
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "bits_per_byte", "bpb")  # in an eval metric's name
NO_BEST = ("stderr",)  # columns that are not scores
DEFAULT_SMOOTH = 10  # at most; a short run gets fewer (auto_smooth)
PANEL_COLUMNS = 3


@dataclass(frozen=True)
class Series:
    iterations: tuple[int, ...]
    tokens: tuple[float, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Branch:
    iteration: int
    samples: float
    tokens: float
    parent_metrics: Path | None  # the parent run's metrics.jsonl, as its lineage records it


@dataclass(frozen=True)
class Run:
    label: str
    path: Path
    series: dict[str, Series]
    final_iteration: int
    final_tokens: float
    seq_length: int
    branch: Branch | None = None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.runs:
            raise ConfigError("no run directory given: compare_runs.py RUN_DIR [RUN_DIR ...]")
        if args.smooth is not None and args.smooth < 1:
            raise ConfigError(f"--smooth ({args.smooth}) must be >= 1 (1: raw values)")
        paths = [Path(run) for run in args.runs]
        labels = default_labels(paths) if args.labels is None else args.labels.split(",")
        if len(labels) != len(args.runs):
            raise ConfigError(f"--labels has {len(labels)} labels for {len(args.runs)} run directories")
        runs = [load_run(path, label) for path, label in zip(paths, labels)]
        keys = select_keys(runs, args.metrics.split(",") if args.metrics else None)
    except ConfigError as error:
        exits.report(error)
        return exits.CONFIG
    smooth = args.smooth if args.smooth is not None else auto_smooth(runs)
    print(table(runs, keys, smooth))
    try:
        png = plot_runs(runs, keys, Path(args.output), smooth)
    except OSError as error:  # the table is out; the figure could not be written
        exits.report(f"--output ({args.output!r}): cannot write the figure ({error.strerror})")
        return exits.FAILED
    print(f"wrote {png.resolve()} ({_count(len(runs), 'run')}, {_count(len(keys), 'panel')})")
    return exits.OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare_runs.py", description="Train loss, validation losses and downstream evals of runs (a "
        "parent and its anneal branches) against tokens on one figure, and a table of their final values.")
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
    parser.add_argument("--output", "-o", default="compare_runs.png",
                        help="the figure (default compare_runs.png in the working directory)")
    parser.add_argument("--labels", help="comma-separated, one per RUN_DIR (default: the directories' names)")
    parser.add_argument("--metrics", help="comma-separated keys or patterns to draw, e.g. "
                        "loss,valid_loss*,eval/* (default: every key any run logged)")
    parser.add_argument("--smooth", type=int, default=None,
                        help="train loss: the trailing mean of this many logged values, drawn and tabulated "
                        f"(default: {DEFAULT_SMOOTH}, fewer for short runs; 1: raw)")
    return parser


def auto_smooth(runs: Sequence[Run]) -> int:
    """``DEFAULT_SMOOTH`` logged values, but no more than a twentieth of the longest run's: early in a run the
    loss falls faster than a wide trailing mean can follow (it would lag the raw values by a whole unit)."""
    longest = max(len(run.series[TRAIN].values) if TRAIN in run.series else 0 for run in runs)
    return max(1, min(DEFAULT_SMOOTH, longest // 20))


def default_labels(paths: Sequence[Path]) -> list[str]:
    """Each directory's name, with as many parent names as it takes to tell them apart (Hydra's
    ``outputs/<date>/<time>`` directories can share a time)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [p.name for p in paths]  # one directory given twice


def load_run(path: Path, label: str) -> Run:
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run directory")
    if not metrics.is_file():
        raise ConfigError(f"{path} has no metrics.jsonl: give run directories (Hydra's output directory of "
                          "a run)")
    seq = seq_length(path)
    branch = read_branch(path, seq)
    records = latest_attempt(read_records(metrics))
    known = {0: 0.0} | ({branch.iteration: branch.samples} if branch else {})  # samples after an iteration
    known |= {r["iteration"]: float(r["consumed_samples"]) for r in records
              if _number(r.get("consumed_samples"))}
    if len(known) < 2 or not any(TRAIN in r for r in records):  # tokens need a logged consumed_samples
        raise ConfigError(f"{metrics}: no training records (with {TRAIN!r} and consumed_samples)")
    series = collect(records, lambda it: seq * samples_at(it, known))
    last = series[TRAIN].iterations[-1]
    return Run(label, path, series, last, seq * samples_at(last, known), seq, branch)


def read_records(metrics: Path) -> list[dict]:
    """The JSON records of ``metrics.jsonl`` that name an iteration; anything else than JSON objects, one a
    line, is an error naming the file and line."""
    records, number = [], 0
    with metrics.open(errors="replace") as file:  # a damaged byte fails the JSON parse: file:line
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{metrics}:{number}: not a JSON record ({error.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{metrics}:{number}: not a JSON object ({type(record).__name__})")
            if isinstance(record.get("iteration"), int) and record["iteration"] >= 0:
                records.append(record)
    if not records:
        raise ConfigError(f"{metrics}: no metrics records{' (an empty file)' if number == 0 else ''}")
    return records


def latest_attempt(records: Sequence[dict]) -> list[dict]:
    """The records in force: a training record at or before the last training iteration is a resume, and
    the earlier attempt's records from its iteration on are dropped."""
    kept: list[dict] = []
    last_trained = -1
    for record in records:
        if TRAIN in record:
            if record["iteration"] <= last_trained:
                kept = [r for r in kept if r["iteration"] < record["iteration"]]
            last_trained = record["iteration"]
        kept.append(record)
    return kept


def samples_at(iteration: int, known: Mapping[int, float]) -> float:
    """Consumed samples after ``iteration``: the logged value, else linear between the nearest logged
    iterations, past the last one at the last interval's rate."""
    if iteration in known:
        return known[iteration]
    its = sorted(known)
    i = min(bisect.bisect(its, iteration), len(its) - 1)
    lo, hi = its[i - 1], its[i]
    return known[lo] + (known[hi] - known[lo]) * (iteration - lo) / (hi - lo)


def collect(records: Sequence[dict], tokens_at) -> dict[str, Series]:
    """One series per metric key (train loss, validation losses, evals), by iteration; the last value wins."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if is_metric(key) and _number(value):
                by_key.setdefault(key, {})[record["iteration"]] = float(value)
    return {key: Series(tuple(sorted(points)), tuple(tokens_at(it) for it in sorted(points)),
                        tuple(points[it] for it in sorted(points)))
            for key, points in by_key.items()}


def is_metric(key: str) -> bool:
    return key == TRAIN or key.startswith("valid_loss") or key.startswith("eval/")


def seq_length(run_dir: Path) -> int:
    """``model.seq_length`` of the run's composed config (``.hydra/config.yaml``)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no .hydra/config.yaml: its model.seq_length gives the tokens "
                          "per sample")
    from omegaconf import OmegaConf

    try:
        seq = OmegaConf.select(OmegaConf.load(path), "model.seq_length")
    except Exception as error:  # YAML or interpolation errors: the file is not a config anneal wrote
        raise ConfigError(f"{path}: not a readable config ({type(error).__name__}: {error})") from None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ConfigError(f"{path}: model.seq_length ({seq!r}) must be a positive integer")
    return seq


def read_branch(run_dir: Path, seq: int) -> Branch | None:
    """Where the run branched from its parent, from the ``lineage.json`` the launcher writes (None: a root)."""
    path = run_dir / "lineage.json"
    if not path.is_file():
        return None
    try:
        lineage = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not JSON ({error.msg})") from None
    if not isinstance(lineage, dict) or lineage.get("kind") != "branch":
        return None
    iteration, samples = lineage.get("branch_iteration"), lineage.get("branch_samples")
    if not (isinstance(iteration, int) and isinstance(samples, int)):
        raise ConfigError(f"{path}: a branch without integer branch_iteration and branch_samples")
    parent = (lineage.get("parent_lineage") or {}).get("metrics")
    return Branch(iteration, float(samples), float(samples * seq), Path(parent) if isinstance(parent, str) else None)


def select_keys(runs: Sequence[Run], patterns: Sequence[str] | None) -> list[str]:
    """The keys to draw and tabulate: train loss, validation losses, evals (each group sorted)."""
    present = sorted({key for run in runs for key in run.series}, key=lambda k: (_group(k), k))
    if patterns is None:
        return present
    chosen = [k for k in present if any(fnmatch.fnmatchcase(k, p.strip()) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p.strip()) for k in present)]
    if unmatched:
        raise ConfigError(f"--metrics {unmatched[0]!r} matches no logged key; the runs have: "
                          f"{', '.join(present)}")
    return chosen


def _group(key: str) -> int:
    return 0 if key == TRAIN else 1 if key.startswith("valid_loss") else 2


def lower_is_better(key: str) -> bool:
    metric = key.rsplit("/", 1)[-1]  # eval/<task>/<metric>
    return key == TRAIN or key.startswith("valid_loss") or any(word in metric for word in LOWER_IS_BETTER)


def final_values(run: Run, runs: Sequence[Run], keys: Sequence[str], smooth: int) -> dict[str, float | None]:
    """The last value of each key; the train loss as the mean of the last ``smooth`` logged values (a
    branch shorter than that continues its parent's, when the parent is compared)."""
    values: dict[str, float | None] = {}
    for key in keys:
        if key not in run.series:
            values[key] = None
        elif key == TRAIN:
            values[key] = trailing_means(joined(run, runs, key, smooth - 1)[1], smooth)[-1]
        else:
            values[key] = run.series[key].values[-1]
    return values


def joined(run: Run, runs: Sequence[Run], key: str, lead: int) -> tuple[list[float], list[float], int]:
    """Tokens and values of ``key``: for a branch whose parent is compared, the parent's last ``lead`` + 1
    points up to the branch point (the line starts where it branched), then the run's own; and how many
    of them are the parent's."""
    own = run.series.get(key)
    parent = parent_of(run, runs)
    before = parent.series.get(key) if parent is not None else None
    n = bisect.bisect(before.iterations, run.branch.iteration) if before is not None else 0
    start = max(0, n - lead - 1)
    tokens = [*(before.tokens[start:n] if n else ()), *(own.tokens if own else ())]
    values = [*(before.values[start:n] if n else ()), *(own.values if own else ())]
    return tokens, values, n - start


def trailing_means(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it, of those that are finite (an overflowed
    iteration's inf does not hide the rest); nan where none is."""
    means = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i + 1 - window):i + 1] if math.isfinite(v)]
        means.append(sum(finite) / len(finite) if finite else math.nan)
    return means


def best(finals: Sequence[float | None], key: str) -> int | None:
    """The index of the best finite value (lowest loss, highest score); None for a column that is not a
    score, or with fewer than two values."""
    if any(word in key for word in NO_BEST):
        return None
    sign = 1 if lower_is_better(key) else -1
    scored = [(sign * v, i) for i, v in enumerate(finals) if v is not None and math.isfinite(v)]
    if len(scored) < 2:
        return None
    return min(scored)[1]


def parent_of(run: Run, runs: Sequence[Run]) -> Run | None:
    """The compared run whose metrics.jsonl the branch's lineage names as its parent's."""
    if run.branch is None or run.branch.parent_metrics is None:
        return None
    wanted = run.branch.parent_metrics.resolve()
    return next((r for r in runs if r is not run and (r.path / "metrics.jsonl").resolve() == wanted), None)


def origin(run: Run, runs: Sequence[Run]) -> str:
    if run.branch is None:
        return "root"
    parent = parent_of(run, runs)
    return f"branch {f'of {parent.label} ' if parent else ''}at {run.branch.iteration}"


def table(runs: Sequence[Run], keys: Sequence[str], smooth: int) -> str:
    """Plain text: one row per run, its final iteration, tokens and values; ``*`` marks each column's best."""
    finals = [final_values(run, runs, keys, smooth) for run in runs]
    heads = ["run", "from", "iteration", "tokens", *("train loss" if k == TRAIN else k for k in keys)]
    rows = [[r.label, origin(r, runs), str(r.final_iteration), f"{r.final_tokens:,.0f}"] for r in runs]
    for key in keys:
        column = [f[key] for f in finals]
        winner = best(column, key)
        for i, value in enumerate(column):
            rows[i].append("-" if value is None else f"{value:.4f}" + ("*" if i == winner else " "))
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) if c < 2 else h.rjust(w) for c, (h, w) in enumerate(zip(heads, widths)))]
    lines += ["  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths)))
              for row in rows]
    train = f"the mean of the last {smooth} logged values" if smooth > 1 else "the last logged value"
    lines.append(f"* best of the column (lowest loss, highest eval score); train loss: {train}")
    return "\n".join(lines)


def plot_runs(runs: Sequence[Run], keys: Sequence[str], path: Path, smooth: int) -> Path:
    """One panel per key against tokens, one colour per run; branch points dotted in the branch's colour."""
    from matplotlib.ticker import FuncFormatter

    from anneal.plot import _pyplot, _save

    plt = _pyplot()
    cols = min(PANEL_COLUMNS, len(keys))
    rows = -(-len(keys) // cols)
    legend_in = 0.35 + 0.2 * -(-len(runs) // 2)  # the legend below the panels, two runs a row
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows + legend_in), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, run in enumerate(runs):
            _draw(ax, run, runs, key, f"C{i % 10}", smooth)
        arrow = "↓" if lower_is_better(key) else "↑"
        name = key if key != TRAIN else f"train loss (mean of {smooth})" if smooth > 1 else "train loss"
        ax.set_title(f"{name}  ({arrow} better)", fontsize=10)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human(x)))
        ax.set_xlabel("tokens", fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
        _clip_start(ax, runs, key)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=f"C{i % 10}", lw=2, label=_legend(r, runs)) for i, r in enumerate(runs)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(runs), 2), fontsize=9, frameon=False)
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.07 if cols > 1 else 0.14, right=0.98, top=1 - 0.35 / height,
                        bottom=(legend_in + 0.45) / height, hspace=0.45, wspace=0.22)
    return _save(fig, path)


def _draw(ax, run: Run, runs: Sequence[Run], key: str, color: str, smooth: int) -> None:
    if run.branch is not None:
        ax.axvline(run.branch.tokens, color=color, ls=":", lw=1.2)
    if key not in run.series:
        return
    smoothed = key == TRAIN and smooth > 1
    tokens, values, lead = joined(run, runs, key, smooth - 1 if smoothed else 0)
    values = [v if math.isfinite(v) else math.nan for v in values]
    first = max(lead - 1, 0)  # the parent's point at the branch, where the line starts
    if smoothed:
        ax.plot(tokens[first:], values[first:], color=color, lw=0.7, alpha=0.25)
        ax.plot(tokens[first:], trailing_means(values, smooth)[first:], color=color, lw=1.6)
    else:
        marker = None if key == TRAIN else "o"  # validation and evals: few points, each one shown
        ax.plot(tokens[first:], values[first:], color=color, lw=1.4, marker=marker, ms=3)


def _clip_start(ax, runs: Sequence[Run], key: str) -> None:
    """A loss panel's y range leaves out the first tenth of the tokens (the early loss is an order of
    magnitude above the differences between branches); the other panels keep matplotlib's range."""
    if not lower_is_better(key):
        return
    end = max((s.tokens[-1] for r in runs if (s := r.series.get(key))), default=0)
    later = [v for r in runs if (s := r.series.get(key)) for t, v in zip(s.tokens, s.values)
             if t >= 0.1 * end and math.isfinite(v)]
    if len(later) > 1 and max(later) > min(later):
        margin = 0.05 * (max(later) - min(later))
        ax.set_ylim(min(later) - margin, max(later) + margin)


def _legend(run: Run, runs: Sequence[Run]) -> str:
    if run.branch is None:
        return f"{run.label} ({run.final_iteration:,} iterations)"
    parent = parent_of(run, runs)
    return (f"{run.label}: branch {f'of {parent.label} ' if parent else ''}at iteration {run.branch.iteration:,} "
            f"({human(run.branch.tokens)} tokens), to {run.final_iteration:,}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
