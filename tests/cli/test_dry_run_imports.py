"""A plain dry run imports what its path needs: no ``torch.distributed.checkpoint`` without a checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from anneal_testing import ROOT, run_cli


def test_a_plain_dry_run_does_not_import_torch_distributed_checkpoint(tmp_path: Path) -> None:
    # -X importtime, set through the environment: every imported module is listed on stderr
    result = run_cli("dry_run=true", env={"PYTHONPROFILEIMPORTTIME": "1", "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "anneal.resume_preview" in imported  # the dry run did reach its resume part
    assert "torch.distributed.checkpoint" not in imported
    assert "sympy" not in imported


def test_the_dry_run_prints_its_schedule_before_importing_torch(tmp_path: Path) -> None:
    """torch (1-2 s to import) comes with the plan, after the schedule; checking Hydra's logging config
    imports anneal's formatter, which must not bring it (it did, through anneal.training.metrics)."""
    pretrain = ROOT / "scripts" / "pretrain.py"
    script = ("import runpy, sys\n"
              "import anneal.cli.dry_run as dry_run\n"
              "parts = dry_run.report_parts\n"
              "def watched(*args, **kwargs):\n"
              "    for part in parts(*args, **kwargs):\n"
              "        if part.startswith('# derived'):\n"
              "            print('TORCH BEFORE THE SCHEDULE:', 'torch' in sys.modules, flush=True)\n"
              "        yield part\n"
              "dry_run.report_parts = watched\n"
              f"sys.argv = [{str(pretrain)!r}, 'dry_run=true']\n"
              f"runpy.run_path({str(pretrain)!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "TORCH BEFORE THE SCHEDULE: False" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
