"""``scripts/gpu_check.sh``: every path that runs differently on CUDA, checked in one command, one table.

Each row runs the real entry point (``scripts/pretrain.py``) or the real model on this machine's device:

- Qwen3-0.6B in bf16 on the native engine (ZeRO-1) and on FSDP2, eager and compiled with Inductor:
  tokens/s, TFLOP/s, MFU and the peak memory against the planner's; the compiled runs' logged losses
  against the eager ones', with torch.compile's graph and graph-break counts;
- one forward under ``sdpa_kernel(FLASH_ATTENTION)`` in bf16;
- fp32: the matmul precision in force (``optimizer.tf32``) and the SDPA kernel of a profiled step,
  which must not be the math kernel;
- a checkpoint round trip (a resumed run against a straight one, bit for bit) and, on CUDA, a
  CPU-written checkpoint resumed on the GPU;
- Apex's DistributedFusedAdam against native, where Apex imports;
- ``pytest -m gpu`` and the CPU suite with ``CUDA_VISIBLE_DEVICES=""`` (``--suite``, the default on CUDA).

Without CUDA (``--device cpu``, as CI runs it) the same rows run a tiny model with ``aot_eager``, and the
rows that need CUDA say so. Exit code 1 when a row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anneal.bench.launcher import PRETRAIN, ROOT, _env

GPU_MODEL = ["model=qwen3_0p6b", "dataset=mock", "train.global_batch_size=8", "train.micro_batch_size=4",
             "model.seq_length=2048"]
COMMON = ["train.eval_interval=null", "logger.plot_schedule=false", "scheduler.lr_warmup_iters=5"]
NATIVE = ["optimizer.use_distributed_optimizer=true", "optimizer.distributed_backend=native"]
FSDP2 = ["dist.use_torch_fsdp2=true"]
LOSS_RTOL = {"cuda": 0.05, "cpu": 1e-4}  # compiled against eager: bf16 Inductor fusions; fp32 aot_eager


@dataclass(frozen=True)
class Row:
    check: str
    status: str  # "pass", "FAIL" or "skip"
    figures: str


@dataclass(frozen=True)
class Setup:
    device: str  # cuda or cpu
    iters: int
    out: Path
    model: list[str]  # overrides of the model the throughput rows train
    half: list[str]  # the precision of those rows: bf16 on CUDA; fp32 on CPU (no fast bf16 matmuls here)
    compile_backend: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--iters", type=int, default=30, help="iterations of each throughput run")
    parser.add_argument("--suite", action=argparse.BooleanOptionalAction, default=None,
                        help="run pytest -m gpu and the CPU suite (default: on CUDA)")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"), help="where the runs write")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        print("gpu_check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    setup = Setup("cuda" if cuda else "cpu", args.iters, args.out.resolve(),
                  GPU_MODEL if cuda else ["model.num_layers=2"], ["optimizer.bf16=true"] if cuda else [],
                  "inductor" if cuda else "aot_eager")
    print(f"gpu_check: {_device_name(setup.device)}; runs under {setup.out}", flush=True)
    checks: list[Callable[[Setup], list[Row]]] = [training_rows, flash_row, fp32_row, documents_row, checkpoint_rows,
                                                  apex_row]
    if args.suite if args.suite is not None else cuda:
        checks.append(suite_rows)
    rows = []
    for check in checks:
        start = time.monotonic()
        try:
            new = check(setup)
        except Exception as error:  # one failed check is one row; the others still run
            new = [Row(check.__name__, "FAIL", f"{type(error).__name__}: {error}"[:300])]
        rows += new
        print(f"gpu_check: {', '.join(r.check for r in new)}: {time.monotonic() - start:.0f} s", flush=True)
    print(table(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  status  figures", f"{'-' * width}  ------  -------"]
    lines += [f"{r.check:<{width}}  {r.status:<6}  {r.figures}" for r in rows]
    return "\n".join(lines)


# -- training: throughput, memory against the planner, compiled against eager ---------------------

def training_rows(s: Setup) -> list[Row]:
    rows = []
    for engine, layout in (("native ZeRO-1", NATIVE), ("FSDP2", FSDP2)):
        overrides = [*s.model, *s.half, *layout, f"train.train_iters={s.iters}", "logger.log_interval=5"]
        eager = pretrain(s, f"{_slug(engine)}_eager", overrides)
        rows.append(_throughput_row(s, f"{engine} {_precision(s)} eager", eager, overrides))
        compiled = pretrain(s, f"{_slug(engine)}_compiled",
                            [*overrides, "compile.enable=true", f"compile.backend={s.compile_backend}"])
        row = _throughput_row(s, f"{engine} {_precision(s)} {s.compile_backend}", compiled, overrides)
        if row.status == "pass" and eager.ok:
            worst = max(abs(a - b) / abs(b) for a, b in zip(compiled.losses, eager.losses, strict=True))
            graphs = re.search(r"compile: (\d+) graph\(s\), (\d+) graph break\(s\)", compiled.stdout)
            ok = worst <= LOSS_RTOL[s.device] and graphs is not None and graphs.group(2) == "0"
            counts = f"{graphs.group(1)} graph(s), {graphs.group(2)} break(s)" if graphs else "no compile line"
            row = Row(row.check, "pass" if ok else "FAIL",
                      f"{row.figures}; loss vs eager {worst:.1e} (<= {LOSS_RTOL[s.device]:g}); {counts}")
        rows.append(row)
    return rows


def _throughput_row(s: Setup, name: str, run: Run, overrides: list[str]) -> Row:
    if not run.ok:
        return Row(name, "FAIL", run.failure)
    windows = [r for r in run.records if "tokens_per_s" in r][1:]  # the first holds warm-up and compilation
    if not windows:
        return Row(name, "FAIL", "no timed window after the first")
    tokens = len(windows) / sum(1 / r["tokens_per_s"] for r in windows)  # equal-token windows
    tflops = sum(r["tflops_per_device"] for r in windows) / len(windows)
    mfu = [r["mfu"] for r in windows if r.get("mfu") is not None]
    peak_gib = max(r["peak_mem_mb"] for r in run.records if "peak_mem_mb" in r) / 1024
    planned = planned_peak_gib(overrides, s.device)
    return Row(name, "pass", f"{tokens:,.0f} tok/s, {tflops:.1f} TFLOP/s, MFU "
                             f"{f'{100 * sum(mfu) / len(mfu):.1f}%' if mfu else 'n/a'}, peak {peak_gib:.2f} GiB "
                             f"(planner {planned:.2f} GiB)")


def planned_peak_gib(overrides: list[str], device: str) -> float:
    """The planner's steady peak of one rank for the run's config (what the memory check admitted)."""
    from anneal.config.compose import load
    from anneal.planner import config_layout, kernel_of, parameter_shapes, rank_memory

    cfg = load(overrides)
    memory = rank_memory(cfg, config_layout(cfg, 1), parameter_shapes(cfg.model), kernel_of(cfg, device))
    return memory.need / 2**30


# -- the attention kernels ----------------------------------------------------------------------------

def flash_row(s: Setup) -> list[Row]:
    """One bf16 forward with SDPA restricted to flash attention: it raises if flash cannot run."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, tokens = _model_and_tokens(s, torch.bfloat16)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    ok = bool(torch.isfinite(loss))
    return [Row("bf16 forward under sdpa_kernel(FLASH_ATTENTION)", "pass" if ok else "FAIL", f"loss {loss.item():.3f}")]


def fp32_row(s: Setup) -> list[Row]:
    """fp32: the matmul precision the launcher sets, and the SDPA kernel one profiled step runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from anneal.config.compose import load
    from anneal.training.distributed import set_matmul_precision

    before = torch.get_float32_matmul_precision()
    precision = set_matmul_precision(load(s.model).optimizer.tf32, torch.device(s.device))
    try:
        model, tokens = _model_and_tokens(s, torch.float32)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device == "cuda" else [])
        with profile(activities=activities) as prof:
            model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
    finally:
        torch.set_float32_matmul_precision(before)
    ops = {e.key for e in prof.key_averages()}
    sdpa = sorted(op.removeprefix("aten::") for op in ops if "scaled_dot_product" in op and "backward" not in op)
    math = any("attention_math" in op for op in ops)
    expected = "high" if s.device == "cuda" else before  # TF32 on CUDA by default; the CPU left alone
    ok = not math and precision == expected and bool(sdpa)
    return [Row("fp32 step: matmul precision and SDPA kernel", "pass" if ok else "FAIL",
                f"precision {precision!r}; SDPA ops {', '.join(sdpa) or 'none'}; math kernel "
                f"{'RAN' if math else 'not run'}")]


def documents_row(s: Setup) -> list[Row]:
    """A packed window with Megatron's three document flags against its documents run one by one, in fp32:
    the loss and the gradients (flex_attention and its compiled block mask on CUDA, SDPA with a mask on CPU)."""
    import torch

    from anneal.devices import document_attention_kernel
    from anneal.model.documents import DocumentBoundaries
    from anneal.model.loss import IGNORE_INDEX

    model, tokens = _model_and_tokens(s, torch.float32)
    eod, seq = model.cfg.vocab_size - 1, tokens.shape[1] - 1
    ends = [seq // 8, seq // 3, seq // 3 + 1, 2 * seq // 3]  # EOD inputs: four documents and a cut one
    tokens[0, ends] = eod
    packed = model(**DocumentBoundaries(eod, True, True, True).inputs(tokens), reduction="sum")
    packed.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    alone, start = torch.zeros((), device=s.device), 0
    for end in [e + 1 for e in ends] + [seq]:  # each document from position 0, its EOD's label not counted
        labels = tokens[:, start + 1:end + 1].clone()
        if end - 1 in ends:
            labels[0, -1] = IGNORE_INDEX
        alone = alone + model(tokens[:, start:end], labels=labels, reduction="sum")
        start = end
    alone.backward()
    loss_error = ((packed - alone).abs() / alone.abs()).item()
    grad_error = max(((g - p.grad).norm() / p.grad.norm()).item() for g, p in zip(grads, model.parameters()))
    ok = loss_error < 1e-5 and grad_error < 1e-4
    kernel = document_attention_kernel("fp32", s.device)
    return [Row("packed documents vs one by one (fp32)", "pass" if ok else "FAIL",
                f"{kernel}; loss {loss_error:.1e} (< 1e-05), gradients {grad_error:.1e} (< 1e-04) relative")]


def _model_and_tokens(s: Setup, dtype):
    import torch

    from anneal.config.compose import load
    from anneal.model.qwen3 import build_model

    cfg = load(s.model).model
    torch.manual_seed(0)
    model = build_model(cfg, device=s.device, dtype=dtype)
    seq = min(cfg.seq_length, 1024)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), device=s.device)
    return model, tokens


# -- checkpoints --------------------------------------------------------------------------------------

def checkpoint_rows(s: Setup) -> list[Row]:
    """A resumed run against a straight one (the default tiny model, every iteration logged), on the device."""
    common = [*s.half, f"dist.device={s.device}", "train.train_iters=8", "logger.log_interval=1"]
    straight = [pretrain(s, f"straight_{i}", common) for i in (1, 2)]
    save = s.out / "resume_ckpt"
    first = pretrain(s, "resume_first", [*common, f"checkpoint.save={save}", "checkpoint.save_interval=4",
                                         "train.exit_interval=4"])
    resumed = pretrain(s, "resume_second", [*common, f"checkpoint.save={save}", f"checkpoint.load={save}"])
    runs = (*straight, first, resumed)
    if not all(r.ok for r in runs):
        return [Row("checkpoint round trip", "FAIL", next(r.failure for r in runs if not r.ok))]
    losses = [{r["iteration"]: r["loss"] for r in run.records if "loss" in r} for run in (*straight, resumed)]
    tail = range(5, 9)
    kernels_repeat = [losses[0][i] for i in tail] == [losses[1][i] for i in tail]
    identical = [losses[0][i] for i in tail] == [losses[2][i] for i in tail]
    worst = max(abs(losses[0][i] - losses[2][i]) for i in tail)
    figures = ("iterations 5-8 bit-identical to the straight run" if identical else
               f"iterations 5-8 differ by up to {worst:.1e}"
               + ("" if kernels_repeat else " (two straight runs differ too: nondeterministic kernels)"))
    rows = [Row("checkpoint round trip", "pass" if identical or not kernels_repeat else "FAIL", figures)]
    rows.append(_cpu_checkpoint_on_gpu(s, common) if s.device == "cuda" else
                Row("CPU-written checkpoint resumed on the GPU", "skip", "needs CUDA"))
    return rows


def _cpu_checkpoint_on_gpu(s: Setup, common: list[str]) -> Row:
    save = s.out / "cpu_ckpt"
    on_cpu = [o for o in common if not o.startswith("dist.device=")]
    first = pretrain(s, "cpu_first", [*on_cpu, "dist.device=cpu", f"checkpoint.save={save}",
                                      "checkpoint.save_interval=4", "train.exit_interval=4"])
    second = pretrain(s, "gpu_second", [*on_cpu, "dist.device=cuda", f"checkpoint.save={save}",
                                        f"checkpoint.load={save}"])
    if not (first.ok and second.ok):
        return Row("CPU-written checkpoint resumed on the GPU", "FAIL", (first if not first.ok else second).failure)
    note = re.search(r"resumed from \S+ at iteration 4[^\n]*", second.stdout)
    return Row("CPU-written checkpoint resumed on the GPU", "pass" if note else "FAIL",
               note.group(0)[:200] if note else "no resume line")


# -- Apex, the test suites ----------------------------------------------------------------------------

def apex_row(s: Setup) -> list[Row]:
    from anneal.optim.apex_backend import apex_available

    if s.device != "cuda" or not apex_available():
        return [Row("Apex DistributedFusedAdam vs native", "skip",
                    "needs CUDA" if s.device != "cuda" else "Apex does not import here")]
    common = [*s.model, *s.half, "optimizer.use_distributed_optimizer=true", "train.train_iters=10",
              "logger.log_interval=1"]
    native = pretrain(s, "apex_native", [*common, "optimizer.distributed_backend=native"])
    apex = pretrain(s, "apex", [*common, "optimizer.distributed_backend=apex"])
    if not (native.ok and apex.ok):
        return [Row("Apex DistributedFusedAdam vs native", "FAIL", (native if not native.ok else apex).failure)]
    worst = max(abs(a - b) / abs(b) for a, b in zip(apex.losses, native.losses, strict=True))
    return [Row("Apex DistributedFusedAdam vs native", "pass" if worst <= 0.05 else "FAIL",
                f"loss vs native over 10 iterations {worst:.1e} (<= 0.05)")]


def suite_rows(s: Setup) -> list[Row]:
    gpu = _pytest(["-m", "gpu"], {})
    cpu = _pytest(["-m", "not gpu"], {"CUDA_VISIBLE_DEVICES": ""})
    return [Row("pytest -m gpu", gpu[0], gpu[1]), Row('CPU suite, CUDA_VISIBLE_DEVICES=""', cpu[0], cpu[1])]


def _pytest(args: list[str], env: dict[str, str]) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=ROOT, env={**_env(), **env})
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return ("pass" if done.returncode == 0 else "FAIL"), summary


# -- running the entry point --------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    records: list[dict]

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records if "loss" in r]

    @property
    def failure(self) -> str:
        errors = [line for line in self.stderr.splitlines() if line.startswith("anneal: error:")]
        return f"exit {self.code}: " + (errors[-1] if errors else (self.stderr.strip().splitlines() or [""])[-1])


def pretrain(s: Setup, name: str, overrides: list[str]) -> Run:
    """``scripts/pretrain.py`` in ``<out>/<name>`` (fresh), on the setup's device."""
    run_dir = s.out / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    device = [] if any(o.startswith("dist.device=") for o in overrides) else [f"dist.device={s.device}"]
    args = [sys.executable, PRETRAIN, *COMMON, *device, *overrides, f"hydra.run.dir={run_dir}"]
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=cwd)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return Run(done.returncode, done.stdout, done.stderr, records)


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"


def _precision(s: Setup) -> str:
    return "bf16" if s.half else "fp32"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


if __name__ == "__main__":
    sys.exit(main())
