"""A plain dry run imports what its path needs: no ``torch.distributed.checkpoint`` without a checkpoint."""

from __future__ import annotations

from pathlib import Path

from anneal_testing import run_cli


def test_a_plain_dry_run_does_not_import_torch_distributed_checkpoint(tmp_path: Path) -> None:
    # -X importtime, set through the environment: every imported module is listed on stderr
    result = run_cli("dry_run=true", env={"PYTHONPROFILEIMPORTTIME": "1", "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "anneal.resume_preview" in imported  # the dry run did reach its resume part
    assert "torch.distributed.checkpoint" not in imported
    assert "sympy" not in imported
