"""Every shipped config composes, instantiates and validates, so none can rot."""

from __future__ import annotations

import pytest

from anneal.config.scheduler import SchedulerConfig
from anneal_testing import CONF

GROUPS = sorted(p.parent.name + "=" + p.stem for p in CONF.glob("*/*.yaml"))
# Options that need a value only the user has (a data path) get one here.
REQUIRED = {"dataset=indexed": ["dataset.data_path=[/data/corpus_text_document]"]}


def test_there_are_configs_to_check() -> None:
    groups = {g.split("=")[0] for g in GROUPS}
    assert {"optimizer", "scheduler", "model", "dataset"} <= groups


def test_default_config_validates(compose) -> None:
    cfg = compose()
    derived = cfg.validate()
    assert derived.train_iters == cfg.train.train_iters
    assert derived.schedule.lr_decay_steps == cfg.train.train_iters * cfg.train.global_batch_size


@pytest.mark.parametrize("choice", GROUPS)
def test_shipped_group_option_composes_and_validates(compose, choice: str) -> None:
    cfg = compose(choice, *REQUIRED.get(choice, []))
    cfg.validate()
    group, name = choice.split("=")
    if group == "scheduler" and isinstance(cfg.scheduler, SchedulerConfig):  # Megatron's: named by style
        assert cfg.scheduler.lr_decay_style.lower().replace("-", "_") == name.replace("wsd", "wsd")
