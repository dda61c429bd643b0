"""The launcher as a user runs it: a real subprocess of scripts/pretrain.py."""

from __future__ import annotations

import time

from anneal_testing import run_cli


def test_dry_run_prints_the_derived_wsd_boundaries() -> None:
    start = time.perf_counter()
    out = run_cli("scheduler=wsd", "scheduler.lr_wsd_decay_style=minus_sqrt", "optimizer.lr=3e-4", "train.train_iters=300",
                  "dry_run=true")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert "lr WSD (anneal minus_sqrt), max_lr 0.0003" in out.stdout
    rows = {line[:28].strip(): line[28:].split() for line in out.stdout.splitlines() if line[:28].strip()}
    # 300 iterations of 16 samples; warmup 30 iterations; the anneal is the last 20% (60 iterations)
    assert rows["warmup end"][:2] == ["30", "480"]
    assert rows["stable end / anneal start"][:2] == ["240", "3840"]
    assert rows["decay end"][:2] == ["300", "4800"]
    print(f"dry run wall time: {elapsed:.2f} s")  # reported by the benchmark, not asserted


def test_misspelled_key_fails_in_one_line_naming_the_likely_key() -> None:
    out = run_cli("scheduler.lr_warmup_itres=10", "dry_run=true")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "anneal: error: scheduler.lr_warmup_itres is not a config key; did you mean scheduler.lr_warmup_iters?"]
    assert "Traceback" not in out.stderr


def test_invalid_value_fails_before_anything_starts(tmp_path) -> None:
    out = run_cli("scheduler.lr_warmup_iters=600", "train.train_iters=500", cwd=tmp_path)
    assert out.returncode == 2
    assert "scheduler.lr_warmup_iters (600) must be < train.train_iters (500)" in out.stderr
    assert not (tmp_path / "outputs").exists()  # no run directory was made


def test_full_error_env_shows_the_traceback() -> None:
    out = run_cli("optimizer.lr=abc", "dry_run=true", env={"ANNEAL_FULL_ERROR": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr and "optimizer.lr ('abc')" in out.stderr


def test_cfg_job_prints_the_composed_config() -> None:
    out = run_cli("--cfg", "job", "optimizer=sgd")
    assert out.returncode == 0, out.stderr
    assert "optimizer: sgd" in out.stdout and "_target_: anneal.config.scheduler.SchedulerConfig" in out.stdout


def test_resolved_yaml_goes_back_into_the_launcher(tmp_path) -> None:
    from anneal.config.compose import from_yaml, load, to_yaml

    cfg = load(["scheduler=wsd", "optimizer.lr=1e-3", "train.rampup_batch_size=[8,8,640]",
                "optimizer.param_group_rules=[{_target_: anneal.config.optimizer.ParamGroupRule, pattern: 'embedding.*', lr_mult: 0.1}]"])
    text = to_yaml(cfg)
    assert from_yaml(text) == cfg
    (tmp_path / "resolved.yaml").write_text(text)
    out = run_cli("--config-path", str(tmp_path), "--config-name", "resolved", "dry_run=true")
    assert out.returncode == 0, out.stderr
    assert "lr WSD" in out.stdout and "pattern: embedding.*" in out.stdout
