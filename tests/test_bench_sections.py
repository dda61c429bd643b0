"""Sections of scripts/bench.py that broke silently when what they drive changed: each runs here at a tiny
size (timings are not asserted)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from anneal.config.model import ModelConfig
from anneal.config.runtime import DistributedConfig
from anneal.model.qwen3 import build_model


def test_hugging_face_section_saves_exports_and_imports_a_model() -> None:
    from anneal.bench.hf import hf_figures

    tiny = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                       num_query_groups=1, kv_channels=16, vocab_size=64, seq_length=16)
    figures = hf_figures(1, tiny)
    assert figures["hf_params"].median == sum(p.numel() for p in build_model(tiny, device="meta").parameters())
    assert figures["hf_export_s"].median > 0 and figures["hf_import_vs_load_file"].median > 0


@pytest.mark.slow
def test_start_up_section_finds_the_first_iteration_line() -> None:
    from anneal.bench.launcher import _time_to_first_iteration

    assert 0 < _time_to_first_iteration() < 120


def test_the_dry_run_threshold_is_its_ratio_to_import_torch(monkeypatch) -> None:
    from anneal.bench import launcher, report

    seconds = {"first_iteration": 4.0, "import_torch": 1.28, "dry_run": 2.29, "dry_run_schedule": 0.5,
               "dry_run_qwen3_4b": 2.5}  # the 2.29 s against 1.28 s: 1.78x
    monkeypatch.setattr(launcher, "interleaved", lambda runs, repeats: {k: [seconds[k]] for k in runs})
    results = launcher.startup(1)
    assert results["dry_run_vs_import_torch"].median == pytest.approx(2.29 / 1.28)
    assert "dry_run_s" not in report.THRESHOLDS  # seconds vary with the machine; the ratio does not
    assert [line.split(" =")[0] for line in report.regressions(results)] == ["dry_run_vs_import_torch"]
    seconds["dry_run"] = 1.19 * 1.28
    assert report.regressions(launcher.startup(1)) == []


def test_bare_loop_section_trains_and_times_on_the_device_it_picked(monkeypatch, capsys) -> None:
    from anneal.bench import bare_loop

    timed_on, timed = [], bare_loop.timed
    monkeypatch.setattr(bare_loop, "timed", lambda fn, device: timed_on.append(device) or timed(fn, device))
    argv = ["bare_loop", "--iters", "2", "--warmup", "1", "train.global_batch_size=8"]  # one microbatch
    monkeypatch.setattr(sys, "argv", argv)
    bare_loop.main()
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert figures["tokens_per_s"] > 0 and timed_on == [torch.device("cpu")]


@pytest.mark.parametrize(("setting", "gpus", "local_rank", "expected"),
                         [("auto", 0, "0", "cpu"), ("cpu", 1, "0", "cpu"), ("auto", 1, "0", "cuda:0"),
                          ("cuda", 1, "0", "cuda:0"), ("auto", 2, "1", "cuda:1")])
def test_the_bare_loop_picks_the_launchers_device(monkeypatch, setting, gpus, local_rank, expected) -> None:
    from anneal.bench.bare_loop import baseline_device
    from anneal.parallel import single_process
    from anneal.training.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # this host has no GPU to select
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    dist_cfg = DistributedConfig(device=setting)
    launcher = init_distributed(dist_cfg, single_process()).device  # what scripts/pretrain.py trains on
    assert baseline_device(dist_cfg) == launcher == torch.device(expected)


@pytest.mark.parametrize(("device", "expected"), [
    ("cuda:0", ["sync cuda:0", "clock", "work", "sync cuda:0", "clock"]),
    ("cpu", ["clock", "work", "clock"])])
def test_the_timed_region_is_fenced_by_device_syncs(monkeypatch, device: str, expected: list[str]) -> None:
    from anneal.bench import bare_loop

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append(f"sync {device}"))
    monkeypatch.setattr(bare_loop.time, "perf_counter", lambda: calls.append("clock") or float(len(calls)))
    result, seconds = bare_loop.timed(lambda: calls.append("work") or "done", torch.device(device))
    assert calls == expected and result == "done" and seconds > 0  # the clock reads after the kernels finish
