"""Every recipe: its Python function and ``recipe=<name>`` give equal configs that validate and dry-run."""

from __future__ import annotations

import dataclasses

import pytest

from anneal.recipes import RECIPES
from anneal_testing import CONF

NAMES = sorted(RECIPES)
PUBLISHED_PARAMETERS = {"qwen3_0p6b": 596_049_920, "qwen3_1p7b": 1_720_574_976, "qwen3_4b": 4_022_468_096,
                        "qwen3_8b": 8_190_735_360}


def test_every_recipe_has_an_overlay_and_every_overlay_a_recipe() -> None:
    assert set(NAMES) == {p.stem for p in (CONF / "recipe").glob("*.yaml")}
    assert {"qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b", "tiny"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_command_line_recipe_equals_the_python_recipe(compose, name: str) -> None:
    python = RECIPES[name]()
    assert compose(f"recipe={name}") == python
    python.validate()


def test_command_line_overrides_apply_on_top_of_the_recipe(compose) -> None:
    expected = RECIPES["qwen3_4b"]()
    expected.train.train_iters = 10
    expected.scheduler.lr_warmup_iters = 2
    assert compose("recipe=qwen3_4b", "train.train_iters=10", "scheduler.lr_warmup_iters=2") == expected
    derived = expected.validate()
    assert derived.schedule.lr_decay_steps == 10 * 32  # the decay follows the run length


def test_group_choices_on_the_command_line_beat_the_recipe(compose) -> None:
    cfg = compose("recipe=qwen3_4b", "dataset=indexed", "dataset.data_path=[/data/x_text_document]",
                  "scheduler=cosine")
    assert cfg.dataset.kind == "indexed" and cfg.scheduler.lr_decay_style == "cosine"
    assert cfg.scheduler.lr_warmup_iters == 500  # the recipe's values still apply to the new option
    assert cfg.optimizer.lr == 3e-4


def test_qwen3_4b_is_the_published_shape_with_bridge_training_and_wsd() -> None:
    cfg = RECIPES["qwen3_4b"]()
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels) == \
        (36, 2560, 32, 8, 128)
    assert (m.ffn_hidden_size, m.vocab_size, m.seq_length, m.rotary_base) == (9728, 151936, 4096, 1e6)
    assert m.share_embeddings_and_output_weights and m.qk_layernorm
    t = cfg.train
    assert (t.train_iters, t.global_batch_size, t.micro_batch_size) == (300_000, 32, 2)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.bf16) == (3e-4, 3e-5, True)
    derived = cfg.validate()
    rows = {name: iteration for name, _, iteration, _ in derived.phase_rows(m.seq_length)}
    assert rows["warmup end"] == 500
    assert rows["stable end / anneal start"] == 240_000  # the minus_sqrt anneal over the last 20%
    assert derived.schedule.lr_wsd_decay_style == "minus_sqrt"


@pytest.mark.parametrize("name", ["qwen3_0p6b", "qwen3_1p7b", "qwen3_8b"])
def test_other_sizes_keep_bridge_cosine(name: str) -> None:
    cfg = RECIPES[name]()
    assert cfg.scheduler.lr_decay_style == "cosine" and cfg.optimizer.use_distributed_optimizer
    assert cfg.validate().schedule.lr_at(cfg.validate().schedule.lr_decay_steps) == pytest.approx(3e-5)


def test_tiny_is_the_default_run_with_a_wsd_schedule(compose) -> None:
    assert RECIPES["tiny"]() == compose("scheduler=wsd")
    assert dataclasses.replace(RECIPES["tiny"](), scheduler=compose().scheduler) == compose()


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_dry_runs_with_its_published_parameter_count(name: str) -> None:
    from anneal.cli.dry_run import report

    cfg = RECIPES[name]()
    text = report(cfg, cfg.validate())
    assert "phase boundary" in text and "dist. total" in text
    if name in PUBLISHED_PARAMETERS:
        assert f"parameters           {PUBLISHED_PARAMETERS[name]:,} " in text


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_fits_its_documented_target(name: str) -> None:
    """Each recipe's ``plan.`` is its target hardware and rank count, named in its docstring, and the
    planner fits it there (steady state and construction); ``tiny`` targets this machine's CPU."""
    from anneal.cli.dry_run import world_sizes
    from anneal.planner import plan

    cfg = RECIPES[name]()
    if cfg.plan.device != "auto":
        doc = " ".join(RECIPES[name].__doc__.split())
        assert f"planned for {cfg.plan.world_size} × {cfg.plan.device}" in doc
        assert world_sizes(cfg) == (cfg.plan.world_size,)  # the dry run plans the target by default
    else:
        assert cfg.plan.world_size is None and "on CPU" in RECIPES[name].__doc__  # one rank, this machine
    p = plan(cfg, cfg.validate().train_samples, [cfg.plan.world_size or 1])
    (rank,) = p.ranks
    assert rank.microbatches is not None
    assert p.target.free is not None and rank.need * p.target.ranks_here <= p.target.free, rank.need / 2**30
