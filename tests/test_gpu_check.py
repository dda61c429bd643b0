"""``scripts/gpu_check.sh`` as CI can run it: every row on the CPU, the CUDA-only rows saying so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from anneal.bench.gpu_check import Row, table
from anneal_testing import ROOT

CPU_ROWS = ["native ZeRO-1 fp32 eager", "native ZeRO-1 fp32 aot_eager", "FSDP2 fp32 eager", "FSDP2 fp32 aot_eager",
            "bf16 forward under sdpa_kernel(FLASH_ATTENTION)", "fp32 step: matmul precision and SDPA kernel",
            "packed documents vs one by one (fp32)", "checkpoint round trip"]
CUDA_ROWS = ["CPU-written checkpoint resumed on the GPU", "Apex DistributedFusedAdam vs native"]


def test_the_gpu_check_runs_its_cpu_rows_and_names_the_rest(tmp_path: Path) -> None:
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--iters", "6", "--no-suite",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(done.stdout)
    assert list(rows) == CPU_ROWS + CUDA_ROWS
    assert all(rows[name][0] == "pass" for name in CPU_ROWS), rows
    assert all(rows[name] == ("skip", "needs CUDA") for name in CUDA_ROWS), rows
    for name in ("native ZeRO-1 fp32 aot_eager", "FSDP2 fp32 aot_eager"):  # against the eager run before it
        assert re.search(r"loss vs eager \S+ \(<= 0.0001\); 1 graph\(s\), 0 break\(s\)$", rows[name][1]), rows[name]
    assert re.match(r"[\d,]+ tok/s, [\d.]+ TFLOP/s, MFU n/a, peak [\d.]+ GiB \(planner [\d.]+ GiB\)",
                    rows["FSDP2 fp32 eager"][1])
    assert rows["checkpoint round trip"][1] == "iterations 5-8 bit-identical to the straight run"
    assert rows["fp32 step: matmul precision and SDPA kernel"][1].endswith("math kernel not run")
    assert rows["packed documents vs one by one (fp32)"][1].startswith("sdpa+mask; loss ")


def _rows(stdout: str) -> dict[str, tuple[str, str]]:
    """The table's rows: check -> (status, figures)."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("check ") and "status  figures" in line)
    width = lines[head].index("  status")
    return {line[:width].rstrip(): tuple(line[width + 2:].split(None, 1)) for line in lines[head + 2:]}


def test_a_failed_row_is_named_in_the_table() -> None:
    text = table([Row("a check", "pass", "1 tok/s"), Row("a longer check", "FAIL", "exit 2: anneal: error: x")])
    assert text.splitlines() == ["check           status  figures", "--------------  ------  -------",
                                 "a check         pass    1 tok/s",
                                 "a longer check  FAIL    exit 2: anneal: error: x"]
