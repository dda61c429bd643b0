"""Every command in README's ```bash blocks runs as written after the two set-up commands.

The set-up creates ``.venv`` in the repository and never activates it, so each command names its program
by its path in the venv (``.venv/bin/python``, ``.venv/bin/torchrun``, ``.venv/bin/anneal-export-hf``);
only programs that are not Python's (``sbatch``) are bare. For each command this checks, in process and
without running it: the program exists (``.venv/bin/X`` in the venv running these tests, which is CI's
``.venv``), each ``scripts/`` path exists, and the overrides of every ``scripts/pretrain.py`` (also through
torchrun or the sbatch script) and ``scripts/plot_schedule.py`` command compose and validate (every job
of a ``-m`` sweep). Placeholders: ``...`` stands for the rest of a command above and is dropped; paths the
README invents (``/data/...``, ``ck/parent/...``, a Hugging Face directory) are composed as values, and
nothing reads them: the dry run's data check and the run's checkpoint checks are not run.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from anneal.config.compose import load
from anneal.config.provenance import UserSet
from anneal.errors import ConfigError
from anneal_testing import ROOT

VENV_BIN = Path(sys.executable).parent  # CI's .venv/bin (tests run under .venv/bin/python)
SETUP = "python3 -m venv .venv"  # the two set-up commands start so; they create the venv
EXTERNAL = {"sbatch"}  # SLURM's; not installed by the set-up
TORCHRUN_VALUE_FLAGS = {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
                        "--master-port", "--node-rank", "--master-addr"}
PLOT_VALUE_FLAGS = {"--branch", "--out", "--points", "--title"}  # --compare takes overrides
ENV_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")


def readme_commands(text: str) -> list[str]:
    """Each command line of the ```bash blocks: continuations joined, comments and set-up dropped,
    shell variables (``P="..."``) expanded where they are used."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = _without_comment(line).strip()
            if not line or line.startswith(SETUP):
                continue
            if (assignment := re.fullmatch(r"([A-Za-z_]\w*)=\"([^\"]*)\"", line)) is not None:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            commands.append(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line))
    return commands


def _without_comment(line: str) -> str:
    """The line up to a ``#`` that starts a shell comment (not one inside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def test_readme_has_commands_of_every_kind() -> None:
    programs = {shlex.split(c)[0] for c in COMMANDS}
    assert {".venv/bin/python", ".venv/bin/torchrun", ".venv/bin/anneal-export-hf"} <= programs, programs
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command[:70])
def test_readme_command_runs_as_written(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    words = shlex.split(command)
    while ENV_ASSIGNMENT.match(words[0]):  # WORLD_SIZE=64 .venv/bin/python ...
        monkeypatch.setenv(*ENV_ASSIGNMENT.match(words.pop(0)).groups())
    program, args = words[0], words[1:]
    if program in EXTERNAL:
        script, args = args[0], args[1:]  # sbatch scripts/slurm_pretrain.sbatch OVERRIDES
        assert (ROOT / script).is_file(), f"{script} does not exist"
        _check_pretrain(args)
        return
    assert program.startswith(".venv/bin/"), f"{program}: not in the venv, which the set-up never activates"
    assert (VENV_BIN / program.removeprefix(".venv/bin/")).exists(), f"{program} is not installed"
    if program == ".venv/bin/torchrun":
        args = _after_torchrun_flags(args)
    if not args or not args[0].endswith(".py"):
        return  # python -c/-m, anneal-export-hf CHECKPOINT OUT: the program is what may fail to resolve
    script, args = args[0], [a for a in args[1:] if a != "..."]
    assert (ROOT / script).is_file(), f"{script} does not exist"
    if script == "scripts/pretrain.py":
        _check_pretrain(args)
    elif script == "scripts/plot_schedule.py":
        _check_plot(args)


def _after_torchrun_flags(args: list[str]) -> list[str]:
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 1 if "=" in args[i] or args[i] not in TORCHRUN_VALUE_FLAGS else 2
    return args[i:]


def _check_pretrain(args: list[str]) -> None:
    """Compose and validate each job (one without ``-m``); README has no ``--config-path`` command."""
    assert not any(a.startswith(("--config-path", "-cp", "--config-name", "-cn")) for a in args), \
        "a --config-path command needs its directory: check it by hand and teach this test"
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    jobs = _sweep_jobs(overrides) if len(overrides) < len(args) else [overrides]
    for job in jobs:
        _validate(job)


def _validate(overrides: list[str]) -> None:
    """Compose and validate; a refusal that names a path the README invents (not on this machine) passes."""
    try:
        load(overrides).validate(UserSet.from_overrides(overrides))
    except ConfigError as error:
        values = [v for o in overrides for v in re.split(r"[=,\[\]]", o)[1:]]
        invented = [v for v in values if "/" in v and not (ROOT / v).exists()]
        if not any(path in str(error) for path in invented):
            raise


def _check_plot(args: list[str]) -> None:
    overrides, compares, i = [], [], 0
    while i < len(args):
        if args[i] == "--compare":
            compares.append(args[i + 1].split())
        elif args[i] not in PLOT_VALUE_FLAGS:
            overrides.append(args[i])
        i += 2 if args[i] == "--compare" or args[i] in PLOT_VALUE_FLAGS else 1
    for extra in compares or [[]]:
        _validate([*overrides, *extra])


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of ``overrides``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
