"""``anneal-plot-schedule`` / ``scripts/plot_schedule.py``: preview lr and weight decay before training.

The config is composed and validated as the launcher does (same overrides, same one-line errors),
then the scheduler's own ``lr_at`` / ``wd_at`` are drawn against iterations and consumed samples, the
phases shaded, to a PNG and a CSV of the same points. A ``torch.optim.lr_scheduler`` schedule
(``scheduler=multistep``, ``onecycle``, ...) is drawn by stepping the real torch scheduler every
iteration; ReduceLROnPlateau's is flat after the warmup, with a note that it follows the validation loss:

    anneal-plot-schedule recipe=qwen3_4b                  # outputs/schedules/schedule.png and .csv
    anneal-plot-schedule recipe=qwen3_4b --compare scheduler=cosine       # a second curve on top
    anneal-plot-schedule --compare scheduler=wsd --compare scheduler=cosine   # two curves, no base one
    anneal-plot-schedule -m recipe=qwen3_4b scheduler.lr_wsd_decay_style=minus_sqrt,linear,exponential
    anneal-plot-schedule recipe=tiny --out plots/tiny.png --points 0      # every iteration in the CSV
    anneal-plot-schedule scheduler=wsd train.train_iters=100000 --branch 20000:2000 --branch 40000:4000

``--branch N:K`` adds an anneal branch of the first curve: from iteration N, a K-iteration anneal
(``scheduler.anneal_branch_iters=K`` from that checkpoint), drawn from N on.

``--compare "A B"`` adds a curve composed from the base overrides plus ``A B`` (with no base overrides,
the ``--compare`` curves are the only ones); ``-m`` expands Hydra
sweeps (``a,b``, ``range(...)``) into one curve per combination, drawn on the same plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shlex
import sys
from pathlib import Path

from anneal.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from anneal.cli.pretrain import fail

    try:
        runs = expand(args.overrides, args.compare, multirun=args.multirun)
        curves = [load_curve(label, overrides, args.points) for label, overrides in runs]
        if args.branch:  # the first curve is the parent of every branch
            curves[0] = dataclasses.replace(curves[0], label=f"parent ({curves[0].label})" if len(runs) > 1 else "parent")
        curves += [load_branch(runs[0][1], text, args.points) for text in args.branch]
    except ConfigError as error:
        fail(error)
    from anneal.plot import output_path, plot_schedules, write_csv

    out = Path(args.out) if args.out else output_path("schedule.png", "schedules")
    png = plot_schedules(curves, out, title=args.title or _title(runs))
    table = write_csv(curves, png.with_suffix(".csv"))
    print(f"wrote {png} and {table} ({_count(len(runs), 'configuration')}"
          f"{', ' + _count(len(args.branch), 'branch') if args.branch else ''})")


def expand(overrides: list[str], compare: list[str], *, multirun: bool) -> list[tuple[str, list[str]]]:
    """(label, overrides) for every curve: each sweep combination (``-m``), then each ``--compare``.
    Without base overrides, ``--compare`` curves are the only ones: ``--compare A --compare B`` draws two."""
    if compare and not overrides:
        return [(extra, shlex.split(extra)) for extra in compare]
    choices = _sweep_choices(overrides)
    swept = [i for i, options in enumerate(choices) if len(options) > 1]
    if swept and not multirun:
        raise ConfigError(f"{overrides[swept[0]]} is a sweep: add -m to draw one curve per value")
    runs = []
    for combination in itertools.product(*choices):
        label = " ".join(combination[i] for i in swept) or " ".join(combination) or "default"
        runs.append((label, list(combination)))
    runs += [(extra, runs[0][1] + shlex.split(extra)) for extra in compare]
    return runs


def load_curve(label: str, overrides: list[str], points: int):
    from anneal.config.compose import load
    from anneal.plot import curve

    cfg = load(overrides)
    derived = cfg.validate()
    return curve(derived.schedule, derived.ramp, derived.train_iters, label=label,
                 seq_length=cfg.model.seq_length, points=points)


def load_branch(overrides: list[str], text: str, points: int):
    """The anneal branch ``N:K`` of the configuration composed from ``overrides``."""
    from anneal.config.compose import load
    from anneal.plot import branch_curve
    from anneal.scheduler.schedule import Schedule

    at, _, k = text.partition(":")
    if not (at.isdigit() and k.isdigit() and int(k) > 0):
        raise ConfigError(f"--branch ({text!r}) must be N:K, iterations: branch at N, anneal over K > 0")
    cfg = load(overrides)
    derived = cfg.validate()
    if not isinstance(derived.schedule, Schedule):
        raise ConfigError(f"--branch ({text}) needs Megatron's schedules (scheduler.lr_decay_style), not a torch one")
    return branch_curve(derived.schedule, derived.ramp, int(at), int(k), cfg.scheduler.lr_wsd_decay_style,
                        seq_length=cfg.model.seq_length, points=points)


def _sweep_choices(overrides: list[str]) -> list[list[str]]:
    """Each override as the list of single overrides it sweeps over (one element when not a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:  # Hydra's parse errors; all are user input here
        raise ConfigError(f"cannot parse the overrides: {str(error).splitlines()[0]}") from error
    choices = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return choices


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('h') else 's'}"


def _title(runs: list[tuple[str, list[str]]]) -> str:
    if len(runs) == 1:
        return f"planned lr and weight decay: {runs[0][0]}"
    return f"planned lr and weight decay: {len(runs)} configurations"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anneal-plot-schedule", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for scripts/pretrain.py")
    parser.add_argument("--compare", action="append", default=[], metavar="OVERRIDES",
                        help="another curve: the base overrides plus these (quoted, space-separated); "
                             "repeatable")
    parser.add_argument("--branch", action="append", default=[], metavar="N:K",
                        help="an anneal branch of the first curve from iteration N over K iterations; repeatable")
    parser.add_argument("-m", "--multirun", action="store_true", help="one curve per combination of sweeps")
    parser.add_argument("--out", default=None,
                        help="PNG path; the CSV goes next to it (default: outputs/schedules/schedule.png)")
    parser.add_argument("--points", type=int, default=2000,
                        help="iterations sampled per curve, phase boundaries added; 0: every iteration "
                             "(default: %(default)s)")
    parser.add_argument("--title", default="", help="plot title")
    return parser


if __name__ == "__main__":
    main()
