"""ProfilerWindow: the real torch.profiler over iterations start+1..end, a Chrome trace per rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anneal.config.runtime import ProfilingConfig
from anneal.errors import ConfigError
from anneal.training.profiling import ProfilerWindow

CPU = torch.device("cpu")


def _window(start: int, end: int, **fields) -> ProfilingConfig:
    return ProfilingConfig(use_pytorch_profiler=True, profile_step_start=start, profile_step_end=end,
                           **fields)


def _train(window: ProfilerWindow, first: int, last: int) -> None:
    """Iterations first..last; each runs one matmul whose size names it (n = 8 * iteration)."""
    for iteration in range(first, last + 1):
        n = 8 * iteration
        torch.ones(n, n) @ torch.ones(n, n)
        window.step(iteration)


def _matmul_sizes(trace: Path) -> set[int]:
    events = json.loads(trace.read_text())["traceEvents"]
    return {e["args"]["Input Dims"][0][0] for e in events
            if e.get("name") == "aten::mm" and "Input Dims" in e.get("args", {})}


def test_trace_covers_exactly_the_window(tmp_path: Path) -> None:
    cfg = _window(2, 4, record_shapes=True)
    window = ProfilerWindow(cfg, tmp_path, rank=0, device=CPU)
    _train(window, 1, 6)
    trace = tmp_path / "trace_iters3-4_rank0.json"
    assert window.written == [trace]
    assert _matmul_sizes(trace) == {24, 32}  # iterations 3 and 4, as in Megatron's profile_step_start/end


def test_window_open_at_the_end_is_written_by_close(tmp_path: Path) -> None:
    cfg = _window(0, 100, profile_ranks=[3])
    window = ProfilerWindow(cfg, tmp_path, rank=3, device=CPU)  # opens before iteration 1
    _train(window, 1, 2)
    assert window.written == []
    window.close()
    assert window.written == [tmp_path / "trace_iters1-100_rank3.json"]
    assert json.loads(window.written[0].read_text())["traceEvents"]


def test_a_resumed_run_opens_a_window_that_starts_where_it_resumes(tmp_path: Path) -> None:
    cfg = _window(5, 6, record_shapes=True)
    window = ProfilerWindow(cfg, tmp_path, rank=0, device=CPU, iteration=5)
    _train(window, 6, 7)
    assert _matmul_sizes(window.written[0]) == {48}


@pytest.mark.parametrize("ranks, rank, profiled", [([0], 0, True), ([0], 1, False), ([], 5, True),
                                                   ([1, 2], 2, True)])
def test_only_the_profile_ranks_write_a_trace(tmp_path: Path, ranks: list, rank: int, profiled: bool) -> None:
    cfg = _window(0, 1, profile_ranks=ranks)
    window = ProfilerWindow(cfg, tmp_path, rank=rank, device=CPU)
    _train(window, 1, 1)
    assert [p.name for p in tmp_path.iterdir()] == ([f"trace_iters1-1_rank{rank}.json"] if profiled else [])


def test_memory_history_on_cpu_writes_nothing(tmp_path: Path) -> None:
    cfg = ProfilingConfig(record_memory_history=True, profile_step_start=0, profile_step_end=1)
    window = ProfilerWindow(cfg, tmp_path, rank=0, device=CPU)
    _train(window, 1, 1)
    assert window.written == [] and not tmp_path.joinpath("profile").exists()


def test_memory_history_on_cuda_is_recorded_over_the_window_and_dumped(tmp_path: Path, monkeypatch) -> None:
    """The CUDA calls in order, with torch.cuda.memory stubbed: CPU CI cannot run the real ones."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("record", enabled, kw.get("max_entries"))))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot",
                        lambda filename: calls.append(("dump", Path(filename).name)))
    cfg = ProfilingConfig(record_memory_history=True, profile_step_start=1, profile_step_end=2,
                          profile_ranks=[])
    window = ProfilerWindow(cfg, tmp_path, rank=1, device=torch.device("cuda", 1))
    for iteration in (1, 2, 3):
        window.step(iteration)
    assert calls == [("record", "all", 100_000), ("dump", "memory_snapshot_iters2-2_rank1.pickle"),
                     ("record", None, None)]


@pytest.mark.parametrize("fields, message", [
    ({"profile_step_start": -1}, r"^profiling.profile_step_start \(-1\) must be >= 0"),
    ({"profile_step_start": 4, "profile_step_end": 4}, r"^profiling.profile_step_end \(4\) must be > "),
    ({"profile_ranks": [0, -2]}, r"^profiling.profile_ranks \(\[0, -2\]\) must hold ranks >= 0"),
])
def test_profiling_rules(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProfilingConfig(**fields).validate()
