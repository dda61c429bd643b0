"""The real entry point as a subprocess: one process, torchrun with 2 gloo ranks, two torchrun "nodes"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anneal_testing import ROOT, free_port, metrics_by_iteration, run_cli

pytestmark = pytest.mark.slow

SMALL = ["model.num_layers=2", "model.seq_length=64", "train.train_iters=12", "train.global_batch_size=8",
         "train.micro_batch_size=2", "scheduler.lr_warmup_iters=3", "logger.log_interval=1",
         "train.eval_interval=6", "train.eval_iters=1", "logger.plot_schedule=true"]


def _records(run_dir: Path) -> list[dict]:
    return list(metrics_by_iteration(run_dir).values())


def _torchrun(args: list[str], cwd: Path, *, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _planned_lr(overrides: list[str], iterations: list[int]) -> list[float]:
    from anneal.config.compose import load
    from anneal.plot import planned

    cfg = load(overrides)
    derived = cfg.validate()
    return planned(derived.schedule, derived.ramp, iterations)[0]


MEMORY = ["model.recompute_granularity=full", "model.recompute_method=uniform",
          "model.recompute_num_layers=1", "model.cross_entropy_chunk_size=48", "logger.plot_schedule=false"]
RAMP = [*SMALL, "train.rampup_batch_size=[2,2,16]", "train.eval_interval=null"]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The one-process runs, all at once (one core each): SMALL, SMALL with recompute and chunked loss,
    RAMP; each as (run directory, result)."""
    root = tmp_path_factory.mktemp("single")
    variants = {"plain": SMALL, "memory": [*SMALL, *MEMORY], "ramp": RAMP}

    def launch(name: str) -> tuple[Path, subprocess.CompletedProcess]:
        out = root / name
        out.mkdir()
        return out, run_cli(*variants[name], f"hydra.run.dir={out}", cwd=out, timeout=240,
                            env={"OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(max_workers=len(variants)) as pool:
        return dict(zip(variants, pool.map(launch, variants)))


@pytest.fixture(scope="module")
def single_run(one_process_runs) -> list[dict]:
    out, result = one_process_runs["plain"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "schedule.png").stat().st_size > 10_000
    assert any((out / "tensorboard").iterdir())
    return _records(out)


def test_logged_lr_is_the_planned_lr_at_every_iteration(single_run: list[dict]) -> None:
    iterations = [r["iteration"] for r in single_run]
    assert iterations == list(range(1, 13))
    assert [r["lr"] for r in single_run] == _planned_lr(SMALL, iterations)
    assert [r["scheduler_num_steps"] for r in single_run] == [8 * i for i in iterations]  # samples


def test_loss_falls(single_run: list[dict]) -> None:
    assert single_run[-1]["loss"] < single_run[0]["loss"] - 0.5


def test_two_gloo_ranks_match_one_process(single_run: list[dict], tmp_path: Path) -> None:
    args = ["--nproc-per-node", "2", "--master-port", str(free_port()), str(ROOT / "scripts" / "pretrain.py"),
            *SMALL, "optimizer=distributed_fused_adam", f"hydra.run.dir={tmp_path}"]
    result = _torchrun(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = _records(tmp_path)
    assert [r["lr"] for r in two] == [r["lr"] for r in single_run]
    for one, other in zip(single_run, two):
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-4)


def test_two_nodes_on_loopback_complete(tmp_path: Path) -> None:
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "anneal-two-nodes",
              str(ROOT / "scripts" / "pretrain.py"), *SMALL, "train.train_iters=4", "train.eval_interval=null",
              "scheduler.lr_warmup_iters=1", "logger.plot_schedule=false", f"hydra.run.dir={tmp_path}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *common]
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "2 rank(s)" in "".join(outputs)
    assert [r["iteration"] for r in _records(tmp_path)] == [1, 2, 3, 4]


def test_rampup_changes_the_batch_and_keeps_the_schedule_exact(one_process_runs) -> None:
    out, result = one_process_runs["ramp"]
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(out)
    samples = [r["consumed_samples"] for r in records]
    batches = [b - a for a, b in zip([0, *samples], samples)]
    assert batches[0] == 2 and batches[-1] == 8 and batches == sorted(batches)  # the batch grows to 8
    assert [r["scheduler_num_steps"] for r in records] == samples  # steps are exactly the samples consumed
    assert [r["lr"] for r in records] == _planned_lr(RAMP, [r["iteration"] for r in records])


def test_recompute_and_chunked_loss_train_like_the_plain_run(single_run: list[dict],
                                                             one_process_runs) -> None:
    out, result = one_process_runs["memory"]
    assert result.returncode == 0, result.stderr[-3000:]
    for one, other in zip(single_run, _records(out), strict=True):
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-5)  # only the summation order differs


@pytest.fixture(scope="module")
def resumed_wandb_run(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """A run with W&B (offline) and checkpoints that stops at iteration 6 (train.exit_interval), then the same
    command again: a resume to iteration 12."""
    root = tmp_path_factory.mktemp("wandb_resume")
    common = [*SMALL, "logger.log_interval=10", "train.eval_interval=null", "logger.plot_schedule=false",
              "logger.wandb_project=anneal-test", "logger.wandb_mode=offline", "train.exit_interval=6",
              f"checkpoint.save={root / 'ck'}"]
    results = [run_cli(*common, f"hydra.run.dir={root / name}", cwd=root, timeout=240,
                       env={"OMP_NUM_THREADS": "1"}) for name in "ab"]
    return root, results


def test_start_up_names_each_build_step_and_the_eta_shows_at_iteration_3(resumed_wandb_run) -> None:
    _, (first, _) = resumed_wandb_run
    assert first.returncode == 0, first.stderr[-3000:]
    lines = [line.split("] ", 1)[1] for line in first.stdout.splitlines() if line.startswith("[")]
    starts = [line.split(" (")[0] for line in lines if line.startswith("anneal: ")]
    assert starts[:3] == ["anneal: config valid; importing torch", "anneal: building the data",
                          "anneal: building the model"]
    assert starts[3] == "anneal: attention: SDPA flash, causal"  # the kernel picked for the device and dtype
    assert "parameters, 1 rank(s) on cpu" in starts[4]  # the banner, once everything is built
    eta = next(line for line in lines if "ETA" in line)
    assert eta.startswith("[ 3/12  25%] | ") and "s per iteration" in eta  # log_interval 10: before iteration 10


def test_a_resumed_run_continues_its_wandb_run(resumed_wandb_run) -> None:
    root, results = resumed_wandb_run
    assert [r.returncode for r in results] == [0, 0], results[-1].stderr[-3000:]
    ids = [[p.name.rsplit("-", 1)[1] for p in (root / name).glob("wandb/offline-run-*")] for name in "ab"]
    assert len(ids[0]) == 1 and ids[1] == ids[0]
    state = json.loads((root / "ck" / "iter_0000012" / "state.json").read_text())
    assert state["train"]["wandb_run_id"] == ids[0][0]
    assert f"W&B: offline run {ids[0][0]} (continued)" in results[1].stdout
