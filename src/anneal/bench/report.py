"""Run every benchmark, print one table, write JSON, update README's table, flag regressions."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

from anneal.bench.stats import Stat

# figure -> (">=" or "<=", limit): far past what was measured here, so noise never trips it.
THRESHOLDS = {
    "launcher_vs_bare": (">=", 0.85),
    "first_iteration_vs_import_torch": ("<=", 8.0),
    "dry_run_vs_import_torch": ("<=", 1.5),  # 1.19 measured; 1.78 when the dry run imported DCP and sympy
    "dry_run_schedule_printed_s": ("<=", 2.5),
    "optimizer_vs_adamw_foreach": ("<=", 0.6),
    "optimizer_vs_adamw_fused": ("<=", 1.3),
    "optimizer_traffic_of_inplace_bandwidth": (">=", 0.6),
    "dist_state_2_ranks_vs_1": ("<=", 0.55),
    "engine_state_native_zero1_2_vs_1": ("<=", 0.8),  # 0.75 in fp32: weights and grads stay whole
    "engine_state_fsdp2_2_vs_1": ("<=", 0.55),
    "engine_state_hsdp_2x2_vs_1": ("<=", 0.55),
    "engine_state_tp2_fsdp2_2_vs_1": ("<=", 0.4),  # the embedding is replicated over tp
    "engine_state_planner_error_bytes": ("<=", 0),  # the planner's per-rank bytes are the tensors'
    "engine_step_fsdp2_vs_zero1": ("<=", 3.0),  # 1.1–1.8 measured at 42M params; 2.9 at a latency-bound 76k
    "loss_peak_chunked_vs_plain": ("<=", 0.5),
    "checkpoint_save_vs_torch_save": ("<=", 8.0),
    "async_save_blocking_ratio": ("<=", 0.25),  # the bar; 0.11-0.13 measured
    "checksum_gib_per_s_per_rank": (">=", 0.5),  # 1.8-3.3 GiB/s from the page cache
    "construction_peak_vs_steady": ("<=", 1.1),  # 1.00 measured; 1.62 when the fp32 model was built whole
    "checkpoint_load_vs_torch_load": ("<=", 8.0),
    "hf_export_vs_save_file": ("<=", 10.0),
    "hf_import_vs_load_file": ("<=", 5.0),
    "scheduler_step_ns_10_groups": ("<=", 200_000),
    "schedule_1m_points_s": ("<=", 15.0),
}
README_ROWS = [
    ("launcher tokens/s ÷ bare PyTorch loop", "launcher_vs_bare"),
    ("seconds to the first finished iteration", "time_to_first_iteration_s"),
    ("… ÷ `python -c 'import torch'`", "first_iteration_vs_import_torch"),
    ("dry run, default config: schedule printed (s)", "dry_run_schedule_printed_s"),
    ("dry run, default config, with the planner (s)", "dry_run_s"),
    ("… ÷ `python -c 'import torch'`", "dry_run_vs_import_torch"),
    ("dry run, `recipe=qwen3_4b` with the planner (s)", "dry_run_qwen3_4b_s"),
    ("optimizer step, 50M params (ms)", "optimizer_step_ms"),
    ("… ÷ `AdamW(foreach=True)`", "optimizer_vs_adamw_foreach"),
    ("… ÷ `AdamW(fused=True)`", "optimizer_vs_adamw_fused"),
    ("… traffic ÷ in-place `mul_` bandwidth", "optimizer_traffic_of_inplace_bandwidth"),
    ("distributed optimizer state per rank, 2 ranks ÷ 1", "dist_state_2_ranks_vs_1"),
    ("model state per rank ÷ 1 process (fp32, 42M params): native replicated, 2 ranks",
     "engine_state_native_replicated_2_vs_1"),
    ("… native ZeRO-1, 2 ranks", "engine_state_native_zero1_2_vs_1"),
    ("… FSDP2, 2 ranks", "engine_state_fsdp2_2_vs_1"),
    ("… tensor parallel 2", "engine_state_tp2_vs_1"),
    ("… HSDP 2×2", "engine_state_hsdp_2x2_vs_1"),
    ("… TP 2 × FSDP2 2", "engine_state_tp2_fsdp2_2_vs_1"),
    ("… planner's bytes − measured, largest over layouts and ranks", "engine_state_planner_error_bytes"),
    ("training step, 42M params, FSDP2, 2 ranks × 1 thread (ms)", "engine_step_fsdp2_2_ranks_ms"),
    ("… native ZeRO-1, 2 ranks × 1 thread (ms)", "engine_step_zero1_2_ranks_ms"),
    ("… FSDP2 ÷ native ZeRO-1", "engine_step_fsdp2_vs_zero1"),
    ("… one native process, 1 thread (ms)", "engine_step_1_process_ms"),
    ("loss peak memory, 8192 tokens × vocab 32000, plain (MiB)", "loss_peak_plain_mib"),
    ("… chunked, 1024 tokens a chunk (MiB)", "loss_peak_chunked_mib"),
    ("… chunked ÷ plain", "loss_peak_chunked_vs_plain"),
    ("checkpoint save ÷ `torch.save`", "checkpoint_save_vs_torch_save"),
    ("checkpoint save ÷ `torch.save` + fsync (same durability)", "checkpoint_save_vs_torch_save_fsync"),
    ("checkpoint load ÷ `torch.load`", "checkpoint_load_vs_torch_load"),
    ("checkpoint CRC32 per rank, from the page cache (GiB/s)", "checksum_gib_per_s_per_rank"),
    ("async save (`checkpoint.async_save`), 1 GiB: blocking ÷ a synchronous save", "async_save_blocking_ratio"),
    ("… synchronous save, blocking (s)", "sync_save_blocking_s"),
    ("… async save, blocking (s)", "async_save_blocking_s"),
    ("… async save, until written and latest (s)", "async_save_total_s"),
    ("model construction, Qwen3-0.6B bf16, ZeRO-1 over 64: peak ÷ steady RSS", "construction_peak_vs_steady"),
    ("… planner's construction ÷ steady figure", "construction_planned_vs_steady"),
    ("HF export, Qwen3-0.6B bf16 (s)", "hf_export_s"),
    ("… ÷ safetensors `save_file`", "hf_export_vs_save_file"),
    ("HF import into the model (s)", "hf_import_s"),
    ("… ÷ `load_file` + copy into the model", "hf_import_vs_load_file"),
    ("scheduler `step()`, 10 groups (ns)", "scheduler_step_ns_10_groups"),
    ("1M schedule points, lr and wd (s)", "schedule_1m_points_s"),
]


def run_all(repeats: int) -> dict[str, Stat]:
    from anneal.bench import async_save, components, construction, engine, gpu, hf, launcher, optimizer

    sections = [("scheduler", lambda: components.scheduler_figures(repeats)),
                ("checkpoint", lambda: components.checkpoint_figures(repeats)),
                ("checkpoint checksums", lambda: components.checksum_figures(repeats)),
                # Three runs of the long sections (1 GiB saves, whole processes) keep the bench under 5
                # minutes on 2 cores (4 min 51 s with five async pairs).
                ("asynchronous checkpoint save, 1 GiB",
                 lambda: async_save.async_blocking_ratio(repeats=min(repeats, 3))),
                # One build in a fresh process: its peak resident memory is a high-water mark.
                ("construction peak, Qwen3-0.6B bf16 ZeRO-1 over 64", construction.construction_peak_ratio),
                ("Hugging Face export/import", lambda: hf.hf_figures(min(repeats, 3))),
                ("optimizer", lambda: optimizer.step_figures(repeats)),
                ("distributed optimizer state", optimizer.state_figures),
                ("model state per rank, every layout", engine.state_figures),
                ("FSDP2 and ZeRO-1 training steps", lambda: engine.step_figures(repeats)),
                # Peak memory repeats to within a few MiB: two runs show it.
                ("chunked loss peak memory", lambda: engine.loss_figures(min(repeats, 2))),
                ("start-up", lambda: launcher.startup(min(repeats, 3))),
                ("launcher overhead", lambda: launcher.overhead(min(repeats, 3))),
                ("GPU (skipped without CUDA)", gpu.gpu_figures)]
    results: dict[str, Stat] = {}
    for name, section in sections:
        start = time.perf_counter()
        results.update(section())
        print(f"bench: {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return results


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def table(results: dict[str, Stat]) -> str:
    rows = [("figure", "median", "min", "max", "unit", "threshold")]
    for name, s in results.items():
        limit = THRESHOLDS.get(name)
        rows.append((name, f"{s.median:.4g}", f"{s.min:.4g}", f"{s.max:.4g}", s.unit,
                     f"{limit[0]} {limit[1]:g}" if limit else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths))).rstrip() for r in rows)


def regressions(results: dict[str, Stat]) -> list[str]:
    bad = []
    for name, (op, limit) in THRESHOLDS.items():
        value = results[name].median if name in results else None
        if value is not None and not (value >= limit if op == ">=" else value <= limit):
            bad.append(f"{name} = {value:.4g}, threshold {op} {limit:g}")
    return bad


def readme_table(payload: dict) -> str:
    results = payload["results"]
    lines = [f"Measured by `python scripts/bench.py` on {payload['machine']} ({payload['date']}); "
             "median of the runs, [min – max]. Ratios are taken run by run, side by side.", "",
             "| figure | median | range |", "|---|---|---|"]
    for label, key in README_ROWS:
        if key in results:
            r = results[key]
            lines.append(f"| {label} | {r['median']:.3g} | {r['min']:.3g} – {r['max']:.3g} |")
    lines += ["", f"GPU figures (tokens/s, TFLOP/s, MFU of Qwen3 0.6B/1.7B in bf16): {payload['gpu']}."]
    return "\n".join(lines)


def update_readme(readme: Path, payload: dict) -> None:
    text = readme.read_text()
    block = f"<!-- bench:start -->\n{readme_table(payload)}\n<!-- bench:end -->"
    new, count = re.subn(r"<!-- bench:start -->.*<!-- bench:end -->", block, text, flags=re.S)
    readme.write_text(new if count else f"{text.rstrip()}\n\n## Performance\n\n{block}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run anneal's benchmarks side by side and report them.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_results/bench.json")
    parser.add_argument("--readme", help="update this README's Performance table from the results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run_all(args.repeats)
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
               "seconds": round(time.perf_counter() - started), "thresholds": THRESHOLDS,
               "results": {k: v.as_dict() for k, v in results.items()},
               "gpu": "skipped: no CUDA device" if "no GPU" in machine() else "see results"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"{payload['machine']}; {args.repeats} runs each after a warm-up; {payload['seconds']} s in all")
    print(table(results))
    print(f"GPU figures: {payload['gpu']}\nJSON: {out}")
    if args.readme:
        update_readme(Path(args.readme), payload)
    bad = regressions(results)
    for line in bad:
        print(f"REGRESSION: {line}", file=sys.stderr)
    return 1 if bad else 0
