"""``anneal-pretrain`` / ``scripts/pretrain.py``: compose, validate, then dry-run or train.

The config is composed and validated before Hydra sets up a run directory and before any
process group or model exists; a bad value exits with one line on stderr (exit code 2). A run
that fails prints one line and exits 1; see ``anneal.exits`` for every code.
Set ANNEAL_FULL_ERROR=1 (or HYDRA_FULL_ERROR=1) for the traceback.
"""

from __future__ import annotations

import os
import sys

from collections.abc import Callable

from anneal import exits
from anneal.cli import args as cli_args
from anneal.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = cli_args.parse(argv)
    try:
        from anneal.config.compose import load

        cfg = load(args.overrides, args.config_name, args.search_dir)
        derived = None if args.hydra_only else cfg.validate()
    except ConfigError as error:
        fail(error)
    if cfg.dry_run and not args.hydra_only:
        from anneal.cli.dry_run import report_parts

        for part in report_parts(cfg, derived):  # the schedule shows before torch is imported
            print(part, flush=True)
        return
    sys.argv = [sys.argv[0], *argv, *_rank_overrides(argv)]
    _hydra_main()


def _rank_overrides(argv: list[str]) -> list[str]:
    """Under torchrun: one run directory for all ranks (rank 0 picks it), and only rank 0 logs to it."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return []
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        from anneal.training.distributed import agree_on_run_dir

        extra.append(f"hydra.run.dir={agree_on_run_dir()}")
    if int(os.environ.get("RANK", "0")) > 0:  # rank 0 owns the shared files
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return extra


def fail(error: ConfigError) -> None:
    if exits.full_error_requested():
        raise error
    exits.report(error)
    sys.exit(exits.CONFIG)


def guarded(fn: Callable[[], int]) -> int:
    """``fn()``'s exit code; an exception becomes its one line on stderr and code 2 or 1."""
    try:
        return fn()
    except Exception as error:
        if exits.full_error_requested():
            raise
        exits.report(error)
        return exits.CONFIG if isinstance(error, ConfigError) else exits.FAILED


def _train(dict_cfg) -> int:
    from anneal.config.compose import instantiate
    from anneal.training.run import run

    cfg = instantiate(dict_cfg)
    return run(cfg, cfg.validate())


def _hydra_main() -> None:
    import hydra

    @hydra.main(config_path="pkg://anneal.conf", config_name="config", version_base=None)
    def task(dict_cfg) -> None:
        exits.leave(guarded(lambda: _train(dict_cfg)))

    task()


if __name__ == "__main__":
    main()
