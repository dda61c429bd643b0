"""The data flow as a user runs it: train a BPE, preprocess JSONL with it, train on a blend (scripts/) with
document boundaries and a per-token loss, validated per blend component and on a named held-out set."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from anneal_testing import ROOT, free_port, metrics_by_iteration, run_cli

pytestmark = pytest.mark.slow

TINY = ["model.num_layers=1", "model.seq_length=32", "train.train_iters=6", "train.global_batch_size=8",
        "train.micro_batch_size=4", "scheduler=wsd", "scheduler.lr_warmup_iters=1", "train.eval_interval=3",
        "train.eval_iters=1", "logger.log_interval=1", "logger.plot_schedule=false",
        "logger.progress_bar=false"]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPORA = {"code": sorted(STDLIB.glob("json/*.py")), "prose": [STDLIB / "LICENSE.txt"] * 3,
           "hq": sorted(STDLIB.glob("email/*.py"))[:4]}


def _preprocess(tmp: Path, name: str, tokenizer: Path) -> subprocess.CompletedProcess:
    jsonl = tmp / f"{name}.jsonl"
    lines = [json.dumps({"text": path.read_text(errors="replace")}) + "\n" for path in CORPORA[name]]
    jsonl.write_text("".join(lines))
    return run_cli("--input", str(jsonl), "--output-prefix", str(tmp / "data" / name), "--tokenizer",
                   str(tokenizer), script="preprocess_data.py", timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("e2e_data")
    for name in CORPORA:
        result = _preprocess(tmp, name, tokenizer_file)
        assert result.returncode == 0, result.stderr
        assert "model.vocab_size=384" in result.stdout
    return {name: str(tmp / "data" / name) for name in CORPORA}


def _blend(data: dict[str, str]) -> list[str]:
    return ["dataset=indexed", f"dataset.data_path=[0.7,{data['code']},0.3,{data['prose']}]",
            f"dataset.anneal_data_path=[{data['hq']}]", "dataset.split='90,10,0'"]


DOCUMENTS = ["dataset.reset_position_ids=true", "dataset.reset_attention_mask=true", "dataset.eod_mask_loss=true"]


def _evaluations(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "loss" not in r}


@pytest.fixture(scope="module")
def single_run(data: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("blend_run")
    result = run_cli(*TINY, *_blend(data), *DOCUMENTS, f"+dataset.extra_valid_data_path.hq=[{data['hq']}]",
                     "model.vocab_size=384", f"hydra.run.dir={out}", cwd=out, timeout=240,
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return {**metrics_by_iteration(out), "evaluations": _evaluations(out)}


def test_trains_on_a_blend_of_bpe_tokenized_jsonl(single_run: dict) -> None:
    single_run = {k: v for k, v in single_run.items() if k != "evaluations"}
    assert sorted(single_run) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in single_run.values())
    assert single_run[1]["loss"] == pytest.approx(math.log(384), abs=0.5)  # near uniform over the vocab


def test_validation_reports_each_blend_component_and_the_named_set(single_run: dict) -> None:
    evaluations = single_run["evaluations"]
    assert sorted(evaluations) == [3, 6]  # train.eval_interval=3 over 6 iterations
    for record in evaluations.values():
        losses = {k: v for k, v in record.items() if k.startswith("valid_loss")}
        assert sorted(losses) == ["valid_loss", "valid_loss/code", "valid_loss/hq", "valid_loss/prose"]
        assert all(math.isfinite(v) for v in losses.values())
        # the blend's loss pools its components' tokens, so it lies between their means
        low, high = sorted((losses["valid_loss/code"], losses["valid_loss/prose"]))
        assert low <= losses["valid_loss"] <= high


def test_two_gloo_ranks_read_the_same_blend(single_run: dict, data: dict[str, str], tmp_path: Path) -> None:
    """Same samples, the same loss: the per-token loss's count is summed over the ranks (eod_mask_loss)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), str(ROOT / "scripts" / "pretrain.py"), *TINY, *_blend(data), *DOCUMENTS,
           f"+dataset.extra_valid_data_path.hq=[{data['hq']}]", "model.vocab_size=384",
           f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    two = {**metrics_by_iteration(tmp_path), "evaluations": _evaluations(tmp_path)}
    assert sorted(two, key=str) == sorted(single_run, key=str)
    for iteration, record in single_run.items():  # same samples, so the same loss (anneal blend from it. 6)
        if iteration != "evaluations":
            assert two[iteration]["loss"] == pytest.approx(record["loss"], rel=1e-4)
    for iteration, record in single_run["evaluations"].items():
        for key, value in record.items():
            if key.startswith("valid_loss"):
                assert two["evaluations"][iteration][key] == pytest.approx(value, rel=1e-4), key


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused(data: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(*TINY, *_blend(data), "model.vocab_size=300", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "model.vocab_size (300) must be >= the tokenizer's vocabulary (320 ids" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_missing_blend_prefix_is_refused_naming_the_file(data: dict[str, str], tmp_path: Path) -> None:
    """Truncated prefixes are refused the same way (tests/data/test_blend.py covers both in-process)."""
    blend = f"dataset.data_path=[0.7,{data['code']},0.3,{tmp_path / 'nope'}]"
    result = run_cli(*TINY, "dataset=indexed", blend, "model.vocab_size=384",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    nope = tmp_path / "nope"
    assert f"dataset.data_path[3] ('{nope}'): {nope}.idx: cannot read" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
