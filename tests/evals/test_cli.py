"""``anneal-eval``: a checkpoint scored on local lm-eval tasks, as lm-eval's hf backend scores its export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_results(byte_run, tasks_dir) -> dict:
    """lm-eval's own ``hf`` backend on the export of the checkpoint, fp32 on the CPU."""
    import lm_eval

    from anneal.evals.harness import FIELDS, task_manager

    _, export = byte_run
    manager = task_manager(("my_mc",), str(tasks_dir), FIELDS)
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32", device="cpu",
                                   tasks=["my_mc"], task_manager=manager, log_samples=False)["results"]


def test_anneal_eval_gives_the_hf_backends_acc_and_acc_norm_on_the_export(byte_run, tasks_dir, hf_results,
                                                                          tmp_path: Path, capsys) -> None:
    from anneal.evals.cli import main

    checkpoint, _ = byte_run
    output = tmp_path / "out" / "results.json"
    assert main([str(checkpoint), "--tasks", "my_mc", "--include-path", str(tasks_dir), "--output",
                 str(output), "--batch-size", "3"]) == 0
    ours = json.loads(output.read_text())["results"]["my_mc"]
    for key in ("acc,none", "acc_norm,none"):
        assert ours[key] == hf_results["my_mc"][key], key
    assert ours["acc_stderr,none"] == pytest.approx(hf_results["my_mc"]["acc_stderr,none"])
    assert "acc_norm" in capsys.readouterr().out  # the table


def test_a_task_that_no_path_holds_exits_2_with_one_line(byte_run, tasks_dir, capsys) -> None:
    from anneal.evals.cli import main

    checkpoint, _ = byte_run
    assert main([str(checkpoint), "--tasks", "my_mcq", "--include-path", str(tasks_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anneal: error: --tasks (['my_mcq']): 'my_mcq' is in neither --include-path") and \
        "did you mean 'my_mc'?" in err and err.count("\n") == 1


def test_a_directory_that_is_not_a_checkpoint_exits_2(tmp_path: Path, tasks_dir, capsys) -> None:
    from anneal.evals.cli import main

    assert main([str(tmp_path), "--tasks", "my_mc", "--include-path", str(tasks_dir)]) == 2
    assert capsys.readouterr().err.startswith("anneal: error: CHECKPOINT (")


@pytest.mark.parametrize("limit", ["0", "-2", "1.5", "many"])
def test_a_limit_that_is_not_a_count_or_a_fraction_exits_2(byte_run, limit: str, capsys) -> None:
    from anneal.evals.cli import main

    assert main([str(byte_run[0]), "--tasks", "my_mc", "--limit", limit]) == 2
    assert capsys.readouterr().err.startswith("anneal: error: --limit (")
