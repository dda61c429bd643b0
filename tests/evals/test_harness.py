"""``run_downstream`` (the training loop's call), ``flat_metrics`` and what importing the harness costs."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from anneal.errors import ConfigError
from anneal.evals.harness import flat_metrics


def test_flat_metrics_name_each_number_by_task_and_metric_without_stderr() -> None:
    results = {"results": {"my_mc": {"alias": "my_mc", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                     "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A"},
                           "gsm": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.0,
                                   "sample_len": 8, "flag,none": True, "bleu,none": 3}}}
    assert flat_metrics(results) == {"eval/my_mc/acc": 0.5, "eval/my_mc/acc_norm": 0.25,
                                     "eval/gsm/exact_match_strict-match": 0.125, "eval/gsm/bleu": 3.0}


def test_importing_the_harness_imports_neither_lm_eval_transformers_nor_torch() -> None:
    code = ("import sys, anneal.evals, anneal.evals.harness; "
            "print([m for m in ('lm_eval', 'transformers', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["lm_eval", "transformers"])
def test_without_lm_eval_or_transformers_the_error_names_the_field_and_the_extra(monkeypatch, module) -> None:
    from anneal.evals.harness import run_downstream

    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"^downstream_eval\.tasks \(\['my_mc'\]\) needs lm-evaluation-harness "
                                          rf"and transformers \({module} not installed\): pip install "
                                          r"'anneal\[eval\]'"):
        run_downstream(None, None, tasks=["my_mc"], include_path=None, limit=None, max_length=32)


def test_run_downstream_gives_the_clis_metrics_and_keeps_train_mode_and_the_rng(byte_run, tasks_dir,
                                                                               tmp_path) -> None:
    pytest.importorskip("lm_eval")
    import torch

    from anneal.evals.cli import load_model, main
    from anneal.hf.exporter import open_checkpoint
    from anneal.evals.harness import run_downstream, run_tokenizer

    checkpoint, _ = byte_run
    stored = open_checkpoint(checkpoint)
    model = load_model(stored)
    model.train()
    random.seed(5)
    torch.manual_seed(5)
    expected_draws = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    metrics = run_downstream(model, run_tokenizer(stored.config["dataset"], stored.model), tasks=["my_mc"],
                             include_path=str(tasks_dir), limit=None, max_length=stored.model.seq_length,
                             batch_size=5)
    assert model.training and (random.random(), torch.rand(1)) == expected_draws
    main([str(checkpoint), "--tasks", "my_mc", "--include-path", str(tasks_dir), "--output",
          str(tmp_path / "cli.json")])
    cli = json.loads((tmp_path / "cli.json").read_text())["results"]["my_mc"]
    assert metrics == {"eval/my_mc/acc": cli["acc,none"], "eval/my_mc/acc_norm": cli["acc_norm,none"]}


def test_rolling_and_generation_tasks_give_their_metrics_with_a_limit(byte_run, tasks_dir) -> None:
    pytest.importorskip("lm_eval")
    from anneal.evals.cli import evaluate_checkpoint

    results = evaluate_checkpoint(byte_run[0], tasks=["my_ppl", "my_gen"], include_path=str(tasks_dir),
                                  limit=2)
    assert results["n-samples"]["my_gen"]["effective"] == 2
    assert set(flat_metrics(results)) == {"eval/my_ppl/word_perplexity", "eval/my_ppl/bits_per_byte",
                                          "eval/my_gen/exact_match"}


def test_an_include_path_that_is_not_a_directory_is_refused(tmp_path) -> None:
    pytest.importorskip("lm_eval")
    from anneal.evals.harness import FIELDS, task_manager

    with pytest.raises(ConfigError, match=r"^downstream_eval\.include_path \('.*absent'\) is not a dir"):
        task_manager(("my_mc",), str(tmp_path / "absent"), FIELDS)
