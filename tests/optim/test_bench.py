"""The benchmark's one-rank half runs and its table formats (the full run is scripts/bench_optimizer.py)."""

from __future__ import annotations

from anneal.optim import bench


def test_one_rank_benchmark_runs_and_formats_a_table():
    results = bench.one_rank_results(2 * bench.HIDDEN * bench.HIDDEN, repeats=1, inplace_bytes=4_000_000)
    assert set(results) >= {"mul_ms", "torch_fused_ms", "anneal_ms", "torch_fused_clip_ms", "anneal_clip_ms"}
    fake_two_rank = {f"r2_{k}": 1.0 for k in (
        "mul_ms", "torch_fused_full_ms", "zero1_step_ms", "zero1_reduce_ms", "zero1_norm_ms",
        "zero1_update_ms", "zero1_gather_ms", "zro_reduce_ms", "zro_step_ms",
    )}  # fmt: skip
    table = bench.format_table(
        {"num_params": 2.0**23, "num_bias_params": 4096, "threads": 1, **results, **fake_two_rank}
    )
    assert "anneal, 1 rank, clip_grad=0" in table and "native-zero1 update" in table
