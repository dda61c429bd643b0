"""The dry run says what each evaluation reads: eval_iters global batches of every validation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anneal.cli.dry_run import validation_lines
from anneal.data.indexed import IndexedDatasetWriter
from anneal_testing import run_cli


def _prefix(root: Path, name: str) -> str:
    with IndexedDatasetWriter(root / name, vocab_size=320) as writer:
        for start in range(0, 2000, 100):
            writer.add_document(np.arange(start, start + 100) % 300)
    return str(root / name)


def test_validation_tokens_per_set_and_per_evaluation(compose) -> None:
    cfg = compose("train.eval_interval=1000", "train.eval_iters=10", "train.global_batch_size=16",
                  "model.seq_length=256")
    assert validation_lines(cfg) == [
        "validation: 10 iterations × 16 samples × 256 tokens = 41k tokens per set, 1 set(s) (valid_loss) every "
        "1000 iterations and after the last; 41k tokens per evaluation, each reading the next samples of its set"]
    assert validation_lines(compose("train.eval_interval=null")) == [
        "validation: off (train.eval_interval is null or train.eval_iters is 0)"]
    assert validation_lines(compose("train.eval_iters=0"))[0].startswith("validation: off")


def test_dry_run_counts_the_held_out_sets_and_components(tmp_path: Path) -> None:
    web, code, wiki = (_prefix(tmp_path, name) for name in ("web", "code", "wiki"))  # the dry run checks them
    result = run_cli("dataset=indexed", f"dataset.train_data_path=[{web}]", f"dataset.valid_data_path=[1,{web},1,{code}]",
                     f"+dataset.extra_valid_data_path.wiki=[{wiki}]", "train.eval_interval=50",
                     "train.eval_iters=3", "train.global_batch_size=16", "model.seq_length=16",
                     "train.train_iters=100", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    data = result.stdout.split("# data\n")[1].split("# plan")[0]
    assert ("validation: 3 iterations × 16 samples × 16 tokens = 768 tokens per set, 2 set(s) (valid_loss, "
            "valid_loss/wiki) every 50 iterations and after the last; 1.54k tokens per evaluation") in data
    assert "  valid_loss also per blend component: valid_loss/web, valid_loss/code" in data
