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
        "anneal: error: scheduler.lr_warmup_itres is not a config key; did you mean scheduler.lr_warmup_iters=10?"]
    assert "Traceback" not in out.stderr


def test_invalid_value_fails_before_anything_starts(tmp_path) -> None:
    out = run_cli("scheduler.lr_warmup_iters=600", "train.train_iters=500", cwd=tmp_path)
    assert out.returncode == 2
    assert "scheduler.lr_warmup_iters (600) must be < train.train_iters (500)" in out.stderr
    assert not (tmp_path / "outputs").exists()  # no run directory was made


def test_a_layout_the_world_cannot_hold_fails_before_any_process_group(tmp_path) -> None:
    # Under torchrun WORLD_SIZE and RANK come from the launcher; the check runs before the group is joined.
    out = run_cli("dist.use_torch_fsdp2=true", "model.tensor_model_parallel_size=2",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"WORLD_SIZE": "3", "RANK": "0"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("anneal: error: model.tensor_model_parallel_size (2) must divide the world "
                                  "size (3)")
    assert not (tmp_path / "run").exists()  # the failed run's directory is removed


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


def test_shortened_run_error_says_the_warmup_is_a_default_and_gives_the_fix() -> None:
    out = run_cli("train.train_iters=10", "dry_run=true")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "anneal: error: scheduler.lr_warmup_iters (30, a default) must be < train.train_iters (10): the warmup "
        "must end before the decay does; override the default: scheduler.lr_warmup_iters=1, or "
        "scheduler.lr_warmup_fraction=0.1 (a tenth of the decay)")


def test_warmup_fraction_replaces_the_default_iteration_count() -> None:
    out = run_cli("train.train_iters=10", "scheduler.lr_warmup_fraction=0.1", "dry_run=true")
    assert out.returncode == 0, out.stderr
    assert ("note: scheduler.lr_warmup_fraction (set on the command line) replaces the default "
            "scheduler.lr_warmup_iters (30), which is not used") in out.stdout
    rows = {line[:28].strip(): line[28:].split() for line in out.stdout.splitlines() if line[:28].strip()}
    assert rows["warmup end"][:2] == ["1", "16"]  # 0.1 × 10 iterations of 16 samples


def test_warmup_fraction_and_iterations_both_typed_are_refused() -> None:
    out = run_cli("train.train_iters=10", "scheduler.lr_warmup_fraction=0.1", "scheduler.lr_warmup_iters=2",
                  "dry_run=true")
    assert out.returncode == 2
    assert "are mutually exclusive and both are set on the command line" in out.stderr


def test_train_samples_train_whole_global_batches_as_megatron() -> None:
    out = run_cli("train.train_samples=5000", "train.global_batch_size=32",
                  "scheduler.lr_warmup_fraction=0.01", "dry_run=true")
    assert out.returncode == 0, out.stderr
    rows = {line[:28].strip(): line[28:].split() for line in out.stdout.splitlines() if line[:28].strip()}
    assert rows["end of training"][:2] == ["156", "4992"]  # 5000 // 32 iterations, as Bridge
    assert rows["decay end"][1] == "5000"  # the schedule spans train_samples, as Bridge


def test_relative_config_path_is_read_from_the_current_directory(tmp_path) -> None:
    from anneal.config.compose import load, to_yaml

    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "resolved.yaml").write_text(to_yaml(load(["scheduler=wsd"])))
    out = run_cli("--config-path", "saved", "--config-name", "resolved", "dry_run=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "lr WSD" in out.stdout
    out = run_cli("--config-path", "nowhere", "dry_run=true", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"anneal: error: --config-path ('nowhere') is not a directory "
                                  f"(looked for {tmp_path / 'nowhere'})")


def test_model_too_large_for_memory_is_refused_before_building_and_leaves_no_run_dir(tmp_path) -> None:
    huge = ("model.num_layers=1", "model.hidden_size=262144", "model.ffn_hidden_size=8",
            "model.vocab_size=4000000")  # about 1e12 parameters: 15 TiB of weights, grads and Adam state
    out = run_cli(*huge, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("anneal: error: model (1,048,") and "does not fit" in line
    assert "GiB free (MemAvailable in /proc/meminfo)" in line
    assert not (tmp_path / "outputs").exists()  # the run directory held only .hydra/: removed


def test_help_describes_the_fields() -> None:
    out = run_cli("--help", "optimizer=sgd")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.strip().startswith("optimizer.sgd_momentum"))
    assert "in [0, 1)" in row
    assert "scheduler=" in out.stdout and "-m A=x,y" in out.stdout


def test_param_group_rules_take_plain_mappings_on_the_command_line() -> None:
    out = run_cli("optimizer.param_group_rules=[{pattern: 'embedding.*', lr_mult: 0.1}]", "dry_run=true")
    assert out.returncode == 0, out.stderr
    assert "pattern: embedding.*" in out.stdout and "lr_mult: 0.1" in out.stdout
