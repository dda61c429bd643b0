"""Anneal branches, extensions and the resume preview through the real entry point (scripts/pretrain.py).

One parent run (WSD, 20 iterations, anneal over the last 4, cosine weight-decay increment) saves every
5 iterations; the branches start from its checkpoints and must equal one Megatron run built with the
branch's arguments, leave the parent's files untouched, resume exactly after SIGKILL, branch again.
The runs from the parent's checkpoints share nothing, so they run three at a time (``from_parent``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anneal_testing import ROOT, metrics_by_iteration

pytestmark = pytest.mark.slow

try:  # the real Megatron-Core when installed; else anneal's class, held to Megatron by the golden tests
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler as Megatron
except Exception:
    from anneal.scheduler import OptimizerParamScheduler as Megatron

GBS = 8
RUN = ["model.num_layers=1", "model.seq_length=32", f"train.global_batch_size={GBS}", "train.micro_batch_size=4",
       "scheduler=wsd", "scheduler.lr_warmup_iters=3", "scheduler.lr_wsd_decay_iters=4",
       "scheduler.weight_decay_incr_style=cosine", "scheduler.start_weight_decay=0.01",
       "scheduler.end_weight_decay=0.1", "logger.log_interval=1", "train.eval_interval=null",
       "logger.plot_schedule=false", "train.train_iters=20"]
LR, MIN_LR = 3e-3, 0.0  # optimizer=adam's lr and min_lr
PARENT_ARGS = dict(init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=3 * GBS, lr_decay_steps=20 * GBS,
                   lr_decay_style="WSD", start_wd=0.01, end_wd=0.1, wd_incr_steps=20 * GBS, wd_incr_style="cosine",
                   wsd_decay_steps=4 * GBS, lr_wsd_decay_style="minus_sqrt")


def _pretrain(run_dir: Path, *overrides: str, fault: str | None = None, cwd: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k != "ANNEAL_FAULT"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **({"ANNEAL_FAULT": fault} if fault else {})})
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *RUN, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=cwd or run_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _megatron(args: dict, iterations: int) -> dict[int, tuple[float, float]]:
    """(lr, wd) Megatron's scheduler applies in iterations 1..``iterations`` (one param group, as metrics log)."""
    class Groups:
        param_groups = [{"max_lr": args["max_lr"], "min_lr": args["min_lr"]}]

    sched = Megatron(Groups(), **args, use_checkpoint_opt_param_scheduler=False)
    applied = {}
    for it in range(1, iterations + 1):
        applied[it] = (Groups.param_groups[0]["lr"], sched.get_wd())
        sched.step(GBS)
    return applied


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("branches")
    _ok(_pretrain(root / "parent_run", f"checkpoint.save={root / 'parent'}", "checkpoint.save_interval=5"))
    return {"root": root, "save": root / "parent", "hashes": _hashes(root / "parent")}


ANNEAL_6 = ["scheduler.anneal_branch_iters=6", "scheduler.lr_wsd_decay_style=linear"]


@pytest.fixture(scope="module")
def from_parent(parent) -> dict[str, tuple[Path, list[subprocess.CompletedProcess]]]:
    """The runs that start from the parent's checkpoints, three at a time (one core each): they share nothing.

    Each in its own directory ``root/<name>`` (``run/``, ``ck/``), with its results in order.
    """
    at_10 = f"checkpoint.load={parent['save'] / 'iter_0000010'}"

    def killed_and_resumed(d: Path) -> list[subprocess.CompletedProcess]:
        cmd = [at_10, f"checkpoint.save={d / 'b10'}", "checkpoint.save_interval=2", *ANNEAL_6]
        killed = _pretrain(d / "run", *cmd, fault="kill_at_iteration:14")
        return [killed, _pretrain(d / "run", *cmd)]  # the same command: the branch resumes from its own

    runs = {
        "branch": lambda d: [_pretrain(d / "run", at_10, f"checkpoint.save={d / 'b10'}",
                                       "checkpoint.save_interval=2", *ANNEAL_6)],
        "killed": killed_and_resumed,
        "extend": lambda d: [_pretrain(d / "run", at_10, f"checkpoint.save={d / 'ck'}",
                                       "train.train_iters=24", "train.exit_interval=11")],
        "refused": lambda d: [_pretrain(d / "run", f"checkpoint.load={parent['save']}",
                                        f"checkpoint.save={d / 'ck'}", "train.train_iters=30")],
        "dry_run": lambda d: [_pretrain(d / "run", "dry_run=true", at_10, f"checkpoint.save={d / 'ck'}",
                                        "scheduler.anneal_branch_iters=6", cwd=d)],
        "plot": lambda d: [_pretrain(d / "run", at_10, f"checkpoint.save={d / 'ck'}", "optimizer.lr=1e-3",
                                     "scheduler.use_checkpoint_opt_param_scheduler=true",
                                     "logger.plot_schedule=true")],
    }

    def launch(name: str) -> tuple[Path, list[subprocess.CompletedProcess]]:
        d = parent["root"] / name
        d.mkdir()
        return d, runs[name](d)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(runs, pool.map(launch, runs)))


@pytest.fixture(scope="module")
def branch(from_parent) -> dict:
    d, (result,) = from_parent["branch"]
    _ok(result)
    return {"save": d / "b10", "records": metrics_by_iteration(d / "run"), "stdout": result.stdout,
            "run": d / "run"}


def test_branch_equals_one_megatron_run_and_records_its_lineage(parent, branch) -> None:
    # Megatron's arguments for the equivalent single run (steps are samples): decay and run end at
    # N + K = 16 iterations, the anneal over the last K = 6, the parent's warmup and its cosine
    # weight-decay increment over the parent's 20 iterations. Megatron-LM flags: --train-iters 16
    # --lr-decay-iters 16 --lr-wsd-decay-iters 6 --lr-decay-style WSD --lr-wsd-decay-style linear
    # --lr-warmup-iters 3 --weight-decay-incr-style cosine (with wd_incr_steps the parent's 20 x 8).
    args = dict(init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=3 * GBS, lr_decay_steps=16 * GBS,
                lr_decay_style="WSD", start_wd=0.01, end_wd=0.1, wd_incr_steps=20 * GBS, wd_incr_style="cosine",
                wsd_decay_steps=6 * GBS, lr_wsd_decay_style="linear")
    reference = _megatron(args, 16)
    records = branch["records"]
    assert sorted(records) == list(range(11, 17))
    assert {it: (r["lr"], r["weight_decay"]) for it, r in records.items()} == {it: reference[it] for it in records}
    assert records[16]["lr"] < records[11]["lr"] == LR
    state = json.loads((branch["save"] / "iter_0000016" / "state.json").read_text())
    lineage = state["lineage"]
    assert lineage["kind"] == "branch" and lineage["branch_iteration"] == 10 and lineage["end_iteration"] == 16
    assert lineage["parent"] == str(parent["save"] / "iter_0000010")
    assert lineage["schedule_after"] == args and lineage["schedule_before"]["lr_decay_steps"] == 20 * GBS
    assert json.loads((branch["run"] / "lineage.json").read_text())["parent"] == lineage["parent"]
    assert "anneal branch from" in branch["stdout"] and "branch wins" in branch["stdout"]


def test_branch_of_a_branch_continues_from_the_lr_in_force(parent, branch) -> None:
    root = parent["root"]
    _ok(_pretrain(root / "b12_run", f"checkpoint.load={branch['save'] / 'iter_0000012'}",
                  f"checkpoint.save={root / 'b10_b12'}", "scheduler.anneal_branch_iters=3",
                  "scheduler.lr_wsd_decay_style=cosine"))
    in_force = branch["records"][13]["lr"]  # the lr the first branch applies after its 12th iteration
    args = dict(init_lr=0.0, max_lr=in_force, min_lr=MIN_LR, lr_warmup_steps=3 * GBS, lr_decay_steps=15 * GBS,
                lr_decay_style="WSD", start_wd=0.01, end_wd=0.1, wd_incr_steps=20 * GBS, wd_incr_style="cosine",
                wsd_decay_steps=3 * GBS, lr_wsd_decay_style="cosine")
    reference = _megatron(args, 15)
    records = metrics_by_iteration(root / "b12_run")
    assert {it: (r["lr"], r["weight_decay"]) for it, r in records.items()} == {it: reference[it] for it in (13, 14, 15)}
    lineage = json.loads((root / "b10_b12" / "iter_0000015" / "state.json").read_text())["lineage"]
    assert lineage["parent_lineage"]["kind"] == "branch" and lineage["parent_lineage"]["branch_iteration"] == 10
    assert branch["save"].joinpath("latest_checkpointed_iteration.txt").read_text().strip() == "16"


def test_sigkill_and_resume_of_a_branch_is_bit_identical(from_parent, branch) -> None:
    d, (killed, resumed) = from_parent["killed"]
    assert killed.returncode == -9
    _ok(resumed)
    assert "resuming the anneal branch" in resumed.stdout and "at iteration 12" in resumed.stdout
    records = metrics_by_iteration(d / "run")
    keys = ("loss", "lr", "weight_decay", "grad_norm")
    assert {it: [r[k] for k in keys] for it, r in records.items()} == \
        {it: [r[k] for k in keys] for it, r in branch["records"].items()}


def test_extend_in_the_stable_phase_moves_the_anneal(from_parent) -> None:
    d, (result,) = from_parent["extend"]
    out = _ok(result).stdout
    assert "extending the run in its stable phase (checkpoint at 10 iterations, 80 samples)" in out
    lines = [line.split("] ", 1)[-1] for line in out.splitlines()]  # without the log line's time stamp
    rows = {line.split()[0] + " " + line.split()[1]: line for line in lines
            if line.startswith(("anneal start", "decay end"))}
    assert "it 16 / 128 smp / 4,096 tok" in rows["anneal start"] and "it 20 / 160 smp" in rows["anneal start"]
    assert "it 20 / 160 smp" in rows["decay end"] and "it 24 / 192 smp / 6,144 tok" in rows["decay end"]
    assert "weight decay: the checkpoint's cosine ramp continues unchanged (ends at it 20 / 160 smp" in out
    assert "extend wins" in out
    record = metrics_by_iteration(d / "run")[11]
    assert record["lr"] == LR and record["weight_decay"] == _megatron(PARENT_ARGS, 11)[11][1]


def test_extend_in_the_anneal_is_refused_with_the_branch_command(parent, from_parent) -> None:
    d, (refused,) = from_parent["refused"]
    assert refused.returncode == 2, refused.stdout[-2000:]
    assert "train.train_iters (30): cannot extend the run" in refused.stderr
    assert "the anneal began after 128 samples and the checkpoint is at 160" in refused.stderr
    assert f"checkpoint.load={parent['save'] / 'iter_0000015'}" in refused.stderr
    assert "scheduler.anneal_branch_iters=15" in refused.stderr and not (d / "run" / "metrics.jsonl").exists()
    assert not (d / "ck").exists()  # refused before the save directory is made


def test_dry_run_previews_the_branch_without_writing_a_checkpoint(from_parent) -> None:
    d, (result,) = from_parent["dry_run"]
    _ok(result)
    out = result.stdout[result.stdout.index("# resume"):]
    assert "branch from" in out and "the run ends at iteration 16" in out
    marked = [line for line in out.splitlines() if line.startswith("*")]
    assert {line.split()[1] for line in marked} == {"lr_decay_steps", "wsd_decay_steps"}
    assert all("branch wins" in line for line in marked)
    preview = d / "outputs" / "dry_run"  # not the working directory: git ignores outputs/
    assert f"resume preview: {Path('outputs/dry_run/resume_preview.png')}" in out
    assert (preview / "resume_preview.png").stat().st_size > 10_000 and not (d / "ck").exists()
    assert not (d / "resume_preview.png").exists()
    rows = (preview / "resume_preview.csv").read_text().splitlines()
    assert rows[1].split(",")[1] == "11" and len(rows) == 7  # the part to come: iterations 11..16


def test_end_of_run_plot_draws_the_schedule_in_force_after_use_checkpoint(from_parent) -> None:
    d, (result,) = from_parent["plot"]
    _ok(result)
    applied = metrics_by_iteration(d / "run")
    with (d / "run" / "schedule.csv").open() as f:  # by column name: the columns depend on the curves
        planned = {int(row["iteration"]): float(row["lr"]) for row in csv.DictReader(f)}
    assert planned[11] == applied[11]["lr"] == LR  # the checkpoint's peak, not the config's 1e-3
    assert {it: planned[it] for it in applied} == {it: r["lr"] for it, r in applied.items()}


def test_parent_files_are_unchanged_by_its_branches(parent, branch) -> None:
    assert _hashes(parent["save"]) == parent["hashes"]
