"""downstream_eval.* through the real entry point: the live model scored on a local lm-eval task at its
interval and after the last iteration, on one process and on 2 gloo ranks under FSDP2 (every rank runs its
share of the forwards); a task lm-eval cannot find, or data without a tokenizer, is one line before anything
starts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anneal_testing import ROOT, free_port, run_cli

pytestmark = pytest.mark.slow

RUN = ["model.num_layers=1", "model.seq_length=64", "train.train_iters=4", "train.global_batch_size=4",
       "train.micro_batch_size=2", "scheduler.lr_warmup_iters=1", "train.eval_interval=null",
       "logger.log_interval=2", "logger.plot_schedule=false", "dataset.stdlib_max_bytes=200000",
       "downstream_eval.interval=2", "downstream_eval.limit=6", "downstream_eval.batch_size=4"]
OFFLINE = {"OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _evaluations(run_dir: Path) -> list[dict]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if any(key.startswith("eval/") for key in r)]


def _check(evaluations: list[dict]) -> None:
    # downstream_eval.interval=2, and after the last iteration: that is 4, so once there
    assert [r["iteration"] for r in evaluations] == [2, 4]
    for record in evaluations:
        assert 0.0 <= record["eval/my_mc/acc"] <= 1.0 and 0.0 <= record["eval/my_mc/acc_norm"] <= 1.0
        assert math.isfinite(record["eval/my_ppl/bits_per_byte"]) and record["consumed_samples"] > 0


def test_an_in_loop_eval_logs_each_metric_at_its_interval(tasks_dir: Path, tmp_path: Path) -> None:
    result = run_cli(*RUN, "downstream_eval.tasks=[my_mc,my_ppl]", f"downstream_eval.include_path={tasks_dir}",
                     f"hydra.run.dir={tmp_path}", cwd=tmp_path, env=OFFLINE, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    _check(_evaluations(tmp_path))
    assert "downstream evals: my_mc, my_ppl (lm-eval, 6 documents per task) every 2 iterations" in result.stdout


def test_two_fsdp2_ranks_score_their_shares_and_log_the_same_metrics(tasks_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), str(ROOT / "scripts" / "pretrain.py"), *RUN, "dist.use_torch_fsdp2=true",
           "downstream_eval.tasks=[my_mc,my_ppl]", f"downstream_eval.include_path={tasks_dir}",
           f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _check(_evaluations(tmp_path))


@pytest.mark.parametrize(("override", "message"), [
    ("downstream_eval.tasks=[my_mcq]", "downstream_eval.tasks (['my_mcq']): 'my_mcq' is in neither "
                                       "downstream_eval.include_path"),
    ("dataset=mock", "downstream_eval.tasks (['my_mc']) scores text with the run's tokenizer, and there is "
                     "none: the run has no tokenizer to score text with"),
])
def test_a_task_or_tokenizer_that_cannot_be_found_stops_the_run_before_it_starts(
        tasks_dir: Path, tmp_path: Path, override: str, message: str) -> None:
    tasks = [] if override.startswith("downstream_eval.tasks") else ["downstream_eval.tasks=[my_mc]"]
    run = [arg for arg in RUN if not arg.startswith("dataset.")]  # fields of the stdlib kind
    result = run_cli(*run, *tasks, override, f"downstream_eval.include_path={tasks_dir}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=OFFLINE, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("anneal: error: ") and message in last, last
    assert "building the model" not in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
