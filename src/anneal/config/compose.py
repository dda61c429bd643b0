"""Hydra composition of the shipped ``conf/`` into a validated ``ConfigContainer``.

Errors from Hydra and OmegaConf (a misspelled key, a missing group option) are turned into
``ConfigError`` messages that name the dotted key and suggest the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from anneal.config.container import ConfigContainer
from anneal.config.trust import check_hydra, check_targets
from anneal.errors import ConfigError, closest

CONF_MODULE = "anneal.conf"
_HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}


def compose(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> DictConfig:
    """Compose ``config_name`` (shipped ``conf/``, or ``config_dir``) with command-line overrides.

    ``hydra.*`` overrides shape the ``hydra`` node, which is checked (``anneal.config.trust``) and then
    dropped: what Hydra itself would instantiate for the run is refused here, before it hands over.
    """
    try:
        return _without_hydra(_hydra_compose(overrides, config_name, config_dir))
    except ConfigError:
        raise
    except Exception as error:  # Hydra raises several unrelated types; all are user input here
        raise _explain(error, overrides, config_name, config_dir) from error


def _hydra_compose(overrides: list[str], config_name: str, config_dir: str | None) -> DictConfig:
    """Hydra's composition with its ``hydra`` node; Hydra's own errors, unexplained."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    init = (initialize_config_dir(config_dir=config_dir, version_base=None) if config_dir
            else initialize_config_module(CONF_MODULE, version_base=None))
    with init:
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def _without_hydra(cfg: DictConfig) -> DictConfig:
    """``cfg`` less its ``hydra`` node, once that node is checked."""
    check_hydra(cfg.hydra)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def instantiate(cfg: DictConfig) -> ConfigContainer:
    """Check every key against its dataclass, then build the dataclasses with Hydra."""
    from hydra.utils import instantiate as hydra_instantiate

    cfg = checked(cfg)
    _add_list_targets(cfg)
    _check_keys(cfg, "")
    try:
        container = hydra_instantiate(cfg, _convert_="all")
    except Exception as error:
        raise ConfigError(f"cannot instantiate the config: {_first_line(error)}") from error
    if not isinstance(container, ConfigContainer):
        raise ConfigError(f"the root config must have _target_: anneal.config.container.ConfigContainer, "
                          f"got {type(container).__name__}")
    return container


def checked(cfg: DictConfig, *, resolve: bool = True) -> DictConfig:
    """A copy with every interpolation resolved and every ``_target_`` checked against its field's class,
    before any module a target names is imported or any constructor runs (``anneal.config.trust``).

    ``resolve=False`` (a sweep, before Hydra runs its jobs: ``${hydra:...}`` resolves only inside a job)
    checks the targets written in the config; each job checks its resolved config again when it starts.
    """
    cfg = copy.deepcopy(cfg)
    try:
        if resolve:
            OmegaConf.resolve(cfg)
    except Exception as error:  # an interpolation that names nothing, or a resolver that fails
        raise ConfigError(f"cannot resolve the config: {_first_line(error)}") from error
    check_targets(cfg, ConfigContainer)
    return cfg


def load(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> ConfigContainer:
    return instantiate(compose(overrides, config_name, config_dir))


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data with ``_target_`` on every dataclass node."""
    if dataclasses.is_dataclass(obj):
        node = {"_target_": f"{type(obj).__module__}.{type(obj).__qualname__}"}
        node.update({f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return node
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(container: ConfigContainer) -> str:
    """YAML that ``from_yaml`` (or the launcher's ``--config-name``) turns back into an equal config."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(container)))


def from_yaml(text: str) -> ConfigContainer:
    return instantiate(OmegaConf.create(text))


def _check_keys(node: Any, path: str) -> None:
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _check_keys(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_")
    if target is not None:
        cls = _locate(str(target), path)
        if dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            for key in node.keys():
                if key not in names and key not in _HYDRA_KEYS:
                    where = f"{path}.{key}" if path else str(key)
                    raise ConfigError(_unknown_key(where, names, cls.__name__))
    for key in node.keys():
        if key not in _HYDRA_KEYS:
            _check_keys(node._get_node(key), f"{path}.{key}" if path else str(key))


def _add_list_targets(node: DictConfig, path: str = "") -> None:
    """Entries of a list of dataclasses (``optimizer.param_group_rules``) may be plain mappings: each
    one without a ``_target_`` gets its class's, so ``[{pattern: 'embedding.*', lr_mult: 0.1}]`` works."""
    target = node.get("_target_")
    cls = _locate(str(target), path) if target is not None else None
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    for key in node.keys():
        child, where = node._get_node(key), f"{path}.{key}" if path else str(key)
        if isinstance(child, DictConfig):
            _add_list_targets(child, where)
        elif isinstance(child, ListConfig) and typing.get_origin(hints.get(key)) is list:
            item_cls = typing.get_args(hints[key])[0]
            if dataclasses.is_dataclass(item_cls):
                for item in child:
                    if isinstance(item, DictConfig) and "_target_" not in item:
                        with open_dict(item):
                            item["_target_"] = f"{item_cls.__module__}.{item_cls.__qualname__}"


def _locate(target: str, path: str) -> Any:
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception as error:
        raise ConfigError(f"{path or 'the root'}._target_ ({target!r}) cannot be imported: {_first_line(error)}") \
            from error


def _unknown_key(where: str, names: list[str], owner: str) -> str:
    key = where.rsplit(".", 1)[-1]
    hint = closest(key, names)
    parent = where.rsplit(".", 1)[0] if "." in where else ""
    suggestion = f"; did you mean {parent + '.' if parent else ''}{hint}?" if hint else ""
    return f"{where} is not a field of {owner}{suggestion}"


def _explain(error: Exception, overrides: list[str], config_name: str, config_dir: str | None) -> ConfigError:
    text, cause = str(error), str(error.__cause__ or "")
    unknown = re.search(r"full_key: (\S+)", cause) if "not in struct" in cause else None  # logger={...}
    if match := unknown or re.search(r"Could not override '([^']+)'", text) or re.search(r"full_key: (\S+)", text):
        key = match.group(1)
        parent, _, leaf = key.rpartition(".")
        names = _keys_at(parent, [o for o in overrides if _key_of(o) != key], config_name, config_dir)
        hint = closest(leaf, names) if names else None
        value = next((o.split("=", 1)[1] for o in overrides if _key_of(o) == key and "=" in o), None)
        shown = f"{parent + '.' if parent else ''}{hint}" + (f"={value}" if value is not None else "")
        return ConfigError(f"{key} is not a config key" + (f"; did you mean {shown}?" if hint else ""))
    if match := re.search(r"Could not find '([^']+)/([^']+)'", text):
        group, option = match.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        hint = closest(option, options)
        suggestion = f"; did you mean {group}={hint}?" if hint else ""
        listed = f" (choices: {', '.join(options)})" if options else ""
        return ConfigError(f"{group} ({option!r}) is not a config in conf/{group}/{listed}{suggestion}")
    return ConfigError(_first_line(error))


def _keys_at(parent: str, overrides: list[str], config_name: str, config_dir: str | None) -> list[str]:
    """Keys under ``parent`` in the config composed with only the group choices of ``overrides`` (one
    composition, unexplained: a failing one gives no keys rather than explaining itself again)."""
    groups = [o for o in overrides if "=" in o and "." not in _key_of(o)]
    try:
        node = _hydra_compose(groups, config_name, config_dir)
    except Exception:  # Hydra's errors: no hint then
        return []
    node = OmegaConf.select(node, parent) if parent else node
    return [str(k) for k in node.keys() if k not in _HYDRA_KEYS | {"hydra"}] if isinstance(node, DictConfig) else []


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(error).__name__
