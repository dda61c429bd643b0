"""compare_runs: a parent and its branches from their run directories, as a figure and a table of final values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anneal.cli.compare_runs import best, default_labels, latest_attempt, load_run, main, samples_at, trailing_means
from anneal_testing import ROOT, run_cli

SEQ, GBS = 16, 4  # tokens per sample, samples per iteration: an iteration is 64 tokens


def write_run(run_dir: Path, records: list[dict], *, seq_length: int = SEQ, lineage: dict | None = None) -> Path:
    """A run directory as the launcher leaves it: metrics.jsonl, .hydra/config.yaml and lineage.json."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(f"model:\n  seq_length: {seq_length}\ntrain:\n  global_batch_size: {GBS}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "lineage.json").write_text(json.dumps(lineage or {"kind": "root", "metrics": str(run_dir / "metrics.jsonl")}))
    return run_dir


def train(it: int, loss: float) -> dict:
    return {"iteration": it, "consumed_samples": it * GBS, "loss": loss, "lr": 1e-3}


def branch_lineage(parent: Path, at: int) -> dict:
    return {"kind": "branch", "parent": str(parent / "ck" / f"iter_{at:07d}"), "branch_iteration": at,
            "branch_samples": at * GBS, "anneal_iters": 10, "parent_lineage": {"kind": "root", "metrics":
            str(parent / "metrics.jsonl")}}


def evals(it: int, valid: float, acc: float) -> list[dict]:
    """A validation record and an eval record of one iteration, neither with consumed_samples."""
    return [{"iteration": it, "valid_loss": valid, "valid_loss/wiki": valid + 0.5},
            {"iteration": it, "eval/hellaswag/acc": acc}]


@pytest.fixture
def family(tmp_path) -> list[Path]:
    """A parent of 40 iterations (loss 10 - it/10) and branches at 20 and 30, each 10 iterations: the branch
    at 20 ends with the lowest train loss, the parent with the lowest validation loss, the branch at 30 with
    the best eval score."""
    parent = [train(it, 10 - it / 10) for it in range(1, 41)]
    for it in (10, 20, 30, 40):
        parent += evals(it, valid=6 - it / 20, acc=0.25 + it / 1000)
    b20 = [train(it, 10 - it / 10 - 1.5) for it in range(21, 31)] + evals(30, valid=5.0, acc=0.27)
    b30 = [train(it, 10 - it / 10 - 0.2) for it in range(31, 41)] + evals(40, valid=4.5, acc=0.31)
    p = write_run(tmp_path / "parent", parent)
    return [p, write_run(tmp_path / "b20", b20, lineage=branch_lineage(p, 20)),
            write_run(tmp_path / "b30", b30, lineage=branch_lineage(p, 30))]


def _table(out: str) -> dict[str, list[str]]:
    """The table's rows by label: columns split on two spaces or more."""
    import re

    lines = out.splitlines()
    head = re.split(r"\s{2,}", lines[0].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1:] if line and not line.startswith(("*", "wrote"))]
    return {row[0]: dict(zip(head, row)) for row in rows}


def test_a_parent_and_two_branches_give_a_figure_and_the_table_of_final_values(family, tmp_path, capsys) -> None:
    png = tmp_path / "fig" / "compare.png"
    assert main([*map(str, family), "--output", str(png), "--smooth", "1"]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000
    out = capsys.readouterr().out
    rows = _table(out)
    assert list(rows) == ["parent", "b20", "b30"]
    assert rows["parent"] == {"run": "parent", "from": "root", "iteration": "40", "tokens": "2,560",
                              "train loss": "6.0000", "valid_loss": "4.0000*", "valid_loss/wiki": "4.5000*",
                              "eval/hellaswag/acc": "0.2900"}
    assert rows["b20"]["from"] == "branch of parent at 20" and rows["b20"]["tokens"] == "1,920"
    assert rows["b20"]["train loss"] == "5.5000*" and rows["b20"]["valid_loss"] == "5.0000"
    assert rows["b30"]["eval/hellaswag/acc"] == "0.3100*" and rows["b30"]["train loss"] == "5.8000"
    assert f"wrote {png.resolve()} (3 runs, 4 panels)" in out


def test_train_loss_is_the_mean_of_the_last_smooth_values_continuing_the_parent(family, tmp_path, capsys) -> None:
    assert main([*map(str, family), "-o", str(tmp_path / "c.png"), "--metrics", "loss", "--smooth", "12"]) == 0
    rows = _table(capsys.readouterr().out)
    assert list(rows["parent"]) == ["run", "from", "iteration", "tokens", "train loss"]
    assert rows["parent"]["train loss"] == "6.5500"  # the mean of iterations 29..40: 10 - 34.5/10
    # a branch's 10 values and its parent's 2 before the branch point (8.1, 8.0 at 19 and 20 for b20)
    assert rows["b20"]["train loss"] == "6.3000*" and rows["b30"]["train loss"] == "6.3833"


def test_default_labels_and_output_are_the_directory_names_and_the_working_directory(family, monkeypatch,
                                                                                      capsys) -> None:
    monkeypatch.chdir(family[0].parent)
    assert main([str(p) for p in family]) == 0
    assert (family[0].parent / "compare_runs.png").is_file()
    assert list(_table(capsys.readouterr().out)) == ["parent", "b20", "b30"]


def test_a_resume_replaces_the_records_it_logs_again(tmp_path) -> None:
    # the first attempt got to iteration 14 and validated at 10; the resume from 10 stopped at 12
    first = [train(it, 5.0) for it in range(1, 15)] + [{"iteration": 10, "valid_loss": 4.0}]
    second = [train(it, 3.0) for it in range(11, 13)] + [{"iteration": 12, "valid_loss": 2.5}]
    run = load_run(write_run(tmp_path / "run", first + second), "run")
    assert run.final_iteration == 12 and run.final_tokens == 12 * GBS * SEQ
    loss = run.series["loss"]
    assert loss.iterations == tuple(range(1, 13)) and loss.values == (5.0,) * 10 + (3.0, 3.0)
    assert run.series["valid_loss"].iterations == (10, 12)
    assert [r["iteration"] for r in latest_attempt([train(1, 1), train(2, 1), train(2, 0)])] == [1, 2]


def test_records_without_samples_take_them_from_the_training_record_or_between_two(tmp_path) -> None:
    records = [train(it, 4.0) for it in range(10, 31, 10)] + [{"iteration": 20, "valid_loss": 3.0},
                                                               {"iteration": 25, "eval/arc/acc": 0.4}]
    run = load_run(write_run(tmp_path / "run", records), "run")
    assert run.series["valid_loss"].tokens == (20 * GBS * SEQ,)
    assert run.series["eval/arc/acc"].tokens == (25 * GBS * SEQ,)
    ramp = {0: 0, 10: 20, 20: 60}  # a batch ramp: 2 then 4 samples per iteration
    assert samples_at(15, ramp) == 40 and samples_at(5, ramp) == 10 and samples_at(25, ramp) == 80


def test_the_smoothed_loss_leaves_out_an_overflowed_iteration() -> None:
    assert trailing_means([4.0, float("inf"), 2.0, 1.0], 3) == [4.0, 4.0, 3.0, 1.5]


def test_default_labels_add_parent_names_until_they_differ() -> None:
    hydra = [Path("/o/2025-01-02/10-00-00"), Path("/o/2025-01-03/10-00-00")]
    assert default_labels(hydra) == ["2025-01-02/10-00-00", "2025-01-03/10-00-00"]
    assert default_labels([Path("/runs/parent"), Path("/runs/b20")]) == ["parent", "b20"]


def test_losses_are_best_lowest_and_eval_scores_highest() -> None:
    assert best([3.0, 2.0, float("nan")], "valid_loss/wiki") == 1
    assert best([0.3, 0.5], "eval/hellaswag/acc_norm") == 1
    assert best([12.0, 9.0], "eval/wikitext/word_perplexity") == 1
    assert best([0.01, 0.02], "eval/hellaswag/acc_stderr") is None and best([1.0, None], "loss") is None


def _corrupt(tmp_path: Path) -> list[str]:
    run = write_run(tmp_path / "run", [train(1, 2.0), train(2, 1.9)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 3, "loss": 1.\n')
    return [str(run)]


def _empty(tmp_path: Path) -> list[str]:
    run = write_run(tmp_path / "run", [])
    return [str(run)]


def _no_metrics(tmp_path: Path) -> list[str]:
    (tmp_path / "run").mkdir()
    return [str(tmp_path / "run")]


def _no_config(tmp_path: Path) -> list[str]:
    run = write_run(tmp_path / "run", [train(1, 2.0)])
    (run / ".hydra" / "config.yaml").unlink()
    return [str(run)]


def _no_samples(tmp_path: Path) -> list[str]:
    run = write_run(tmp_path / "run", [train(1, 2.0)])
    (run / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\n')  # no consumed_samples
    return [str(run)]


def _not_utf8(tmp_path: Path) -> list[str]:
    run = write_run(tmp_path / "run", [train(1, 2.0)])
    with (run / "metrics.jsonl").open("ab") as file:
        file.write(b'{"iteration": 2, "loss": \xff}\n')
    return [str(run)]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: [], "anneal: error: no run directory given: compare_runs.py RUN_DIR [RUN_DIR ...]"),
    (_no_metrics, "anneal: error: {tmp}/run has no metrics.jsonl: give run directories (Hydra's output "
                  "directory of a run)"),
    (_empty, "anneal: error: {tmp}/run/metrics.jsonl: no metrics records (an empty file)"),
    (_corrupt, "anneal: error: {tmp}/run/metrics.jsonl:3: not a JSON record (Expecting ',' delimiter)"),
    (_no_config, "anneal: error: {tmp}/run has no .hydra/config.yaml: its model.seq_length gives the tokens "
                 "per sample"),
    (lambda tmp: [*_no_config(tmp), "--labels", "a,b"], "anneal: error: --labels has 2 labels for 1 run "
                                                         "directories"),
    (_no_samples, "anneal: error: {tmp}/run/metrics.jsonl: no training records (with 'loss' and "
                  "consumed_samples)"),
    (_not_utf8, "anneal: error: {tmp}/run/metrics.jsonl:2: not a JSON record (Expecting value)"),
], ids=["no_runs", "no_metrics", "empty", "corrupt", "no_config", "labels", "no_samples", "not_utf8"])
def test_bad_input_fails_in_one_line_with_exit_code_2(make, message, tmp_path, capsys) -> None:
    assert main(make(tmp_path)) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message.format(tmp=tmp_path)] and not captured.out


def test_a_figure_it_cannot_write_is_one_line_after_the_table(family, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    assert main([*map(str, family), "-o", str(tmp_path / "file" / "c.png")]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"anneal: error: --output ('{tmp_path}/file/c.png'): cannot write the "
                                         "figure (File exists)"]  # its directory is a file
    assert "parent" in captured.out  # the table came first


def test_a_metric_pattern_that_matches_nothing_lists_the_keys(family, capsys) -> None:
    assert main([*map(str, family), "--metrics", "loss,eval/mmlu/*"]) == 2
    assert capsys.readouterr().err.strip() == (
        "anneal: error: --metrics 'eval/mmlu/*' matches no logged key; the runs have: loss, valid_loss, "
        "valid_loss/wiki, eval/hellaswag/acc")


def test_reads_the_run_directories_the_launcher_writes(tmp_path) -> None:
    """A real parent (4 iterations, validated every 2) and a real branch from its checkpoint at 2."""
    run = ["model.num_layers=1", "model.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
           "scheduler=wsd", "scheduler.lr_warmup_iters=1", "scheduler.lr_wsd_decay_iters=1", "train.train_iters=4",
           "logger.log_interval=1", "train.eval_interval=2", "train.eval_iters=1", "logger.plot_schedule=false"]
    parent = run_cli(*run, f"checkpoint.save={tmp_path / 'ck'}", "checkpoint.save_interval=2",
                     f"hydra.run.dir={tmp_path / 'parent'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert parent.returncode == 0, parent.stderr[-2000:]
    branch = run_cli(*run, f"checkpoint.load={tmp_path / 'ck' / 'iter_0000002'}", f"checkpoint.save={tmp_path / 'b'}",
                     "scheduler.anneal_branch_iters=1", f"hydra.run.dir={tmp_path / 'b2'}", cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
    assert branch.returncode == 0, branch.stderr[-2000:]
    out = run_cli(str(tmp_path / "parent"), str(tmp_path / "b2"), "-o", str(tmp_path / "c.png"),
                  script="compare_runs.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = _table(out.stdout)
    assert rows["parent"]["iteration"] == "4" and rows["parent"]["tokens"] == f"{4 * 8 * 32:,}"
    assert rows["b2"]["from"] == "branch of parent at 2" and rows["b2"]["iteration"] == "3"
    assert {"train loss", "valid_loss"} <= set(rows["b2"]) and (tmp_path / "c.png").stat().st_size > 10_000
    assert ROOT.joinpath("scripts", "compare_runs.py").is_file()


def test_the_default_smoothing_is_narrower_for_short_runs(tmp_path, capsys) -> None:
    """A trailing mean of 10 logged values lags a short run's falling loss: a twentieth of the longest run's."""
    from anneal.cli.compare_runs import DEFAULT_SMOOTH, Run, Series, auto_smooth

    def run(logged: int) -> Run:
        series = Series(tuple(range(logged)), tuple(float(i) for i in range(logged)), (1.0,) * logged)
        return Run("r", tmp_path, {"loss": series}, logged, float(logged), 1)

    assert auto_smooth([run(24)]) == 1 and auto_smooth([run(24), run(100)]) == 5
    assert auto_smooth([run(5000)]) == DEFAULT_SMOOTH
