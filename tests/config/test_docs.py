"""Every config field has a description (its source comment), which ``--help`` prints."""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass

import pytest

from anneal.config.container import ConfigContainer
from anneal.config.docs import field_docs


def _classes(cls=ConfigContainer, seen=None) -> list[type]:
    seen = seen if seen is not None else []
    if cls in seen:
        return seen
    seen.append(cls)
    for hint in typing.get_type_hints(cls).values():
        nested = (a for t in typing.get_args(hint) for a in typing.get_args(t))
        for arg in (hint, *typing.get_args(hint), *nested):
            if is_dataclass(arg):
                _classes(arg, seen)
    return seen


FIELDS = [(cls, f.name) for cls in _classes() for f in fields(cls)]


@pytest.mark.parametrize("cls,name", FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FIELDS])
def test_every_field_has_a_description(cls: type, name: str) -> None:
    hint = typing.get_type_hints(cls)[name]
    if any(is_dataclass(t) for t in (hint, *typing.get_args(hint))):
        return  # a section: described by its class
    assert field_docs(cls).get(name), f"{cls.__name__}.{name}: add a comment beside the field (--help shows it)"


def test_comment_above_a_field_is_its_description() -> None:
    from anneal.config.training import TrainingConfig

    assert field_docs(TrainingConfig)["rampup_batch_size"].startswith("[start global batch, increment")
