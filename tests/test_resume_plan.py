"""``anneal.resume.plan_resume``: the decisions made from a checkpoint's state.json, before anything is built."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from anneal.checkpoint import files

from anneal.config.compose import load
from anneal.errors import ConfigError
from anneal.resume import plan_resume
from anneal_testing import run_cli

BASE = ["scheduler=wsd", "scheduler.lr_warmup_iters=3", "scheduler.lr_wsd_decay_iters=4", "train.train_iters=20",
        "train.global_batch_size=8", "train.micro_batch_size=4", "model.seq_length=32"]


def _checkpoint(save: Path, iteration: int, overrides: list[str] = (), lineage: dict | None = None) -> Path:
    """A checkpoint's state.json as the checkpointer writes it (no tensors: the plan reads only this)."""
    derived = load([*BASE, *overrides]).validate()
    state = {**asdict(derived.schedule), "num_steps": iteration * 8,
             "param_group_bounds": [{"max_lr": 3e-3, "min_lr": 0.0}] * 2}
    path = save / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    meta = {"train": {"iteration": iteration, "consumed_samples": iteration * 8, "skipped_iters": 0},
            "scheduler": state, "lineage": lineage or {"kind": "root"}}
    (path / "state.json").write_text(json.dumps(meta))
    files.write_manifest(path)  # the plan checks state.json against it
    (save / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return path


def _plan(*overrides: str):
    cfg = load([*BASE, *overrides])
    return plan_resume(cfg, cfg.validate())


def test_a_branch_plans_the_anneal_and_the_end_at_n_plus_k(tmp_path: Path) -> None:
    parent = _checkpoint(tmp_path / "parent", 10)
    plan = _plan(f"checkpoint.load={parent}", f"checkpoint.save={tmp_path / 'b'}", "scheduler.anneal_branch_iters=6")
    assert plan.kind == "branch" and plan.resume_mode == "branch"
    assert (plan.derived.train_iters, plan.derived.train_samples) == (16, 128)
    assert (plan.derived.schedule.lr_decay_steps, plan.derived.schedule.wsd_decay_steps) == (128, 48)
    assert plan.lineage["parent"] == str(parent) and plan.lineage["branch_iteration"] == 10


def test_a_branch_resumes_from_its_own_latest_checkpoint(tmp_path: Path) -> None:
    parent = _checkpoint(tmp_path / "parent", 10)
    first = _plan(f"checkpoint.load={parent}", f"checkpoint.save={tmp_path / 'b'}", "scheduler.anneal_branch_iters=6")
    own = _checkpoint(tmp_path / "b", 12, lineage=first.lineage)
    state = json.loads((own / "state.json").read_text())
    state["scheduler"].update(asdict(first.derived.schedule))
    (own / "state.json").write_text(json.dumps(state))
    files.write_manifest(own)
    plan = _plan(f"checkpoint.load={parent}", f"checkpoint.save={tmp_path / 'b'}", "scheduler.anneal_branch_iters=6")
    assert plan.checkpoint == own and plan.derived.train_iters == 16
    assert plan.derived.schedule == first.derived.schedule and "resuming the anneal branch" in plan.lines[0]


@pytest.mark.parametrize("overrides,message", [
    (["scheduler.anneal_branch_iters=6"], "scheduler.anneal_branch_iters (6) needs checkpoint.load"),
    (["scheduler.anneal_branch_iters=6", "checkpoint.load={parent}", "checkpoint.save={save}"],
     "must be a new directory for the branch, not the parent's"),
    (["scheduler.anneal_branch_iters=6", "checkpoint.load={save}/iter_0000002", "checkpoint.save={tmp}/b"],
     "is in the warmup"),
])
def test_a_branch_that_cannot_run_is_refused_before_anything_is_built(tmp_path: Path, overrides, message) -> None:
    save = tmp_path / "parent"
    _checkpoint(save, 2)
    parent = _checkpoint(save, 10)
    filled = [o.format(parent=parent, save=save, tmp=tmp_path) for o in overrides]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _plan(*filled)


def test_a_changed_lr_is_not_an_extension(tmp_path: Path) -> None:
    parent = _checkpoint(tmp_path / "parent", 10)
    plan = _plan(f"checkpoint.load={parent}", "train.train_iters=30", "optimizer.lr=1e-3")
    assert plan.kind == "resume"  # the scheduler's strict rule reports the mismatch


def test_an_extension_keeps_the_checkpoints_weight_decay_ramp(tmp_path: Path) -> None:
    wd = ["scheduler.weight_decay_incr_style=linear", "scheduler.start_weight_decay=0.0",
          "scheduler.end_weight_decay=0.1"]
    parent = _checkpoint(tmp_path / "parent", 10, wd)
    plan = _plan(f"checkpoint.load={parent}", "train.train_iters=30", *wd)
    assert plan.kind == "extend" and plan.derived.train_iters == 30
    assert plan.derived.schedule.wd_incr_steps == 160 and plan.derived.schedule.lr_decay_steps == 240
    assert any("linear ramp continues unchanged" in line for line in plan.lines)


def test_resuming_a_branch_with_another_length_is_refused(tmp_path: Path) -> None:
    parent = _checkpoint(tmp_path / "parent", 10)
    first = _plan(f"checkpoint.load={parent}", f"checkpoint.save={tmp_path / 'b'}", "scheduler.anneal_branch_iters=6")
    _checkpoint(tmp_path / "b", 12, lineage=first.lineage)
    with pytest.raises(ConfigError, match=r"scheduler.anneal_branch_iters \(8\) differs from the branch's own \(6\)"):
        _plan(f"checkpoint.load={parent}", f"checkpoint.save={tmp_path / 'b'}", "scheduler.anneal_branch_iters=8")


def test_a_checkpoints_lineage_reads_only_a_metrics_jsonl_and_only_its_records(tmp_path: Path) -> None:
    """The lineage names files by path (it is data): another file is not read, and lines that are not
    records are skipped instead of failing the preview."""
    from anneal.resume_preview import trained_history

    secret = tmp_path / "id_rsa"
    secret.write_text('{"iteration": 1, "lr": "a secret"}\n')
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 1, "lr": 0.1}\nnot json\n[2]\n{"iteration": "2", "lr": 0.2}\n'
                       '{"iteration": 3, "lr": 0.3}\n')
    meta = {"train": {"iteration": 3}, "lineage": {"kind": "root", "metrics": str(secret)}}
    assert trained_history(meta) == []
    meta["lineage"]["metrics"] = str(metrics)
    assert [r["lr"] for r in trained_history(meta)] == [0.1, 0.3]


def test_branch_dry_run_tables_show_the_schedule_that_will_run(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "ck" / "parent", 20, ["train.train_iters=40"])  # anneal at [288, 320) samples
    result = run_cli(*BASE, "train.train_iters=40", "checkpoint.load=ck/parent/iter_0000020",
                     "checkpoint.save=ck/b20", "scheduler.anneal_branch_iters=5", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    derived = result.stdout[result.stdout.index("# derived"):result.stdout.index("# plan")]
    rows = {line[:28].strip(): line[28:].split() for line in derived.splitlines()}
    assert rows["stable end / anneal start"][:2] == ["20", "160"]  # the branch point
    assert rows["decay end"][:2] == rows["end of training"][:2] == ["25", "200"]
    assert "anneal [160, 200)" in derived  # the data table follows the same schedule
    assert "the run ends at iteration 25" in result.stdout and not (tmp_path / "ck" / "b20").exists()


def test_a_refused_extend_leaves_no_save_directory(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "parent", 18)  # in the anneal, which starts at iteration 16
    result = run_cli(*BASE, f"checkpoint.load={tmp_path / 'parent' / 'iter_0000018'}",
                     f"checkpoint.save={tmp_path / 'new'}", "train.train_iters=30", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("anneal: error: train.train_iters (30): cannot extend the run")
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "new").exists()
