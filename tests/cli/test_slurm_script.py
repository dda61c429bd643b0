"""``scripts/slurm_pretrain.sbatch`` requeues a job stopped after a checkpoint (130/143), never another.

SLURM is not here: ``srun``, ``scontrol`` and ``torchrun`` are stand-ins on PATH. The stand-in
torchrun does what the real job does at its end: rank 0 writes the run's code to
``<run dir>/exit_code``, and torchrun itself exits 1 for any failed worker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from anneal_testing import ROOT

FAKES = {
    "srun": '#!/bin/bash\nshift\nexec "$@"\n',
    "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo node0; else echo "$@" >> "$CALLS"; fi\n',
    "torchrun": '#!/bin/bash\nfor a in "$@"; do case $a in hydra.run.dir=*) d=${a#hydra.run.dir=};; esac; done\n'
                'mkdir -p "$d" && echo "$RUN_CODE" > "$d/exit_code"\n[ "$RUN_CODE" = 0 ] && exit 0 || exit 1\n',
}


@pytest.mark.parametrize("run_code, requeued", [(0, False), (1, False), (2, False), (130, True), (143, True)])
def test_requeue_only_after_a_stop_with_a_checkpoint(tmp_path: Path, run_code: int, requeued: bool) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "RUN_CODE": str(run_code),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_pretrain.sbatch"), "recipe=tiny"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == run_code, result.stderr
    assert (calls.read_text() if calls.exists() else "") == ("requeue 77\n" if requeued else "")
