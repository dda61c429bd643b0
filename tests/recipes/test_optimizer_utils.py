"""The recipe helpers return Megatron-Bridge's defaults, and every pair they return validates."""

from __future__ import annotations

import pytest

from anneal.config.container import ConfigContainer
from anneal.config.training import TrainingConfig
from anneal.errors import ConfigError
from anneal.recipes.utils import distributed_fused_adam_with_cosine_annealing, distributed_fused_adam_with_wsd

HELPERS = [distributed_fused_adam_with_cosine_annealing, distributed_fused_adam_with_wsd]


def _derive(optimizer, scheduler, train_iters: int = 10_000):
    return ConfigContainer(train=TrainingConfig(train_iters=train_iters), optimizer=optimizer,
                           scheduler=scheduler).validate()


def test_cosine_helper_has_megatron_bridge_defaults() -> None:
    optimizer, scheduler = distributed_fused_adam_with_cosine_annealing()
    assert (optimizer.optimizer, optimizer.bf16, optimizer.fp16) == ("adam", True, False)
    assert (optimizer.adam_beta1, optimizer.adam_beta2, optimizer.adam_eps) == (0.9, 0.95, 1e-8)
    assert (optimizer.lr, optimizer.min_lr) == (1e-4, pytest.approx(1e-5, rel=1e-12))
    assert (optimizer.weight_decay, optimizer.clip_grad) == (0.1, 1.0)
    assert optimizer.use_distributed_optimizer is True
    assert (scheduler.lr_decay_style, scheduler.lr_warmup_iters) == ("cosine", 2000)
    assert scheduler.lr_warmup_init == 0.0
    assert (scheduler.start_weight_decay, scheduler.end_weight_decay) == (0.033, 0.033)
    assert scheduler.weight_decay_incr_style == "constant"
    assert scheduler.override_opt_param_scheduler is True
    assert scheduler.lr_decay_iters is None  # the run length, so it follows train.train_iters


def test_min_lr_defaults_to_a_tenth_of_max_lr_and_follows_it() -> None:
    for helper in HELPERS:
        optimizer, _ = helper(max_lr=3e-4)
        assert optimizer.min_lr == pytest.approx(3e-5, rel=1e-12)
        assert helper(max_lr=3e-4, min_lr=0.0)[0].min_lr == 0.0


def test_wsd_helper_anneals_minus_sqrt_over_the_last_fifth_by_default() -> None:
    optimizer, scheduler = distributed_fused_adam_with_wsd(lr_warmup_iters=100)
    assert (scheduler.lr_decay_style, scheduler.lr_wsd_decay_style, scheduler.lr_wsd_decay_iters) == \
        ("WSD", "minus_sqrt", None)
    derived = _derive(optimizer, scheduler, train_iters=10_000)
    gbs = derived.ramp.global_batch_size
    assert derived.schedule.wsd_decay_steps == 2_000 * gbs  # 20% of 10k iterations, in samples
    assert derived.schedule.lr_at(derived.schedule.lr_decay_steps) == pytest.approx(optimizer.min_lr)


def test_wsd_helper_takes_the_anneal_shape_and_length() -> None:
    optimizer, scheduler = distributed_fused_adam_with_wsd(lr_warmup_iters=100, lr_wsd_decay_style="linear",
                                                           lr_wsd_decay_iters=500)
    derived = _derive(optimizer, scheduler, train_iters=10_000)
    s, gbs = derived.schedule, derived.ramp.global_batch_size
    assert (s.lr_wsd_decay_style, s.wsd_decay_steps) == ("linear", 500 * gbs)
    halfway = s.lr_decay_steps - 250 * gbs
    assert s.lr_at(halfway) == pytest.approx((optimizer.lr + optimizer.min_lr) / 2)


@pytest.mark.parametrize("helper", HELPERS, ids=lambda h: h.__name__)
@pytest.mark.parametrize(("precision", "bf16", "fp16"),
                         [("bf16-mixed", True, False), ("16-mixed", False, True), ("32", False, False)])
def test_precision_sets_the_half_flags_and_validates(helper, precision: str, bf16: bool, fp16: bool) -> None:
    optimizer, scheduler = helper(precision=precision, lr_warmup_iters=10)
    assert (optimizer.bf16, optimizer.fp16) == (bf16, fp16)
    _derive(optimizer, scheduler)


@pytest.mark.parametrize("helper", HELPERS, ids=lambda h: h.__name__)
def test_unknown_precision_is_rejected_with_the_choices(helper) -> None:
    with pytest.raises(ConfigError, match=r"precision \('bf16'\) must be one of 'bf16-mixed', '16-mixed'"):
        helper(precision="bf16")
