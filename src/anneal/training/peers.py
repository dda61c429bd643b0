"""Naming a stalled or lost rank, on NCCL as on gloo, before a collective's timeout ends the job.

On NCCL a collective that waits past ``dist.timeout_minutes`` is ended by PyTorch's watchdog, which
aborts the process before Python sees an error; a lost peer surfaces as a raw transport error. So
while training, every rank runs one daemon thread (``PeerMonitor``) that

- publishes a heartbeat every ``interval_s`` (a time, not an iteration: one store write per rank every
  few seconds, whatever the step time): this rank's iteration and a beat count, in the job's store;
- once this rank has made no progress for ``deadline_s`` (0.9 of the timeout), names the ranks that
  went silent (no beat for ``SILENT_BEATS`` intervals: frozen or dead) or fell behind, in one line,
  and ends the process with exit code 1, before the watchdog (or gloo's timeout) fires.

Silence is judged by this rank's own clock (a beat count that stops changing), so clocks of other
nodes never matter. A lost peer (connection reset, an NCCL remote error) is named the same way:
``lost()`` waits for the rank that is gone to fall silent. Peers are read only by a rank that is
stuck, so a healthy step costs no store traffic beyond the beats.
"""

from __future__ import annotations

import datetime
import re
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from anneal.training.distributed import job_store

SILENT_BEATS = 3  # a rank whose beat count stays the same this many intervals is frozen or gone
_LOST_PEER = ("connection reset", "connection closed", "connection refused", "broken pipe",
              "remote process exited", "ncclremoteerror", "communicator was aborted")


def is_lost_peer(error: BaseException) -> bool:
    """True for the transport errors a collective raises when a peer process or node is gone."""
    return any(pattern in str(error).lower() for pattern in _LOST_PEER)


def transport_cause(error: BaseException) -> str:
    """'Read error [127.0.0.1]:1746: Connection reset by peer': the first sentence, without the source path."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cpp|cc|h|hpp):\d+\]\s*", "", text)  # gloo's "[.../pair.cc:537] "
    return text.split(". ")[0].rstrip(".")


def intervals(timeout_s: float) -> tuple[float, float]:
    """(beat interval, stall deadline) in seconds for a collective timeout of ``timeout_s``."""
    return min(5.0, max(0.2, timeout_s / 20)), 0.9 * timeout_s


class PeerMonitor:
    """The heartbeat and stall watch of one rank (see the module); a context manager around the loop."""

    def __init__(self, store: dist.Store, *, rank: int, world_size: int, timeout_s: float,
                 progress: Callable[[], int], on_stall: Callable[[str], None]) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s, self.deadline_s = intervals(timeout_s)
        self._store, self._progress, self._on_stall = store, progress, on_stall
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (its last beat, when this rank saw it change)
        self._watch_from: float | None = None  # when this rank started reading its peers
        self._beats = 0  # this rank's beats so far: every rank beats at the same pace from the loop's start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost_wanted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anneal-peer-monitor", daemon=True)

    @classmethod
    def for_job(cls, *, rank: int, world_size: int, timeout_s: float, progress: Callable[[], int],
                on_stall: Callable[[str], None]) -> PeerMonitor:
        """A monitor with its own client of torchrun's store (short timeouts: it never blocks the loop)."""
        interval_s, _ = intervals(timeout_s)
        store = job_store(datetime.timedelta(seconds=max(2.0, 2 * interval_s)))
        return cls(store, rank=rank, world_size=world_size, timeout_s=timeout_s, progress=progress,
                   on_stall=on_stall)

    def __enter__(self) -> PeerMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s)

    def lost(self) -> str:
        """'rank 1 (no heartbeat for 3 s)': the ranks that fall silent within a few beats of a transport
        error, or '' when none does (the store itself may be gone with them)."""
        self._lost_wanted.set()
        deadline = time.monotonic() + (SILENT_BEATS + 2) * self.interval_s
        while time.monotonic() < deadline:
            named = self._describe(self._silent(time.monotonic()), behind=[])
            if named:
                return named
            time.sleep(self.interval_s / 2)
        return ""

    def _run(self) -> None:
        iteration, since = self._progress(), time.monotonic()
        while True:
            now, current = time.monotonic(), self._progress()
            if current != iteration:
                iteration, since = current, now
            self._beats += 1
            try:
                self._store.set(_key(self.rank), f"{iteration} {self._beats}")
                stuck_s = now - since
                if self._lost_wanted.is_set() or stuck_s >= self.deadline_s - (SILENT_BEATS + 1) * self.interval_s:
                    self._read_peers(now)
            except Exception:  # the store went with its host: the names are a bonus, the timeout still ends it
                stuck_s = 0.0
            if stuck_s >= self.deadline_s and not self._lost_wanted.is_set():
                behind = [r for r, it in self._iterations().items() if it < iteration]
                named = self._describe(self._silent(now), behind)
                if named:
                    self._on_stall(f"{named} stalled or died in iteration {iteration + 1}: this rank waited "
                                   f"{stuck_s:.0f} s, close to dist.timeout_minutes ({self.timeout_s / 60:g})")
                    return
            if self._stop.wait(self.interval_s):
                return

    def _read_peers(self, now: float) -> None:
        keys = [_key(r) for r in range(self.world_size)]
        if self._store.check(keys):  # one request for every rank's beat: a stuck job's ranks all read at once
            values = [value.decode() for value in self._store.multi_get(keys)]
        else:  # a rank that never beat (gone before its first): a get would wait for its key
            values = [self._store.get(k).decode() if self._store.check([k]) else "" for k in keys]
        with self._lock:
            if self._watch_from is None:
                self._watch_from = now
            for rank, value in enumerate(values):
                if rank not in self._seen or self._seen[rank][0] != value:
                    self._seen[rank] = (value, now)

    def _silent(self, now: float) -> dict[int, float]:
        """Ranks whose beat has not changed for ``SILENT_BEATS`` intervals, with how long (seconds)."""
        with self._lock:
            if self._watch_from is None or now - self._watch_from < SILENT_BEATS * self.interval_s:
                return {}  # not read long enough to tell silence from a slow beat
            return {r: now - changed for r, (_, changed) in self._seen.items()
                    if r != self.rank and now - changed >= SILENT_BEATS * self.interval_s}

    def _iterations(self) -> dict[int, int]:
        with self._lock:
            return {r: int(value.split()[0]) for r, (value, _) in self._seen.items() if value}

    def _describe(self, silent: dict[int, float], behind: list[int]) -> str:
        """'rank 1 (no heartbeat for 14 s)', silence counted in missed beats when longer than seen here."""
        with self._lock:
            beats = {r: int(value.split()[1]) for r, (value, _) in self._seen.items() if value}
        parts = [f"rank {r} (no heartbeat for {max(s, (self._beats - beats.get(r, 0)) * self.interval_s):.0f} s)"
                 for r, s in sorted(silent.items())]
        iterations = self._iterations()
        parts += [f"rank {r} (alive, after iteration {iterations[r]})" for r in sorted(behind) if r not in silent]
        return ", ".join(parts)


def _key(rank: int) -> str:
    return f"anneal_heartbeat/{rank}"
