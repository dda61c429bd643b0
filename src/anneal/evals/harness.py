"""Downstream evaluations with lm-evaluation-harness: what the training loop and ``anneal-eval`` call.

``run_downstream(model, tokenizer, tasks=..., ...)`` scores a live model on lm-eval tasks and returns flat
metrics ``{"eval/<task>/<metric>": value}``; ``evaluate_tasks`` returns lm-eval's whole results dict
(``anneal-eval``). ``run_tokenizer(dataset, model)`` is the tokenizer an export of the run carries, which
the model is scored with. Importing this module imports neither lm_eval nor transformers nor torch: the
``anneal[eval]`` extra is needed only when an evaluation runs (ConfigError naming ``field`` without it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from anneal.errors import ConfigError, closest

if TYPE_CHECKING:
    import torch

    from anneal.config.dataset import DatasetConfig
    from anneal.config.model import ModelConfig

# The names errors give the tasks and the include path: the config's fields in the loop, the flags in the CLI.
FIELDS = ("downstream_eval.tasks", "downstream_eval.include_path")


def run_downstream(model: torch.nn.Module, tokenizer: Any, *, tasks: Sequence[str], include_path: str | None,
                   limit: int | float | None, max_length: int, group: Any | None = None,
                   batch_size: int = 8) -> dict[str, float]:
    """``{"eval/<task>/<metric>": value}`` for ``model`` on lm-eval's ``tasks``; call it on every rank.

    ``group`` is the data-parallel process group (None: one process): each rank scores its share of the
    requests and every rank returns the same metrics. The model is put in eval mode and back, and the
    random number generators that lm-eval seeds are restored.
    """
    require_lm_eval(tasks, FIELDS)
    import lm_eval.evaluator

    from anneal.evals.adapter import AnnealLM

    lm = AnnealLM(model, tokenizer, max_length=max_length, batch_size=batch_size, group=group)
    manager = task_manager(tuple(tasks), include_path, FIELDS)
    with _rng_kept(), _quiet():
        loaded = manager.load(list(tasks))
        _seed_as_simple_evaluate(loaded["tasks"].values())
        # lm-eval's own loop, without simple_evaluate's report of the environment (a git call and
        # collect_env's subprocesses on every rank at every evaluation); no stderr: the values alone
        results = lm_eval.evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0,
                                             log_samples=False)
    return flat_metrics(results)  # every rank: lm-eval is one process on each, its requests' results gathered


def _seed_as_simple_evaluate(tasks: Any) -> None:
    """What ``simple_evaluate`` does before it evaluates: its seeds, zero-shot unless a task says otherwise,
    the few-shot sampler's seed; so the loop scores as ``anneal-eval`` does."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(1234)
    torch.manual_seed(1234)
    for task in tasks:
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The training log keeps its own lines: no progress bars (``datasets``' and lm-eval's tqdm, on stderr)
    and none of lm-eval's INFO lines on every rank at every evaluation; its warnings still show."""
    import io
    import logging

    import datasets

    was_enabled, lm_eval_log = datasets.is_progress_bar_enabled(), logging.getLogger("lm_eval")
    level = lm_eval_log.level
    datasets.disable_progress_bars()
    lm_eval_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm writes to sys.stderr; logging is elsewhere
            yield
    finally:
        lm_eval_log.setLevel(level)
        if was_enabled:
            datasets.enable_progress_bars()


def evaluate_tasks(lm: Any, *, tasks: Sequence[str], include_path: str | None, limit: int | float | None,
                   fields: tuple[str, str] = FIELDS, bootstrap_iters: int = 100000) -> dict[str, Any] | None:
    """lm-eval's ``simple_evaluate`` of ``lm`` (an ``LM``) on ``tasks``: its results dict, None on the
    processes where lm-eval returns none (``LOCAL_RANK`` > 0). Tasks are looked up by name only."""
    require_lm_eval(tasks, fields)
    import lm_eval

    manager = task_manager(tuple(tasks), include_path, fields)
    with _rng_kept():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                       bootstrap_iters=bootstrap_iters, log_samples=False)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``eval/<task>/<metric>`` for each metric of lm-eval's ``results`` (its keys are ``metric,filter``;
    ``alias``, ``sample_len`` and stderr are left out). A metric keeps its filter as a suffix unless it is
    lm-eval's ``none``: ``acc,none`` -> ``acc``; ``exact_match,strict-match`` -> ``exact_match_strict-match``.
    """
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not comma or "_stderr" in metric or not number:
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            metrics[f"eval/{task}/{name}"] = float(value)
    return metrics


def run_tokenizer(dataset: DatasetConfig | dict | None, model: ModelConfig) -> Any:
    """The Hugging Face tokenizer that ``anneal-export-hf`` writes for a run of this ``dataset`` section
    and ``model``: byte-level for byte data, the recorded (verified) files otherwise; ConfigError if none."""
    from anneal.hf.tokenizer_files import run_tokenizer as tokenizer_of_run

    return tokenizer_of_run(dataset, model.vocab_size).load(model)


@functools.lru_cache(maxsize=4)
def task_manager(tasks: tuple[str, ...], include_path: str | None, fields: tuple[str, str]) -> Any:
    """lm-eval's TaskManager that knows ``tasks``: the include path's alone when it holds them all (lm-eval
    indexes its own thousands of tasks in seconds), else with lm-eval's. ConfigError for an unknown task."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"{fields[1]} ({include_path!r}) is not a directory")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include_path)
    for task in tasks:
        if task not in manager.all_tasks:
            hint = closest(task, manager.all_tasks)
            where = f"{fields[1]} ({include_path}) nor lm-eval's tasks" if include_path else "lm-eval's tasks"
            raise ConfigError(f"{fields[0]} ({list(tasks)!r}): {task!r} is in neither {where}"
                              + (f"; did you mean {hint!r}?" if hint else ""))
    return manager


def require_lm_eval(tasks: Sequence[str], fields: tuple[str, str] = FIELDS) -> None:
    """ConfigError naming ``fields[0]`` unless lm-evaluation-harness and transformers (the exported tokenizer
    scores the text) are installed: both come with ``anneal[eval]``."""
    import importlib

    from anneal.config.runtime import EVAL_MODULES

    missing = []
    for name in EVAL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"{fields[0]} ({list(tasks)!r}) needs lm-evaluation-harness and transformers "
                          f"({', '.join(missing)} not installed): pip install 'anneal[eval]'")


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's generators as they were before lm-eval seeded them."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
