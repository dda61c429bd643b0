"""Shared fixtures: the real shipped conf/, composed by Hydra."""

from __future__ import annotations

import pytest


@pytest.fixture
def compose():
    """Compose the shipped conf/ with overrides and instantiate it: (overrides) -> ConfigContainer."""
    from anneal.config.compose import load

    return lambda *overrides: load(list(overrides))
