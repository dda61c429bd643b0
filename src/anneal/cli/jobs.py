"""What the launcher does around each Hydra job: its overrides, cleaning up after it, the sweep's result.

A job that fails (or a sweep job that only dry-ran) leaves nothing behind: its directory is removed
when it holds only Hydra's ``.hydra/`` and log files. With Hydra's basic launcher every job of
a sweep runs in this process, so the sweep's exit code is read from ``_results`` at the end.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anneal import exits
from anneal.errors import ConfigError


@dataclass(frozen=True)
class JobResult:
    number: int
    code: int
    sweep_dir: Path


_results: list[JobResult] = []
_first_dry_run: tuple[int, dict[str, Any]] | None = None  # a dry-run sweep's first job: number, flat config


def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def job_overrides() -> list[str]:
    """The overrides of the running Hydra job (a sweep job's own values), or none outside Hydra."""
    hc = _hydra_config()
    return list(hc.overrides.task) if hc is not None else []


def finish(code: int, *, dry_run: bool) -> None:
    """Record a sweep job's code; remove its directory when it failed (or dry-ran) and holds nothing."""
    hc = _hydra_config()
    if hc is None:
        return
    from hydra.types import RunMode

    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        _results.append(JobResult(int(hc.job.num), code, Path(hc.sweep.dir)))
    run_dir = Path(hc.runtime.output_dir)
    if (code != exits.OK or (multirun and dry_run)) and int(os.environ.get("RANK", "0")) == 0:
        if remove_if_empty(run_dir) and not multirun:
            _remove_empty_parents(run_dir)


def config_differences(config: dict[str, Any]) -> str | None:
    """For a dry-run sweep job after the first: one line naming each setting that differs from the first
    job's (whose whole config was printed); None outside a sweep and for the first job.

    ``config`` is the job's config as plain data (``anneal.config.compose.to_dict``). With Hydra's basic
    launcher every job runs in this process, so the first job's config is kept here.
    """
    global _first_dry_run
    hc = _hydra_config()
    from hydra.types import RunMode

    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    flat = _flatten(config)
    if _first_dry_run is None:
        _first_dry_run = (int(hc.job.num), flat)
        return None
    number, first = _first_dry_run
    changed = [f"{key} {_shown(first.get(key))} -> {_shown(flat.get(key))}"
               for key in sorted(first.keys() | flat.keys()) if first.get(key) != flat.get(key)]
    return (f"job #{hc.job.num} differs from job #{number} in {len(changed)} setting(s)"
            + (f": {', '.join(changed)}" if changed else ""))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def run_dir() -> Path | None:
    """The running Hydra job's output directory, or None outside Hydra."""
    hc = _hydra_config()
    return Path(hc.runtime.output_dir) if hc is not None else None


def remove_if_empty(run_dir: Path) -> bool:
    """Remove ``run_dir`` if all it holds is ``.hydra/``, empty files and the job's log (its start-up lines;
    the failure itself went to stderr); True when removed. Metrics, checkpoints or plots keep it.

    Never the working directory or a directory above it.
    """
    cwd = Path.cwd().resolve()
    if not run_dir.is_dir() or run_dir.resolve() == cwd or run_dir.resolve() in cwd.parents:
        return False
    for entry in run_dir.iterdir():
        disposable = entry.is_file() and (entry.stat().st_size == 0 or entry.suffix == ".log")
        if entry.name != ".hydra" and not disposable:
            return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def sweep_exit_code() -> int:
    """0 when every job succeeded; else one line naming the failed jobs, and 2 (all config) or 1."""
    failed = [r for r in _results if r.code != exits.OK]
    for sweep_dir in {r.sweep_dir for r in _results}:
        if sweep_dir.is_dir() and [p.name for p in sweep_dir.iterdir()] == ["multirun.yaml"]:
            shutil.rmtree(sweep_dir, ignore_errors=True)  # every job dry-ran or failed before starting
            _remove_empty_parents(sweep_dir)
    if not failed:
        return exits.OK
    listed = ", ".join(f"#{r.number} (exit {r.code})" for r in failed)
    exits.report(f"sweep: {len(failed)} of {len(_results)} jobs failed: {listed}")
    return exits.CONFIG if all(r.code == exits.CONFIG for r in failed) else exits.FAILED


def _remove_empty_parents(path: Path) -> None:
    """rmdir the now empty ``outputs/<date>/`` (or ``multirun/...``) above a removed directory, up to cwd."""
    cwd = Path.cwd().resolve()
    for parent in path.resolve().parents:
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            return
        parent.rmdir()


def check_sweep(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> None:
    """Compose every job of the sweep first, as Hydra does, but with anneal's one-line errors.

    A key or group option that does not exist, or a ``_target_`` anneal refuses, is a ConfigError naming
    the job before any job starts;
    values are validated by each job when it starts, so a bad value fails only its own job.
    """
    from anneal.config.compose import checked, compose

    jobs, swept_keys = _expand(overrides)
    for number, job in enumerate(jobs):
        try:
            checked(compose(job, config_name, config_dir), resolve=False)
        except ConfigError as error:
            swept = " ".join(o for o in job if o.split("=", 1)[0] in swept_keys)
            raise ConfigError(f"{error} (sweep job #{number}: {swept})") from error


def _expand(overrides: list[str]) -> tuple[list[list[str]], set[str]]:
    """The jobs' overrides, numbered as Hydra's basic sweeper does, and the swept keys; no jobs when a
    ``glob()`` needs Hydra's config loader (Hydra composes those itself)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:  # Hydra's parse errors; all are user input here
        raise ConfigError(f"cannot parse the overrides: {str(error).splitlines()[0]}") from error
    if any(isinstance(o.value(), Glob) for o in parsed):
        return [], set()
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    return BasicSweeper.split_arguments(parsed, None)[0], swept
