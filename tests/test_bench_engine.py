"""The engine benchmark's figures at a tiny size: present, registered in the report, and their invariants
(the planner's per-rank bytes are the tensors', sharding divides the state, chunking lowers the loss's peak).
Timings are not asserted."""

from __future__ import annotations

import os

import pytest

from anneal.bench import engine, report
from anneal.config.model import ModelConfig

TINY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                   num_query_groups=2, kv_channels=16, vocab_size=320, seq_length=16)
TWO_RANKS = [name for name, (world, _, _) in engine.LAYOUTS.items() if world == 2]


def test_every_engine_threshold_and_readme_row_names_a_figure_the_engine_benchmark_makes() -> None:
    layouts = [f"engine_state_{name}_vs_1" for name in engine.LAYOUTS]
    made = {*layouts, "engine_state_planner_error_bytes", "engine_step_fsdp2_2_ranks_ms",
            "engine_step_zero1_2_ranks_ms", "engine_step_1_process_ms", "engine_step_fsdp2_vs_zero1",
            "loss_peak_plain_mib", "loss_peak_chunked_mib", "loss_peak_chunked_vs_plain"}
    registered = {*report.THRESHOLDS, *(key for _, key in report.README_ROWS)}
    assert {k for k in registered if k.startswith(("engine_", "loss_peak_"))} <= made
    assert set(layouts) <= registered


@pytest.mark.slow
def test_state_per_rank_matches_the_planner_and_shards_divide_it_on_two_ranks() -> None:
    results = engine.state_figures(TINY, layouts=TWO_RANKS)
    assert results["engine_state_planner_error_bytes"].max == 0  # native and torch engine alike
    for name in TWO_RANKS:
        measured, planned = results[f"engine_state_{name}_vs_1"], results[f"engine_state_{name}_planned_vs_1"]
        assert measured == planned and measured.unit == "ratio", name
    assert results["engine_state_native_replicated_2_vs_1"].median == 1.0
    assert results["engine_state_native_zero1_2_vs_1"].median == pytest.approx(0.75, abs=1e-3)  # 4 + 4 + 8/2
    assert results["engine_state_fsdp2_2_vs_1"].median == pytest.approx(0.5, abs=1e-3)
    assert 0.5 < results["engine_state_tp2_vs_1"].median < 1.0  # the embedding and norms stay whole


@pytest.mark.slow
def test_step_figures_time_fsdp2_zero1_and_one_process() -> None:
    results = engine.step_figures(1, TINY)
    assert {k for k in results if k.endswith("_ms")} == {
        "engine_step_fsdp2_2_ranks_ms", "engine_step_zero1_2_ranks_ms", "engine_step_1_process_ms"}
    assert all(s.min > 0 for s in results.values())
    assert results["engine_step_fsdp2_vs_zero1"].unit == "ratio"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_chunked_loss_peaks_below_the_plain_one() -> None:
    # 4096 tokens × vocab 4000: the plain loss holds about 3 × 64 MB of fp32 logits, the chunked 3 × 4 MB.
    results = engine.loss_figures(1, shape=(4096, 64, 4000), chunk_size=256)
    assert results["loss_peak_plain_mib"].median > 100
    assert results["loss_peak_chunked_vs_plain"].median < 0.5
