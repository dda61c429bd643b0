"""Splitting a Hydra command line into what anneal composes itself and what Hydra handles."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from anneal.errors import ConfigError

# Hydra flags after which the launcher only lets Hydra act (print the config, its own help...).
_HYDRA_ONLY = ("--cfg", "-c", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--resolve",
               "--package", "-p")
_MULTIRUN = ("--multirun", "-m")
_HELP = ("--help", "-h")
_HYDRA_VALUE = ("--cfg", "-c", "--package", "-p")  # Hydra flags that take the next argument
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_VALUE_FLAGS = {"--config-path": "config_path", "-cp": "config_path", "--config-name": "config_name",
                "-cn": "config_name", "--config-dir": "config_dir", "-cd": "config_dir"}
_DIR_FLAGS = ("--config-path", "-cp", "--config-dir", "-cd")


@dataclass
class Args:
    overrides: list[str] = field(default_factory=list)  # config overrides, hydra.* excluded
    hydra_overrides: list[str] = field(default_factory=list)  # hydra.* and hydra/ group overrides
    config_name: str = "config"
    config_path: str | None = None
    config_dir: str | None = None
    hydra_only: bool = False  # a flag such as --cfg job: Hydra prints, anneal runs nothing
    multirun: bool = False  # -m: Hydra sweeps, each job validated and run by anneal
    help: bool = False  # --help: anneal's help (groups and every field, with its comment)

    @property
    def composed(self) -> list[str]:
        """Every override that shapes the composed config, ``hydra.*`` included (checked, then dropped)."""
        return [*self.overrides, *self.hydra_overrides]

    @property
    def search_dir(self) -> str | None:
        """The directory holding the primary config when it is not the shipped conf/."""
        return self.config_path or self.config_dir


def parse(argv: list[str]) -> Args:
    args, i = Args(), 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _VALUE_FLAGS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            setattr(args, _VALUE_FLAGS[name], value)
        elif arg in _MULTIRUN:
            args.multirun = True
        elif arg in _HELP:
            args.help = True
        elif name in _HYDRA_ONLY or arg in _HYDRA_ONLY:
            args.hydra_only = True
            takes_value = name in _HYDRA_VALUE or (name in ("--info", "-i") and i + 1 < len(argv)
                                                   and argv[i + 1] in _INFO_VALUES)
            i += 1 if takes_value and not eq else 0
        elif not arg.startswith("-"):
            (args.hydra_overrides if arg.lstrip("+~").startswith("hydra") else args.overrides).append(arg)
        i += 1
    return args


def absolute_config_dirs(argv: list[str], cwd: str | None = None) -> list[str]:
    """``argv`` with ``--config-path`` / ``--config-dir`` made absolute, relative to the current directory.

    Hydra reads a relative ``--config-path`` relative to the script, which no user means; a directory
    that does not exist is a ConfigError.
    """
    cwd, out, i = cwd or os.getcwd(), [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in _DIR_FLAGS:
            out.append(argv[i])
        elif eq or i + 1 < len(argv):
            if not eq:
                i += 1
                value = argv[i]
            out += [name, _existing_dir(name, value, cwd)]
        else:
            raise ConfigError(f"{name} needs a directory")
        i += 1
    return out


def _existing_dir(flag: str, value: str, cwd: str) -> str:
    if value.startswith("pkg://"):
        return value
    path = os.path.abspath(os.path.join(cwd, os.path.expanduser(value.removeprefix("file://"))))
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} ({value!r}) is not a directory (looked for {path})")
    return path
