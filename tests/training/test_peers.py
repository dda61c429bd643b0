"""The peer monitor in one process: real monitors sharing one real store (``HashStore``), real threads.

A "frozen" rank is a monitor that stops beating (as a SIGSTOPped or killed process does); the
end-to-end runs under torchrun are in test_failures_e2e.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from anneal.training.peers import SILENT_BEATS, PeerMonitor, intervals, is_lost_peer, transport_cause

TIMEOUT_S = 2.0  # a beat every 0.2 s (the shortest), a stall named after 1.8 s
INTERVAL_S, DEADLINE_S = intervals(TIMEOUT_S)


class Rank:
    """One rank's progress and what its monitor reported."""

    def __init__(self, store: dist.Store, rank: int, world_size: int) -> None:
        self.iteration = 0
        self.stalls: list[tuple[float, str]] = []
        self.called = threading.Event()
        self.monitor = PeerMonitor(store, rank=rank, world_size=world_size, timeout_s=TIMEOUT_S,
                                   progress=lambda: self.iteration, on_stall=self._stalled)

    def _stalled(self, line: str) -> None:
        self.stalls.append((time.monotonic(), line))
        self.called.set()


def _ranks(world_size: int) -> tuple[dist.Store, list[Rank]]:
    store = dist.HashStore()
    return store, [Rank(store, r, world_size) for r in range(world_size)]


def test_intervals_follow_the_timeout() -> None:
    assert intervals(300) == (5.0, 270.0)  # the default 5 minutes: a beat every 5 s
    assert intervals(2.0) == (0.2, 1.8)
    assert intervals(60) == (3.0, 54.0)


def test_a_frozen_rank_is_named_before_the_timeout() -> None:
    _, (waiting, frozen) = _ranks(2)
    with frozen.monitor:
        frozen.iteration = waiting.iteration = 4
        time.sleep(2 * INTERVAL_S)  # both beat in iteration 4
    start = time.monotonic()  # rank 1 stops beating; rank 0 waits in a collective of iteration 5
    with waiting.monitor:
        assert waiting.called.wait(TIMEOUT_S + 1), "no stall named"
    (when, line), = waiting.stalls
    assert DEADLINE_S <= when - start < TIMEOUT_S, when - start
    assert line.startswith("rank 1 (no heartbeat for ")
    assert line.endswith(" s) stalled or died in iteration 5: this rank waited 2 s, close to dist.timeout_minutes "
                         f"({TIMEOUT_S / 60:g})")


def test_ranks_that_beat_at_the_same_iteration_are_never_named() -> None:
    """A long save or evaluation: every rank stuck in one iteration, all alive: the monitor stays quiet."""
    _, ranks = _ranks(3)
    for rank in ranks:
        rank.monitor.__enter__()
    try:
        time.sleep(DEADLINE_S + 5 * INTERVAL_S)
    finally:
        for rank in ranks:
            rank.monitor.__exit__(None, None, None)
    assert [rank.stalls for rank in ranks] == [[], [], []]


def test_a_rank_that_falls_behind_is_named_alive() -> None:
    _, (waiting, slow) = _ranks(2)
    waiting.iteration, slow.iteration = 7, 6
    with slow.monitor, waiting.monitor:
        assert waiting.called.wait(TIMEOUT_S + 1)
    assert waiting.stalls[0][1].startswith("rank 1 (alive, after iteration 6) stalled or died in iteration 8")
    assert slow.stalls == []  # the slow rank is not stuck behind anyone


def test_a_lost_peer_is_named_once_its_heartbeat_stops() -> None:
    _, (survivor, lost) = _ranks(2)
    with survivor.monitor:
        with lost.monitor:
            time.sleep(2 * INTERVAL_S)
        start = time.monotonic()  # the peer is gone: the survivor's collective fails at once
        named = survivor.monitor.lost()
    assert named.startswith("rank 1 (no heartbeat for ") and named.endswith(" s)"), named
    assert time.monotonic() - start < 6 * INTERVAL_S
    assert survivor.stalls == []


def test_lost_names_nobody_while_every_peer_beats() -> None:
    _, (one, other) = _ranks(2)
    with one.monitor, other.monitor:
        assert one.monitor.lost() == ""  # the error came from elsewhere: no rank is blamed


class CountingStore(dist.Store):
    """A real store that counts the writes made to it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.sets, self.multi_gets = dist.HashStore(), 0, 0

    def set(self, key, value):
        self.sets += 1
        self.inner.set(key, value)

    def get(self, key):
        return self.inner.get(key)

    def check(self, keys):
        return self.inner.check(keys)

    def multi_get(self, keys):
        self.multi_gets += 1
        return self.inner.multi_get(keys)


def test_heartbeats_are_written_by_time_not_by_iteration() -> None:
    store = CountingStore()
    rank = Rank(store, 0, 2)
    with rank.monitor:
        end = time.monotonic() + 10 * INTERVAL_S
        while time.monotonic() < end:  # about a thousand fast iterations
            rank.iteration += 1
            time.sleep(0.002)
    assert rank.iteration > 300
    assert 8 <= store.sets <= 12, store.sets  # one write per beat: 10 intervals


@pytest.mark.parametrize("text", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:51884: Connection reset by peer",
    "[../gloo/transport/tcp/pair.cc:589] Connection closed by peer [127.0.0.1]:29500",
    "NCCL error in: ProcessGroupNCCL.cpp:1968, remote process exited or there was a network error",
    "ncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.",
])
def test_transport_errors_of_a_lost_peer_are_recognised(text: str) -> None:
    assert is_lost_peer(RuntimeError(text))
    assert not is_lost_peer(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "pair.cc" not in transport_cause(RuntimeError(text + ". This is typically caused by a remote worker"))


def test_a_stuck_rank_reads_every_peer_in_one_request_per_beat() -> None:
    """When a job stalls every rank is stuck and reads: one request per beat each, not one per peer."""
    store = CountingStore()
    waiting, peer = Rank(store, 0, 2), Rank(store, 1, 2)
    with peer.monitor:
        time.sleep(2 * INTERVAL_S)
    with waiting.monitor:
        assert waiting.called.wait(TIMEOUT_S + 1)
    beats = 1 + round(DEADLINE_S / INTERVAL_S)  # the stall is named at the deadline's beat
    assert 1 <= store.multi_gets <= SILENT_BEATS + 3 < beats, store.multi_gets  # only near the deadline
