"""Splitting a Hydra command line into what anneal composes itself and what Hydra handles."""

from __future__ import annotations

from dataclasses import dataclass, field

# Hydra flags after which the launcher only lets Hydra act (print the config, help, multirun...).
_HYDRA_ONLY = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m",
               "--shell-completion", "-sc", "--resolve", "--package", "-p")
_HYDRA_VALUE = ("--cfg", "-c", "--package", "-p")  # Hydra flags that take the next argument
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_VALUE_FLAGS = {"--config-path": "config_path", "-cp": "config_path", "--config-name": "config_name",
                "-cn": "config_name", "--config-dir": "config_dir", "-cd": "config_dir"}


@dataclass
class Args:
    overrides: list[str] = field(default_factory=list)  # config overrides, hydra.* excluded
    config_name: str = "config"
    config_path: str | None = None
    config_dir: str | None = None
    hydra_only: bool = False  # a flag such as --cfg job: Hydra prints or sweeps, anneal runs nothing

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
        elif name in _HYDRA_ONLY or arg in _HYDRA_ONLY:
            args.hydra_only = True
            takes_value = name in _HYDRA_VALUE or (name in ("--info", "-i") and i + 1 < len(argv)
                                                   and argv[i + 1] in _INFO_VALUES)
            i += 1 if takes_value and not eq else 0
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra"):
            args.overrides.append(arg)
        i += 1
    return args
