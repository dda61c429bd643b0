"""``anneal-eval CHECKPOINT --tasks T1,T2 [--include-path DIR] [--limit N] [--output FILE.json]``.

Scores a checkpoint on lm-evaluation-harness tasks in one process: the model its config.yaml records, with
its weights read as ``anneal-export-hf`` reads them (``anneal.hf.exporter.open_checkpoint``), and the
tokenizer that export carries; the same ``acc``/``acc_norm`` as lm-eval's ``hf`` backend on the export.
Writes lm-eval's ``results`` (its own metric keys: ``acc,none``, ``acc_norm,none``, ...) to ``--output``
and prints them as a table. Errors: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from anneal import exits
from anneal.config.runtime import LIMIT_RULE, eval_limit
from anneal.errors import AnnealError, ConfigError

FIELDS = ("--tasks", "--include-path")
DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tasks = [task for task in args.tasks.split(",") if task]
        if not tasks:
            raise ConfigError(f"--tasks ({args.tasks!r}) must name at least one task")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size ({args.batch_size}) must be at least 1")
        if args.output:  # before the evaluation, whose results an unwritable path would lose
            _writable(Path(args.output))
        results = evaluate_checkpoint(args.checkpoint, tasks=tasks, include_path=args.include_path,
                                      limit=_limit(args.limit), batch_size=args.batch_size,
                                      device=args.device, dtype=args.dtype)
    except AnnealError as error:
        exits.report(error)
        return exits.CONFIG if isinstance(error, ConfigError) else exits.FAILED
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"wrote {args.output}")
    return exits.OK


def _writable(path: Path) -> None:
    """``--output``'s directory, made now; ConfigError naming the flag when it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output ({str(path)!r}): cannot create its directory ({error.strerror})") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--output ({str(path)!r}) must be a file in a writable directory")


def evaluate_checkpoint(checkpoint: str | Path, *, tasks: list[str], include_path: str | None,
                        limit: int | float | None, batch_size: int = 8, device: str = "cpu",
                        dtype: str = "float32") -> dict[str, Any]:
    """lm-eval's results for ``checkpoint`` on ``tasks``: ``results``, ``versions``, ``n-shot``, ... and
    ``checkpoint``, the ``iter_*`` directory read."""
    from anneal.evals.harness import evaluate_tasks, require_lm_eval, task_manager
    from anneal.hf.exporter import open_checkpoint
    from anneal.hf.tokenizer_files import run_tokenizer

    require_lm_eval(tasks, FIELDS)
    from anneal.evals.adapter import AnnealLM

    # What can be refused is refused before the weights are read: the checkpoint's files, the tasks
    # (lm-eval's index, cached for evaluate_tasks), the tokenizer, the device.
    stored = open_checkpoint(checkpoint)
    task_manager(tuple(tasks), include_path, FIELDS)
    tokenizer = run_tokenizer(stored.config.get("dataset"), stored.model.vocab_size).load(stored.model)
    model = load_model(stored, device=_device(device), dtype=dtype)
    lm = AnnealLM(model, tokenizer, max_length=stored.model.seq_length, batch_size=batch_size, device=device)
    results = evaluate_tasks(lm, tasks=tasks, include_path=include_path, limit=limit, fields=FIELDS)
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
            "n-samples")
    return {"checkpoint": str(stored.path), **{k: results[k] for k in keep if k in results}}


def load_model(stored: Any, *, device: str = "cpu", dtype: str = "float32"):
    """The model of an opened checkpoint (``anneal.hf.exporter.open_checkpoint``), in ``dtype`` on
    ``device``, in eval mode."""
    import dataclasses

    import torch

    from anneal.hf.exporter import read_tensors
    from anneal.model.qwen3 import build_model

    cfg = dataclasses.replace(stored.model, tensor_model_parallel_size=1)  # one process holds it whole
    model = build_model(cfg, device="meta")
    tensors = read_tensors(stored, list(stored.tensors))
    model.load_state_dict({name: t.to(getattr(torch, dtype)) for name, t in tensors.items()}, assign=True)
    return model.to(device).eval()


def _device(device: str) -> str:
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device ({device!r}) is not a torch device (cpu, cuda, cuda:1, ...)") from None
    return device


def _limit(text: str | None) -> int | float | None:
    """``--limit``: a number of documents per task, or a fraction of them below 1 (as lm-eval's)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--limit ({text!r}) {LIMIT_RULE}") from None
    return eval_limit(value, "--limit")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anneal-eval",
        description="Score an anneal checkpoint on lm-evaluation-harness tasks (needs anneal[eval]).")
    parser.add_argument("checkpoint", help="an iter_* checkpoint directory, or a save directory (its latest)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", help="a directory of task YAMLs (searched before lm-eval's own)")
    parser.add_argument("--limit", help="documents per task: a count, or a fraction below 1")
    parser.add_argument("--output", help="write lm-eval's results here as JSON")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
