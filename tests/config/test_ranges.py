"""Every numeric config field has a range rule, and a value outside it is refused by validation.

The fields are enumerated from the dataclasses themselves, so a new numeric field without a row in
``anneal.config.ranges.RANGES`` fails ``test_every_numeric_field_has_a_range_rule``.
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import fields, is_dataclass

import pytest

from anneal.config.container import ConfigContainer
from anneal.config.optimizer import OptimizerConfig, ParamGroupRule
from anneal.config.ranges import RANGES, Range
from anneal.config.torch_scheduler import TorchSchedulerConfig
from anneal.errors import ConfigError
from anneal_testing import run_cli


def _unwrap(hint) -> tuple[list, bool]:
    """(the types a hint allows, None and list stripped; whether it is a list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [_unwrap(a) for a in args if a is not type(None)]
        return [t for ts, _ in inner for t in ts], any(is_list for _, is_list in inner)
    if origin is list:
        return _unwrap(args[0])[0], True
    return [hint], False


def numeric_fields(cls=ConfigContainer, path=()) -> list[tuple[tuple, type, str, bool]]:
    """(path of attribute names, class, field, integer?) for every numeric field under ``cls``."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        allowed, is_list = _unwrap(hints[f.name])
        step = (f.name, 0) if is_list else (f.name,)
        for sub in (t for t in allowed if is_dataclass(t)):
            found += numeric_fields(sub, path + step)
        if allowed and all(t in (int, float) for t in allowed):
            found.append((path + (f.name,), cls, f.name, float not in allowed))
    return found


FIELDS = numeric_fields()
IDS = [f"{cls.__name__}.{name}" for _, cls, name, _ in FIELDS]


def test_the_walk_finds_the_sections_fields() -> None:
    assert {"OptimizerConfig.sgd_momentum", "ParamGroupRule.lr_mult", "TrainingConfig.train_iters",
            "TorchSchedulerConfig.warmup_start_factor", "ModelConfig.rotary_base",
            "RNGConfig.seed"} <= set(IDS)


@pytest.mark.parametrize("key", IDS)
def test_every_numeric_field_has_a_range_rule(key: str) -> None:
    assert key in RANGES, f"{key} is numeric: add its rule to anneal.config.ranges.RANGES"


def _outside(rule: Range, integer: bool):
    value = (rule.low if rule.low_open else rule.low - 1) if rule.low is not None else rule.high + 1
    return int(value) if integer else float(value)


def _container(cls: type) -> ConfigContainer:
    cfg = ConfigContainer(optimizer=OptimizerConfig(lr=1e-3, param_group_rules=[ParamGroupRule()]))
    cfg.train.train_iters = 100
    if cls is TorchSchedulerConfig:
        cfg.scheduler = TorchSchedulerConfig()
    return cfg


@pytest.mark.parametrize("path,cls,name,integer", FIELDS, ids=IDS)
def test_a_value_outside_the_rule_is_refused_naming_the_field(path, cls, name, integer) -> None:
    rule = RANGES[f"{cls.__name__}.{name}"]
    cfg = copy.deepcopy(_container(cls))
    owner = cfg
    for step in path[:-1]:
        owner = owner[step] if isinstance(step, int) else getattr(owner, step)
    bad = _outside(rule, integer)
    is_list = isinstance(getattr(owner, name), list) or name in ("rampup_batch_size", "profile_ranks")
    setattr(owner, name, [bad, bad, bad] if is_list else bad)
    dotted = ".".join(str(s) for s in path).replace(".0.", "[0].")
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    expected = f"{dotted}{'[0]' if is_list else ''} ({bad!r}) must be"
    assert str(info.value).startswith(expected), str(info.value)


def test_rule_descriptions_read_as_intervals() -> None:
    assert Range(0, 1, high_open=True).describe() == "in [0, 1)"
    assert Range(0, low_open=True).describe() == "> 0"
    assert Range(1).describe() == ">= 1"


def test_sgd_momentum_above_one_is_refused_before_anything_starts(tmp_path) -> None:
    out = run_cli("optimizer.sgd_momentum=2.0", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "anneal: error: optimizer.sgd_momentum (2.0) must be in [0, 1)"
    assert not (tmp_path / "outputs").exists()
