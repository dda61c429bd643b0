"""Each torch schedule of the family trains through scripts/pretrain.py and resumes exactly from a checkpoint.

Per schedule, two runs in two processes: an 8-iteration run that saves at iteration 4 and goes on (the
uninterrupted reference), and a run that loads that checkpoint and trains 5..8. Evaluations come at
3 and 6, so the checkpoint at 4 holds ReduceLROnPlateau's state after the evaluation at 3. The
runs are Hydra sweeps (``-m scheduler=...``, one job per schedule): half the family per process, so
four processes in all (two at a time on two cores) instead of one per run. Each schedule's shrunk
values are written into a copy of ``conf/scheduler/<name>.yaml`` under ``--config-path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anneal_testing import CONF, ROOT
from anneal_testing import metrics_by_iteration as _records

pytestmark = pytest.mark.slow

RUN = ["model.num_layers=1", "model.seq_length=32", "train.train_iters=8", "train.global_batch_size=4",
       "train.micro_batch_size=2", "logger.log_interval=1", "train.eval_interval=3", "train.eval_iters=1",
       "logger.plot_schedule=false", "dataset=mock", "dataset.mock_num_tokens=65536"]
# Each shipped schedule, shrunk so that it moves within 8 iterations.
FAMILY = {
    "multistep": ["scheduler.warmup_iters=2", "scheduler.kwargs.milestones=[2,4]"],
    "exponential": ["scheduler.warmup_iters=2", "scheduler.kwargs.gamma=0.8"],
    "cyclic_triangular": ["scheduler.kwargs.step_size_up=2"],
    "cyclic_triangular2": ["scheduler.kwargs.step_size_up=2"],
    "cyclic_exp_range": ["scheduler.kwargs.step_size_up=2", "scheduler.kwargs.gamma=0.9"],
    "onecycle": [],
    "cosine_warmup": ["scheduler.warmup_iters=2"],
    # Any validation loss short of halving counts as no improvement: the lr halves at the evaluation at 6.
    "plateau": ["scheduler.warmup_iters=2", "scheduler.kwargs.patience=0", "scheduler.kwargs.threshold=0.5"],
    "exponential_warmup_multistep": ["scheduler.warmup_iters=3", "scheduler.kwargs.milestones=[2,4]"],
}
KEYS = ("lr", "weight_decay", "scheduler_num_steps", "loss", "grad_norm")


def _conf_with_the_shrunk_family(root: Path) -> Path:
    """A copy of the shipped conf/ whose ``scheduler/<name>.yaml`` hold ``FAMILY[name]``'s values."""
    from omegaconf import OmegaConf

    conf = root / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("__pycache__"))
    for name, overrides in FAMILY.items():
        path = conf / "scheduler" / f"{name}.yaml"
        shrunk = OmegaConf.from_dotlist([o.removeprefix("scheduler.") for o in overrides])
        OmegaConf.save(OmegaConf.merge(OmegaConf.load(path), shrunk), path)
    return conf


def _sweep(conf: Path, sweep_dir: Path, names: list[str], *overrides: str) -> None:
    """One process, one Hydra job per schedule, each in ``sweep_dir/<name>``."""
    dropped = ("ANNEAL_FAULT", "ANNEAL_FULL_ERROR", "HYDRA_FULL_ERROR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    args = ["--config-path", str(conf), "-m", f"scheduler={','.join(names)}", *RUN, *overrides,
            f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.runtime.choices.scheduler}"]
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args]
    result = subprocess.run(cmd, cwd=sweep_dir.parent, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("family")
    conf = _conf_with_the_shrunk_family(root)

    def pair(names: list[str]) -> None:
        # The plot is drawn by every job (the plateau test reads its own); the checkpoint in each job's dir.
        _sweep(conf, root / "straight", names, "logger.plot_schedule=true",
               "checkpoint.save=${hydra:runtime.output_dir}/ck", "checkpoint.save_interval=4")
        _sweep(conf, root / "resumed", names,
               f"checkpoint.load={root / 'straight'}/${{hydra:runtime.choices.scheduler}}/ck/iter_0000004")

    names = list(FAMILY)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(pair, [names[::2], names[1::2]]))
    return {name: {"straight": _records(root / "straight" / name),
                   "resumed": _records(root / "resumed" / name),
                   "log": (root / "resumed" / name / "pretrain.log").read_text(),
                   "dir": root / "straight" / name} for name in FAMILY}


@pytest.mark.parametrize("name", FAMILY)
def test_schedule_trains_and_resumes_to_the_uninterrupted_lrs(runs: dict, name: str) -> None:
    straight, resumed = runs[name]["straight"], runs[name]["resumed"]
    assert sorted(straight) == list(range(1, 9)) and sorted(resumed) == [5, 6, 7, 8]
    assert "resumed from" in runs[name]["log"] and "(strict mode)" in runs[name]["log"]
    for it in resumed:
        assert [resumed[it][k] for k in KEYS] == [straight[it][k] for k in KEYS], f"iteration {it} differs"
    assert len({straight[it]["lr"] for it in straight}) >= 3, "the schedule should move within the run"


@pytest.mark.parametrize("name", sorted(set(FAMILY) - {"plateau"}))
def test_logged_lr_is_the_previewed_lr(runs: dict, name: str) -> None:
    from anneal.config.compose import load
    from anneal.plot import curve

    cfg = load([*RUN, f"scheduler={name}", *FAMILY[name]])
    derived = cfg.validate()
    c = curve(derived.schedule, derived.ramp, derived.train_iters, points=0)
    assert c.lr == [runs[name]["straight"][it]["lr"] for it in range(1, 9)]


def test_plateau_halves_the_lr_after_a_stalled_evaluation(runs: dict) -> None:
    lrs = {it: r["lr"] for it, r in runs["plateau"]["straight"].items()}
    evaluations = [json.loads(line) for line in (runs["plateau"]["dir"] / "metrics.jsonl")
                   .read_text().splitlines() if "valid_loss" in line]
    assert [e["iteration"] for e in evaluations] == [3, 6, 8]  # and the final one, which steps nothing
    assert lrs[3] == lrs[4] == lrs[5] == lrs[6]  # warmup over; the evaluation at 3 sets the best loss
    assert lrs[7] == lrs[6] * 0.5 == lrs[8]  # the one at 6 did not halve the loss: the lr is halved
    assert (runs["plateau"]["dir"] / "schedule.png").stat().st_size > 10_000
