"""``checkpoint.async_save`` through the real entry point, on 1 and 2 ranks: the loop trains while a save is
written; a SIGKILL during the write leaves the previous checkpoint latest and the rerun resumes bit-identically;
Ctrl-C and SIGTERM wait for the write in flight and exit 130/143 with the checkpoint complete.

``pause_in_save:10`` holds the background write of iteration 10 for ``anneal.faults.PAUSE_S`` (4 s); each
run is killed or signalled once rank 0 has logged iteration 12. The runs start at once in one fixture (they
share nothing).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anneal.checkpoint import files
from anneal_testing import ROOT, free_port, metrics_by_iteration

pytestmark = pytest.mark.slow

RUN = ["model.num_layers=1", "model.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
       "scheduler.lr_warmup_iters=2", "logger.log_interval=1", "train.eval_interval=null",
       "logger.plot_schedule=false", "train.train_iters=15", "checkpoint.save_interval=5",
       "checkpoint.async_save=true"]
LAYOUTS = {1: [], 2: ["optimizer=distributed_fused_adam"]}  # on 2 ranks each writes its optimizer shard


class _Run:
    """``scripts/pretrain.py`` started in ``root/run_dir`` (saving to ``root/ck``), its output read as it comes."""

    def __init__(self, root: Path, run_dir: str, *overrides: str, nproc: int, fault: str | None = None) -> None:
        self.run_dir, self.ck = root / run_dir, root / "ck"
        root.mkdir(parents=True, exist_ok=True)
        script = [str(ROOT / "scripts" / "pretrain.py"), *RUN, *LAYOUTS[nproc], *overrides,
                  f"checkpoint.save={self.ck}", f"hydra.run.dir={self.run_dir}"]
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                    str(free_port())] if nproc > 1 else []
        env = {k: v for k, v in os.environ.items() if k != "ANNEAL_FAULT"}
        env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30"})
        env.update({"ANNEAL_FAULT": fault} if fault else {})
        # SIGINT restored: a child of a non-interactive shell inherits it ignored (shared/PLATFORM.md)
        self.proc = subprocess.Popen([sys.executable, *launcher, *script], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=root,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self._stderr: list[str] = []
        self._readers = [threading.Thread(target=lambda: self.lines.extend(self.proc.stdout)),
                         threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    def wait_for_iteration(self, iteration: int, timeout_s: float = 120) -> None:
        """Until rank 0 has logged ``iteration``."""
        logged = re.compile(rf"\[\s*{iteration}/\d+ ")
        deadline = time.monotonic() + timeout_s
        while not any(logged.search(line) for line in list(self.lines)):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.02)

    def result(self) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=180)
        for reader in self._readers:
            reader.join()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, "".join(self.lines),
                                           "".join(self._stderr))

    def output(self) -> str:
        return "".join(self.lines)[-2000:] + "".join(self._stderr)[-3000:]


def _kill_job(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun's workers do not share its process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    job, todo = [], [pid]
    while todo:
        job.append(todo.pop())
        todo += children.get(job[-1], [])
    for member in job:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _killed_then_rerun(root: Path, nproc: int) -> dict:
    """SIGKILL (the whole job) while the save of iteration 10 is written and iteration 12 logged; then the
    same command again. Keeping one checkpoint: nothing may prune iteration 5 before 10 is complete."""
    killed = _Run(root, "run", "checkpoint.most_recent_k=1", nproc=nproc, fault="pause_in_save:10")
    killed.wait_for_iteration(12)
    tracker_before = (killed.ck / files.TRACKER).read_text()
    _kill_job(killed.proc.pid)
    killed.result()
    after = {"tracker_before_kill": tracker_before, "tracker": (killed.ck / files.TRACKER).read_text(),
             "entries": sorted(p.name for p in killed.ck.iterdir()), "run": killed}
    rerun = _Run(root, "rerun", "checkpoint.most_recent_k=1", nproc=nproc)
    return {**after, "rerun": rerun.result(), "rerun_dir": rerun.run_dir}


def _stopped(root: Path, nproc: int, sig: int) -> _Run:
    """``sig`` while the save of iteration 10 is written and iteration 11 logged (the agent's, on 2 ranks).
    The next save would be iteration 20's, nine iterations of longer sequences later: time for the signal."""
    run = _Run(root, "run", "train.train_iters=200", "checkpoint.save_interval=10", "model.seq_length=128",
               nproc=nproc, fault="pause_in_save:10")
    run.wait_for_iteration(11)
    run.proc.send_signal(sig)
    run.result()
    return run


STOPS = {1: (signal.SIGINT, 130, "Ctrl-C (SIGINT)"), 2: (signal.SIGTERM, 143, "SIGTERM")}  # by ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every scenario at once, each in its own directory."""
    root = tmp_path_factory.mktemp("async_save")
    jobs = {("killed", n): (_killed_then_rerun, n) for n in LAYOUTS}
    jobs.update({("stopped", n): (_stopped, n, STOPS[n][0]) for n in LAYOUTS})
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {key: pool.submit(fn, root / f"{key[0]}_{key[1]}", *args) for key, (fn, *args) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def _iterations_logged_before(run: _Run, line: str) -> list[int]:
    """The iterations rank 0 logged before the first stdout line containing ``line``."""
    at = next(i for i, text in enumerate(run.lines) if line in text)
    return [int(m.group(1)) for text in run.lines[:at] if (m := re.search(r"\[\s*(\d+)/\d+ ", text))]


@pytest.mark.parametrize("nproc", sorted(LAYOUTS))
def test_training_continues_while_a_save_is_written(runs, nproc: int) -> None:
    run = runs["stopped", nproc]
    # The save of iteration 10 took 4 s in the background: iterations 11 and 12 were trained meanwhile.
    assert max(_iterations_logged_before(run, f"saved checkpoint {files.iter_dir(run.ck, 10)}")) >= 12
    killed = runs["killed", nproc]
    assert killed["tracker_before_kill"] == "5\n"  # iteration 12 logged, iteration 10 not yet latest


@pytest.mark.parametrize("nproc", sorted(LAYOUTS))
def test_a_sigkill_during_the_write_keeps_the_previous_checkpoint_and_the_rerun_is_bit_identical(
        runs, nproc: int) -> None:
    killed = runs["killed", nproc]
    ck = killed["run"].ck
    assert killed["tracker"] == "5\n"  # iteration 10 was never marked latest, nor iteration 5 pruned
    assert killed["entries"] == [".iter_0000010.partial", ".lock", "iter_0000005", files.TRACKER]
    rerun = killed["rerun"]
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resumed from {files.iter_dir(ck, 5)} at iteration 5" in rerun.stdout
    assert not list(ck.glob(".iter_*")) and [p.name for p in files.completed(ck)] == ["iter_0000015"]
    # The killed run trained iterations 1-12 straight through: the rerun repeats 6-12 bit for bit.
    straight, resumed = metrics_by_iteration(killed["run"].run_dir), metrics_by_iteration(killed["rerun_dir"])
    assert sorted(resumed) == list(range(6, 16)) and max(straight) >= 12
    for it in range(6, 13):
        keys = ("loss", "lr", "weight_decay", "grad_norm")
        assert [resumed[it][k] for k in keys] == [straight[it][k] for k in keys], f"iteration {it} differs"


@pytest.mark.parametrize("nproc", sorted(LAYOUTS))
def test_a_stop_signal_waits_for_the_write_in_flight_and_exits_with_its_code(runs, nproc: int) -> None:
    run, (_, code, name) = runs["stopped", nproc], STOPS[nproc]
    result = run.result()
    assert (run.run_dir / "exit_code").read_text() == f"{code}\n", run.output()  # torchrun itself says 1
    if nproc == 1:
        assert result.returncode == code
    final = re.search(rf"{re.escape(name)}: stopped cleanly after iteration (\d+); checkpoint (\S+) "
                      rf"\(waited [\d.]+ s for the save of iteration 10 in flight\); exit code {code}", result.stdout)
    assert final is not None, run.output()
    stopped_at = int(final.group(1))
    assert 11 <= stopped_at < 20  # the signal came while iteration 10 was written; no other save was due
    assert final.group(2) == str(files.iter_dir(run.ck, stopped_at))
    assert (run.ck / files.TRACKER).read_text() == f"{stopped_at}\n"
    assert [p.name for p in files.completed(run.ck)] == ["iter_0000010", f"iter_{stopped_at:07d}"]
    for checkpoint in files.completed(run.ck):
        files.verify(checkpoint)
    assert not list(run.ck.glob(".iter_*")) and "anneal: error:" not in result.stderr
    assert nproc > 1 or "Traceback" not in result.stderr  # torchrun's agent prints one for its own SIGTERM
