"""``anneal-pretrain`` / ``scripts/pretrain.py``: compose, validate, then dry-run or train.

The config is composed and validated before Hydra sets up a run directory and before any
process group or model exists; a bad value exits with one line on stderr (exit code 2). A run
that fails prints one line and exits 1; see ``anneal.exits`` for every code.
Set ANNEAL_FULL_ERROR=1 (or HYDRA_FULL_ERROR=1) for the traceback.

``-m`` (Hydra multirun) sweeps: Hydra's launcher runs one job per combination, each in its own
directory under ``multirun/``; each job is validated when it starts, a bad or failed job prints its
one line and the sweep goes on, and the process exits non-zero at the end if any job failed.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from anneal import exits
from anneal.cli import args as cli_args
from anneal.cli import jobs
from anneal.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = cli_args.absolute_config_dirs(argv)
        args = cli_args.parse(argv)
        if args.help:
            from anneal.cli.help import help_text

            print(help_text(args.overrides, args.config_name, args.search_dir))
            return
        if args.multirun:
            return _sweep(argv, args)
        cfg, derived = _check(args)
    except ConfigError as error:
        fail(error)
    if cfg.dry_run and not args.hydra_only:
        from anneal.cli.dry_run import report_parts

        try:
            for part in report_parts(cfg, derived):  # the schedule shows before torch is imported
                print(part, flush=True)
        except ConfigError as error:  # what the run would refuse before building (its data, say)
            fail(error)
        return
    sys.argv = [sys.argv[0], *argv, *_rank_overrides(argv)]
    _hydra_main(args)


def _check(args: cli_args.Args):
    """The composed config and, unless Hydra only prints, its derived values (ConfigError if invalid)."""
    from anneal.config.compose import load
    from anneal.config.provenance import UserSet

    cfg = load(args.composed, args.config_name, args.search_dir)
    return cfg, None if args.hydra_only else cfg.validate(UserSet.from_overrides(args.overrides))


def _sweep(argv: list[str], args: cli_args.Args) -> None:
    """Hand the sweep to Hydra; exit non-zero at the end if any job failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("-m/--multirun (a Hydra sweep) cannot run under torchrun: every rank would sweep "
                          "on its own; launch one torchrun per job (or use hydra/launcher=submitit_slurm)")
    jobs.check_sweep(args.composed, args.config_name, args.search_dir)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main(args)
    code = jobs.sweep_exit_code()
    sys.stdout.flush()
    sys.exit(code)


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
    except KeyboardInterrupt:  # Ctrl-C before the training loop took over SIGINT
        exits.report("interrupted by Ctrl-C before training started; nothing was saved")
        return exits.INTERRUPTED
    except Exception as error:
        if exits.full_error_requested():
            raise
        exits.report(error)
        return exits.CONFIG if isinstance(error, ConfigError) else exits.FAILED


def _train(dict_cfg) -> int:
    """One Hydra job: instantiate, validate with the job's own overrides, then dry-run or train."""
    from anneal.config.compose import instantiate
    from anneal.config.provenance import UserSet

    cfg = instantiate(dict_cfg)
    derived = cfg.validate(UserSet.from_overrides(jobs.job_overrides()))
    if derived.notes and not cfg.dry_run and int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(f"anneal: note: {note}" for note in derived.notes), flush=True)
    if cfg.dry_run:
        _print_dry_run(cfg, derived)
        return exits.OK
    if int(os.environ.get("RANK", "0")) == 0:  # a first sign of life: importing torch takes seconds
        logging.getLogger("anneal").info("anneal: config valid; importing torch")
    from anneal.training.run import run

    return run(cfg, derived)


def _print_dry_run(cfg, derived) -> None:
    """A Hydra job's dry run; a sweep prints the whole config for its first job, then each job's changes."""
    from anneal.cli.dry_run import report_parts
    from anneal.config.compose import to_dict, to_yaml

    differences = jobs.config_differences(to_dict(cfg))
    for part in report_parts(cfg, derived):
        print(part if differences is None else part.replace(to_yaml(cfg), differences + "\n"), flush=True)


def _hydra_main(args: cli_args.Args) -> None:
    import hydra

    @hydra.main(config_path="pkg://anneal.conf", config_name="config", version_base=None)
    def task(dict_cfg) -> int:
        code = guarded(lambda: _train(dict_cfg))
        jobs.finish(code, dry_run=bool(dict_cfg.get("dry_run")))
        exits.record(code, jobs.run_dir())  # torchrun reports only 0/1: the code is kept for a requeue
        if not args.multirun or code in exits.STOP_CODES.values():  # Ctrl-C or SIGTERM ends a sweep
            exits.leave(code)
        return code

    task()


if __name__ == "__main__":
    main()
