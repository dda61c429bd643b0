"""A config from elsewhere is data: which classes it may name, checked before Hydra instantiates anything.

Hydra builds whatever a ``_target_`` names, so a shared YAML (or a command-line override) could run
any importable constructor, ``logging.FileHandler(..., mode="w")`` truncating a file for one. These
checks run on the composed config, whatever its source (``conf/``, a recipe, ``--config-name``, the
command line), before anything is instantiated, and refuse with one line naming the field, the
target and the class expected:

- anneal's tree: every ``_target_`` names the dataclass its field declares, or a subclass that anneal
  defines; a target outside ``anneal.`` is refused without importing it, and plain-data fields
  (numbers, strings, lists, mappings) hold no ``_target_`` at all. Interpolations are resolved first,
  so ``${oc.create:...}`` cannot hide one.
- Hydra's instantiable nodes: ``hydra.callbacks.*``, ``hydra.launcher`` and ``hydra.sweeper`` name
  subclasses of Hydra's ``Callback``, ``Launcher`` and ``Sweeper`` (their modules are imported to
  check that, never instantiated) and hold no further ``_target_``.
- Hydra's logging (``hydra.job_logging``, ``hydra.hydra_logging``, read by ``logging.config``): handlers
  are a stream to stdout/stderr, a null handler, or a file handler appending inside the run directory;
  formatters and filters are subclasses of ``logging.Formatter`` and ``logging.Filter``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from anneal.errors import ConfigError

OWN_PACKAGE = "anneal"
HYDRA_PLUGINS = {"callbacks": "hydra.experimental.callback.Callback",
                 "launcher": "hydra.plugins.launcher.Launcher",
                 "sweeper": "hydra.plugins.sweeper.Sweeper"}
STREAMS = ("ext://sys.stdout", "ext://sys.stderr")
RUN_DIR = ("${hydra.runtime.output_dir}/", "${hydra:runtime.output_dir}/")
JOB_NAME = ("${hydra.job.name}", "${hydra:job.name}")
_HANDLER_KEYS = {"class", "formatter", "level", "filters"}
HANDLERS = {"logging.StreamHandler": _HANDLER_KEYS | {"stream"},
            "logging.NullHandler": _HANDLER_KEYS,
            "logging.FileHandler": _HANDLER_KEYS | {"filename", "mode", "encoding", "delay", "errors"}}
_PLAIN_NAME = re.compile(r"^[\w.\-]+$")


def check_targets(cfg: DictConfig, root: type) -> None:
    """Refuse any ``_target_`` in anneal's (resolved) tree that is not the class its field declares."""
    _check_node(cfg, root, "")


def check_hydra(hydra: DictConfig) -> None:
    """Refuse Hydra plugins that are not Hydra's interfaces and logging that could write elsewhere."""
    for name in (hydra.get("callbacks") or {}):
        _check_plugin(hydra.callbacks, name, HYDRA_PLUGINS["callbacks"], f"hydra.callbacks.{name}")
    for name in ("launcher", "sweeper"):
        if hydra.get(name) is not None:
            _check_plugin(hydra, name, HYDRA_PLUGINS[name], f"hydra.{name}")
    job = hydra.get("job")
    if job is not None and not OmegaConf.is_missing(job, "name") and not _is_plain_name(job.name):
        raise ConfigError(f"hydra.job.name ({job.name!r}) must be a plain file name (letters, digits, '_', "
                          "'-', '.'): the job's log file is named after it")
    for name in ("job_logging", "hydra_logging"):
        if hydra.get(name) is not None:
            check_logging(hydra[name], f"hydra.{name}")


# anneal's tree ------------------------------------------------------------------------------------------

def _check_node(node: Any, declared: Any, path: str) -> None:
    classes = _dataclasses_in(declared)
    if not isinstance(node, DictConfig) or not classes or "_target_" not in node:
        _refuse_targets(node, path, declared)  # plain data, or a mapping Hydra leaves a mapping
        return
    cls = _own_class(node["_target_"], classes, path)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in node.keys():
        where = f"{path}.{key}" if path else str(key)
        if key == "_target_":
            continue
        child = node._get_node(key)
        if key not in names:
            _refuse_targets(child, where, None)
        elif isinstance(child, ListConfig) and typing.get_origin(hints[key]) is list:
            for i, item in enumerate(child):
                _check_node(item, typing.get_args(hints[key])[0], f"{where}[{i}]")
        else:
            _check_node(child, hints[key], where)


def _dataclasses_in(declared: Any) -> tuple[type, ...]:
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(declared) if dataclasses.is_dataclass(a))
    return (declared,) if dataclasses.is_dataclass(declared) else ()


def _own_class(target: Any, classes: tuple[type, ...], path: str) -> type:
    """The anneal class ``target`` names, if it is (a subclass of) one of ``classes``; never imports others."""
    expected = " or ".join(_name(c) for c in classes)
    refusal = ConfigError(f"{path or 'the root'}._target_ ({target!r}) must be {expected} or a subclass "
                          f"anneal defines: a config names only anneal's own config classes")
    if not isinstance(target, str) or not target.startswith(f"{OWN_PACKAGE}."):
        raise refusal
    cls = _import(target)
    if not (isinstance(cls, type) and issubclass(cls, classes)):
        raise refusal
    return cls


def _refuse_targets(node: Any, path: str, declared: Any) -> None:
    """Raise at the first ``_target_`` under ``node``: Hydra would instantiate it, no field asked for it."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _refuse_targets(item, f"{path}[{i}]", None)
    elif isinstance(node, DictConfig):
        if "_target_" in node:
            wanted = f": {path} takes {_describe(declared)}" if declared is not None else ""
            raise ConfigError(f"{path or 'the root'}._target_ ({node['_target_']!r}) is not allowed here"
                              f"{wanted}; a config names only anneal's own config classes, where a field "
                              f"declares one")
        for key in node.keys():
            _refuse_targets(node._get_node(key), f"{path}.{key}" if path else str(key), None)


def _describe(declared: Any) -> str:
    union = typing.get_origin(declared) in (typing.Union, types.UnionType)
    args = typing.get_args(declared) if union else (declared,)
    parts = [str(a) if typing.get_origin(a) else a.__name__ for a in args if a is not type(None)]
    return "plain data (" + " or ".join(parts) + (" or null" if type(None) in args else "") + ")"


# Hydra's nodes ------------------------------------------------------------------------------------------

def _check_plugin(parent: DictConfig, key: str, interface: str, path: str) -> None:
    node = _value(parent, key, path)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{path}._target_ (None) must be a subclass of {interface}")
    _check_subclass(node, "_target_", interface, f"{path}._target_", ": Hydra instantiates it before the run")
    for child in node.keys():
        if child != "_target_":
            _refuse_resolved(node, child, f"{path}.{child}")


def _refuse_resolved(parent: DictConfig | ListConfig, key: Any, path: str) -> None:
    """Like ``_refuse_targets`` on ``parent[key]`` with interpolations followed (Hydra resolves them)."""
    value = _value(parent, key, path)
    if isinstance(value, DictConfig) and "_target_" in value:
        raise ConfigError(f"{path}._target_ ({value['_target_']!r}) is not allowed here: Hydra would "
                          f"instantiate it before the run starts")
    if isinstance(value, (DictConfig, ListConfig)):
        keys = value.keys() if isinstance(value, DictConfig) else range(len(value))
        for child in keys:
            _refuse_resolved(value, child, f"{path}.{child}" if isinstance(value, DictConfig) else f"{path}[{child}]")


def _value(parent: DictConfig | ListConfig, key: Any, path: str) -> Any:
    """``parent[key]`` resolved; an interpolation that needs the run (``${hydra:runtime...}``) stays as
    it is, unless it builds a node from text (``oc.create``, ``oc.decode``), which is refused."""
    try:
        return parent[key]
    except Exception:  # a value only the running job can resolve; Hydra resolves it later
        raw = parent._get_node(key)._value()
        if isinstance(raw, str) and re.search(r"\$\{\s*oc\.(create|decode)\s*:", raw):
            raise ConfigError(f"{path} ({raw!r}) must not build a config node from text here") from None
        return raw


def check_logging(node: DictConfig, path: str) -> None:
    """A ``logging.config.dictConfig`` mapping that writes only to stdout/stderr or inside the run dir."""
    _refuse_targets(node, path, None)
    for name in (node.get("formatters") or {}):
        _check_factory(node.formatters[name], "logging.Formatter", f"{path}.formatters.{name}", ("()", "class"))
    for name in (node.get("filters") or {}):
        _check_factory(node.filters[name], "logging.Filter", f"{path}.filters.{name}", ("()",))
    for name in (node.get("handlers") or {}):
        _check_handler(node.handlers[name], f"{path}.handlers.{name}")


def _check_factory(node: DictConfig, interface: str, path: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in node:
            _check_subclass(node, key, interface, f"{path}.{key}")
    for key in node.keys():
        value = node._get_node(key)._value()
        if isinstance(value, str) and "ext://" in value:
            raise ConfigError(f"{path}.{key} ({value!r}) must not name an object (ext://)")


def _check_subclass(node: DictConfig, key: str, interface: str, path: str, why: str = "") -> None:
    """``node[key]`` names, literally (no interpolation), an importable subclass of ``interface``."""
    target = node._get_node(key)._value()
    refusal = ConfigError(f"{path} ({target!r}) must be a subclass of {interface}{why}")
    if not isinstance(target, str) or OmegaConf.is_interpolation(node, key):
        raise refusal
    try:
        cls = _import(target)
    except ConfigError:
        raise refusal from None
    if not (isinstance(cls, type) and issubclass(cls, _import(interface))):
        raise refusal


def _check_handler(node: DictConfig, path: str) -> None:
    cls = node._get_node("class")._value() if "class" in node else None
    if "()" in node or cls not in HANDLERS or OmegaConf.is_interpolation(node, "class"):
        shown = node._get_node("()")._value() if "()" in node else cls
        raise ConfigError(f"{path} ({shown!r}) must have class one of {', '.join(HANDLERS)}: a log handler "
                          f"writes only to stdout, stderr or a file inside the run directory")
    for key in node.keys():
        if key not in HANDLERS[cls]:
            raise ConfigError(f"{path}.{key} is not allowed for {cls} (allowed: "
                              f"{', '.join(sorted(HANDLERS[cls]))})")
    raw = {key: node._get_node(key)._value() for key in node.keys()}
    if "stream" in raw and raw["stream"] not in STREAMS:
        raise ConfigError(f"{path}.stream ({raw['stream']!r}) must be one of {', '.join(STREAMS)}")
    if "mode" in raw and raw["mode"] != "a":
        raise ConfigError(f"{path}.mode ({raw['mode']!r}) must be 'a': a log file is appended to, never "
                          f"truncated")
    if cls == "logging.FileHandler" and not _in_run_dir(raw.get("filename")):
        raise ConfigError(f"{path}.filename ({raw.get('filename')!r}) must be a plain name inside the run "
                          f"directory: {RUN_DIR[0]}NAME.log (NAME may use {JOB_NAME[0]})")


def _in_run_dir(filename: Any) -> bool:
    if not isinstance(filename, str) or not filename.startswith(RUN_DIR):
        return False
    tail = filename.split("/", 1)[1]
    for name in JOB_NAME:
        tail = tail.replace(name, "job")
    return all(_is_plain_name(part) for part in tail.split("/"))


def _is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_PLAIN_NAME.match(name)) and name not in (".", "..")


# shared -------------------------------------------------------------------------------------------------

def _import(dotted: str) -> Any:
    """The object at ``dotted`` (``package.module.Class``); importing its module instantiates nothing."""
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as error:  # ImportError, AttributeError, or an error in the module itself
        raise ConfigError(f"{dotted!r} cannot be imported: {error}") from None


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
