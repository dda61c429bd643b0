"""Failures through the real entry point: divergence, Ctrl-C, SIGTERM, a stalled rank, errors under torchrun.

Each test asserts the exit code (``anneal.exits``), the one line the user sees, and that the
checkpoint that was good stays the latest and loads.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
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

TINY = ["model.num_layers=1", "model.seq_length=32", "scheduler.lr_warmup_iters=2", "logger.plot_schedule=false",
        "train.eval_interval=null"]


def _command(run_dir: Path, overrides: list[str], nproc: int) -> list[str]:
    args = [*TINY, f"hydra.run.dir={run_dir}", f"checkpoint.save={run_dir / 'ckpt'}", *overrides]
    script = str(ROOT / "scripts" / "pretrain.py")
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), script, *args]


def _env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ANNEAL_FAULT"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30"})
    if fault:
        env["ANNEAL_FAULT"] = fault
    return env


def _pretrain(run_dir: Path, *overrides: str, nproc: int = 1, fault: str | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_command(run_dir, list(overrides), nproc), capture_output=True, text=True,
                          env=_env(fault), cwd=run_dir.parent, timeout=timeout)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("anneal: error:")]


def _latest(run_dir: Path) -> int:
    return int(files.latest(run_dir / "ckpt").name.removeprefix("iter_"))


# -- divergence ---------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "fp16")


@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess, int | None,
                                                  subprocess.CompletedProcess]]:
    """Per precision: a run at lr 1e4 that diverges, its latest checkpoint's iteration, then a resume from
    that checkpoint at a sane lr. The three pairs run at once (one core per process): they share nothing."""
    root = tmp_path_factory.mktemp("diverged")

    def pair(precision: str):
        run = root / precision / "run"
        run.parent.mkdir()
        dtype = [] if precision == "fp32" else [f"optimizer.{precision}=true"]
        result = _pretrain(run, "optimizer.lr=1e4", "train.train_iters=30", "checkpoint.save_interval=3",
                           "checkpoint.most_recent_k=2", "logger.log_interval=10", *dtype)
        latest = _latest(run) if files.latest(run / "ckpt") is not None else None
        check = _pretrain(run, "optimizer.lr=1e-3", "scheduler.override_opt_param_scheduler=true",
                          f"train.train_iters={(latest or 0) + 1}", "logger.log_interval=1", *dtype)
        return run, result, latest, check

    with ThreadPoolExecutor(max_workers=len(PRECISIONS)) as pool:
        return dict(zip(PRECISIONS, pool.map(pair, PRECISIONS)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_divergence_stops_and_keeps_the_last_finite_checkpoint(diverged, precision: str) -> None:
    run, result, latest, check = diverged[precision]
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = _error_lines(result.stderr)
    assert "training diverged" in line and "not finite" in line, line
    assert latest is not None, "no checkpoint was kept"
    assert f"checkpoint.load={files.iter_dir(run / 'ckpt', latest)}" in line
    assert "Traceback" not in result.stderr
    # Everything saved loads: a resume at a sane lr (train.train_iters=latest + 1) takes it. Its one step
    # may still overflow: after lr 1e4 the finite weights can be large enough that the next forward is
    # not (it depends on the CPU's kernels), and then it stops as a divergence at that step, nothing lost.
    saved = files.iter_dir(run / "ckpt", latest)
    assert f"resumed from {saved}" in check.stdout, check.stderr[-2000:]
    stopped = _error_lines(check.stderr)
    assert check.returncode == 0 or (check.returncode == 1 and len(stopped) == 1 and
                                     f"from iteration {latest + 1} " in stopped[0]), check.stderr[-2000:]
    # ... and is finite: every weight, read back through the exporter's loader.
    from safetensors.torch import load_file

    from anneal.hf.exporter import export_checkpoint

    weights = load_file(export_checkpoint(saved, run.parent / "hf", max_shard_bytes=10**10).written[0])
    assert weights and all(bool(t.float().isfinite().all()) for t in weights.values())


def test_divergence_is_found_at_the_same_iteration_on_every_rank(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _pretrain(run, "optimizer.lr=1e4", "train.train_iters=30", "checkpoint.save_interval=3",
                       "logger.log_interval=10", "optimizer=distributed_fused_adam", nproc=2)
    assert result.returncode != 0
    lines = _error_lines(result.stderr)
    assert len(lines) == 2, result.stderr[-3000:]
    assert lines[0].replace("[rank 1] ", "") == lines[1].replace("[rank 1] ", ""), lines
    assert files.latest(run / "ckpt") is not None


def test_the_loop_adds_no_host_sync_per_iteration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Reads of tensor values to the host do not grow with the number of iterations between logs."""
    import torch

    from anneal.config.compose import load
    from anneal.training.run import run

    counts = {"n": 0}
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(iters: int) -> int:
        counts["n"] = 0
        cfg = load([*TINY, f"train.train_iters={iters}", f"logger.log_interval={iters}",
                    "logger.progress_bar=false"], "config", None)
        monkeypatch.chdir(tmp_path)
        assert run(cfg, cfg.validate()) == 0
        return counts["n"]

    syncs(4)  # warm-up: first-call costs (lazy init) are not the loop's
    assert syncs(4) == syncs(16)


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------------------

def _interrupt_during_save(run_dir: Path, signals: list[int], *, nproc: int = 1) -> subprocess.CompletedProcess:
    """Start a run whose save at iteration 10 is slow, send ``signals`` (1.5 s apart) while it saves."""
    overrides = ["train.train_iters=200", "checkpoint.save_interval=5", "logger.log_interval=5"]
    proc = subprocess.Popen(_command(run_dir, overrides, nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env("pause_in_save:10"), cwd=run_dir.parent,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = files.partial_dir(run_dir / "ckpt", 10)
    deadline = time.monotonic() + 180
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    for i, sig in enumerate(signals):
        if i:
            time.sleep(1.5)
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C (SIGINT)"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stop_signal_during_a_save_finishes_it_and_exits_with_its_code(tmp_path: Path, sig, code, name) -> None:
    run = tmp_path / "run"
    result = _interrupt_during_save(run, [sig])
    assert result.returncode == code, result.stderr[-2000:]
    assert f"{name}: stopped cleanly after iteration 10; checkpoint {files.iter_dir(run / 'ckpt', 10)}" in result.stdout
    assert "Traceback" not in result.stderr and not _error_lines(result.stderr)
    assert _latest(run) == 10 and not list((run / "ckpt").glob(".iter_*.partial"))


def test_a_second_ctrl_c_aborts_and_the_previous_checkpoint_loads(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _interrupt_during_save(run, [signal.SIGINT, signal.SIGINT])
    assert result.returncode == 130, result.stderr[-2000:]
    (line,) = _error_lines(result.stderr)
    assert "Ctrl-C again: aborted" in line and f"the latest checkpoint is {files.iter_dir(run / 'ckpt', 5)}" in line
    assert "Traceback" not in result.stderr
    assert _latest(run) == 5
    resumed = _pretrain(run, "train.train_iters=200", "train.exit_interval=6", "logger.log_interval=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {files.iter_dir(run / 'ckpt', 5)}" in resumed.stdout
    assert not list((run / "ckpt").glob(".iter_*.partial"))  # the aborted save is cleaned up


def test_ctrl_c_under_torchrun_stops_every_rank_with_a_save(tmp_path: Path) -> None:
    """SIGINT to the torchrun agent alone: it forwards the signal and every rank stops at one iteration."""
    run = tmp_path / "run"
    result = _interrupt_during_save(run, [signal.SIGINT], nproc=2)
    assert result.returncode != 0
    assert f"Ctrl-C (SIGINT): stopped cleanly after iteration 10; checkpoint {files.iter_dir(run / 'ckpt', 10)}" \
        in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert not _error_lines(result.stderr)
    assert _latest(run) == 10 and max(metrics_by_iteration(run)) == 10
    assert (run / "exit_code").read_text() == "130\n"  # torchrun says 1; the requeue reads this


def test_sigterm_under_torchrun_is_agreed_within_seconds_without_a_logging_step(tmp_path: Path) -> None:
    """SIGTERM to the torchrun agent with no logging step or save in sight: every rank stops at one iteration
    within about AGREE_EVERY_S plus an iteration, saves and exits 143 (before: at the next logging step, here
    never; torchrun SIGKILLs its workers 30 s after the signal)."""
    from anneal.training.signals import AGREE_EVERY_S

    run = tmp_path / "run"
    overrides = ["train.train_iters=100000", "logger.log_interval=100000"]
    with open(tmp_path / "out.log", "w+") as out, open(tmp_path / "err.log", "w+") as err:
        proc = subprocess.Popen(_command(run, overrides, 2), stdout=out, stderr=err, text=True,
                                env=_env(None), cwd=run.parent)
        deadline = time.monotonic() + 120
        while "global batch" not in _text(run / "pretrain.log") and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)  # mid-run: the agreements' windows have grown from one iteration to seconds
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proc.wait(timeout=60)
        stopped_s = time.monotonic() - signalled
    stdout, stderr = _text(tmp_path / "out.log"), _text(tmp_path / "err.log")
    match = re.search(r"SIGTERM: stopped cleanly after iteration (\d+); checkpoint (\S+);", stdout)
    assert match, stdout[-2000:] + stderr[-2000:]
    stopped_at = int(match.group(1))
    assert match.group(2) == str(files.iter_dir(run / "ckpt", stopped_at)) and not _error_lines(stderr)
    assert _latest(run) == stopped_at < 100000
    assert (run / "exit_code").read_text() == "143\n"
    # the agreement (iterations of a few ms here), the save, the exit of both ranks and of torchrun (~2-4 s)
    assert stopped_s < AGREE_EVERY_S + 10, stopped_s


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# -- errors under torchrun ----------------------------------------------------------------------------

def _kill_the_frozen_rank(line: str) -> None:
    """SIGKILL the worker torchrun is closing if it is the frozen (SIGSTOPped) rank.

    torchrun (2.13) stops failed workers with a fixed 30 s grace, not --shutdown-timeout: a frozen rank
    never acts on the SIGTERM, so it would cost 30 s of waiting here before torchrun's own SIGKILL.
    """
    match = re.search(r"Sending process (\d+) closing signal SIGTERM", line)
    if match is None:
        return
    pid = int(match.group(1))
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):  # gone already
        pass


def test_a_stalled_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = ["train.train_iters=40", "dist.timeout_minutes=0.25", "logger.log_interval=2",
                 "checkpoint.save_interval=2"]
    start = time.monotonic()
    proc = subprocess.Popen(_command(run, overrides, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env("stop_at_iteration:5:1"), cwd=run.parent, start_new_session=True)
    watchdog = threading.Timer(200, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()))
    reader.start()
    stderr, reported = [], None
    try:
        for line in proc.stderr:  # until every process of the job has closed it
            stderr.append(line)
            if line.startswith("anneal: error:") and reported is None:
                reported = time.monotonic() - start
            _kill_the_frozen_rank(line)  # only once rank 0 has exited and torchrun ends the job
        returncode = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        reader.join(timeout=60)
    result = subprocess.CompletedProcess(proc.args, returncode, "".join(stdout), "".join(stderr))
    assert result.returncode != 0, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr)
    # Named by the peer monitor from rank 1's silent heartbeat, before the collective's timeout: the same
    # mechanism that runs before NCCL's watchdog aborts the process.
    assert re.fullmatch(r"anneal: error: rank 1 \(no heartbeat for 1[3-6] s\) stalled or died in iteration 5: "
                        r"this rank waited 1[3-5] s, close to dist\.timeout_minutes \(0\.25\); "
                        r"relaunch to resume from \S+/ckpt/iter_0000004", line), line
    assert (run / "exit_code").read_text() == "1\n"
    # 13.5 s (0.9 of the timeout) after start-up and 4 iterations; then the job ends: rank 0 exits, torchrun
    # stops rank 1 (at once when the frozen rank is killed above, else after torchrun's 30 s).
    assert reported is not None and reported < 15 + 40, reported
    assert time.monotonic() - start < reported + 45


def test_a_lost_node_is_named_with_the_checkpoint_to_resume_from(tmp_path: Path) -> None:
    """Two torchrun "nodes" on loopback; node 1 (its agent and its worker) is SIGKILLed mid-run. The survivor's
    collective fails at once with gloo's "Connection reset/closed by peer"; the peer monitor names the lost rank
    from its silent heartbeat, with the iteration and the checkpoint to resume from."""
    run, port = tmp_path / "run", free_port()
    args = [*TINY, f"hydra.run.dir={run}", f"checkpoint.save={run / 'ckpt'}", "train.train_iters=100000",
            "checkpoint.save_interval=2", "logger.log_interval=2", "dist.timeout_minutes=0.25"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lost-node",
           str(ROOT / "scripts" / "pretrain.py"), *args]
    logs = [open(tmp_path / f"node{i}.log", "w+") for i in range(2)]  # noqa: SIM115
    start = lambda log: subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,  # noqa: E731
                                         env=_env(None), cwd=tmp_path)
    survivor = start(logs[0])  # the first agent binds the port and hosts the job's store, as a first node does
    deadline = time.monotonic() + 180
    while not _listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    lost = start(logs[1])
    try:
        while (files.latest(run / "ckpt") is None or _latest(run) < 4) and time.monotonic() < deadline:
            assert survivor.poll() is None and lost.poll() is None, Path(logs[0].name).read_text()[-3000:]
            time.sleep(0.2)
        for pid in (lost.pid, *_children(lost.pid)):  # the whole node: torchrun starts workers in their own session
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        survivor.wait(timeout=90)
    finally:
        for agent in (survivor, lost):
            for pid in (*_children(agent.pid), agent.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    output = Path(logs[0].name).read_text()
    assert survivor.returncode != 0, output[-3000:]
    (line,) = _error_lines(output)
    rank = 1 if line.startswith("anneal: error: [rank 1] ") else 0  # the survivor's
    match = re.fullmatch(rf"anneal: error: (\[rank 1\] )?lost rank {1 - rank} \(no heartbeat for \d+ s\) while "
                         r"training after iteration (\d+): its process or node is gone \(.*(reset|closed) by peer.*\); "
                         r"relaunch to resume from \S+/ckpt/iter_(\d+)", line)
    assert match, line
    assert 4 <= int(match.group(4)) <= int(match.group(2)) <= int(match.group(4)) + 2
    assert time.monotonic() - killed < 60


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_a_corrupted_checkpoint_under_torchrun_fails_loudly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _pretrain(run, "train.train_iters=8", "train.exit_interval=4", "checkpoint.save_interval=2",
                      "logger.log_interval=2")
    assert first.returncode == 0, first.stderr[-2000:]
    victim = max((run / "ckpt" / "iter_0000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = _pretrain(run, "train.train_iters=8", nproc=2)
    assert result.returncode != 0
    lines = _error_lines(result.stderr)
    assert lines and all(victim.name in line for line in lines), result.stderr[-3000:]


def test_exit_codes_name_the_outcome(tmp_path: Path) -> None:
    finished = _pretrain(tmp_path / "a", "train.train_iters=3")
    bad_config = _pretrain(tmp_path / "b", "train.train_iters=-1")
    assert (finished.returncode, bad_config.returncode) == (0, 2), (finished.stderr[-1000:], bad_config.stderr)
    again = _pretrain(tmp_path / "a", "train.train_iters=3")
    assert again.returncode == 0
    assert "already complete: the checkpoint is at iteration 3" in again.stdout
    assert "set train.train_iters above 3" in again.stdout
