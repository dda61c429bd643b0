"""The dry run's per-source table: exactly the samples training reads, source by source and phase by phase."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from anneal_testing import run_cli
from data_testing import write_sources

from anneal.data.blend import anneal_start_sample
from anneal.data.datasets import build_datasets
from anneal.data.mix import mix_table, phase_spans, source_rows

RUN = ["scheduler=wsd", "train.train_iters=100", "train.global_batch_size=16", "scheduler.lr_warmup_iters=10",
       "scheduler.lr_wsd_decay_iters=30", "model.seq_length=16"]


def test_wsd_phases_come_from_the_derived_schedule(compose) -> None:
    derived = compose(*RUN).validate()
    assert phase_spans(derived) == [("warmup", 0, 160), ("stable", 160, 1120), ("anneal", 1120, 1600)]
    assert anneal_start_sample(derived.schedule) == 1120
    cosine = compose("train.train_iters=100", "train.global_batch_size=16", "scheduler.lr_warmup_iters=10",
                     "scheduler.lr_decay_iters=80").validate()
    assert phase_spans(cosine) == [("warmup", 0, 160), ("decay", 160, 1280), ("after decay", 1280, 1600)]


def test_table_counts_are_the_samples_training_reads(compose, tmp_path: Path) -> None:
    a, b, c = write_sources(tmp_path, [30, 30, 30], vocab_size=320)
    cfg = compose(*RUN, "dataset=indexed", f"dataset.data_path=[0.8,{a},0.2,{b}]",
                  f"dataset.anneal_data_path=[0.5,{b},0.5,{c}]")
    derived = cfg.validate()
    spans = phase_spans(derived)
    rows = source_rows(cfg.dataset, spans, anneal_start_sample(derived.schedule))
    train, _ = build_datasets(cfg.dataset, seq_length=16, vocab_size=320,
                              anneal_start=anneal_start_sample(derived.schedule))
    read = [np.bincount(train.gather(np.arange(start, stop))[:, 0] // 100, minlength=3)
            for _, start, stop in spans]
    (_, main_a), (_, main_b), (_, anneal_b), (_, anneal_c) = rows  # main blend a, b; anneal blend b, c
    assert main_a == [int(r[0]) for r in read]
    assert [m + n for m, n in zip(main_b, anneal_b, strict=True)] == [int(r[1]) for r in read]
    assert anneal_c == [int(r[2]) for r in read]
    assert main_a[2] == main_b[2] == 0 and anneal_b[:2] == anneal_c[:2] == [0, 0]  # the anneal blend rules
    assert sum(map(sum, (main_a, main_b, anneal_b, anneal_c))) == 1600
    table = mix_table(cfg.dataset, derived, 16)
    assert "anneal [1120, 1600)" in table and f"{main_a[1] * 16:,}" in table


def test_dry_run_prints_the_data_table(tmp_path: Path) -> None:
    web, code = write_sources(tmp_path, [40, 40])  # real files: the dry run checks them as the run does
    blend = f"dataset.data_path=[3,{web},1,{code}]"
    result = run_cli(*RUN, "train.train_iters=64", "scheduler.lr_wsd_decay_iters=10", "dry_run=true",
                     "dataset=indexed", blend, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = result.stdout.split("# data\n")[1].split("# plan")[0]
    web = next(line for line in data.splitlines() if "/s0 (weight 0.75)" in line)
    assert web.split()[-1] == f"{768 * 16:,}"  # 75% of 1024 samples of 16 tokens: exact at a block's end
