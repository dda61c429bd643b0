"""fp16 loss scaling: Megatron's DynamicGradScaler rules, skipped iterations, and the scheduler."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import GLOBAL_BATCH, batches, build, config, inf_at_first_element, lm_loss, reference, train

from anneal.optim import ConstantLossScaler, DynamicLossScaler, build_loss_scaler


def test_dynamic_scaler_spends_hysteresis_then_backs_off_and_grows_after_a_clean_window():
    s = DynamicLossScaler(initial_scale=8.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    trace = []
    for found_inf in (True, True, True, True, True, False, False, False, True, False):
        s.update(found_inf)
        trace.append(s.scale)
    # 1st overflow spends hysteresis; later ones halve (not below min 1); 3 clean steps double and refill.
    assert trace == [8.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert (s.growth_tracker, s.hysteresis_tracker) == (1, 1)


def test_scaler_state_round_trips_with_megatrons_keys():
    s = DynamicLossScaler(initial_scale=2.0**16, min_scale=1.0, growth_interval=10, hysteresis=3)
    s.update(True)
    s.update(False)
    t = DynamicLossScaler(initial_scale=1.0, min_scale=1.0)
    t.load_state_dict(s.state_dict())
    assert set(s.state_dict()) == {"scale", "growth_tracker", "hysteresis_tracker"}
    assert (t.scale, t.growth_tracker, t.hysteresis_tracker) == (2.0**16, 1, 2)


def test_build_picks_static_dynamic_or_none():
    assert build_loss_scaler(config()) is None
    assert build_loss_scaler(config(bf16=True)) is None
    static = build_loss_scaler(config(fp16=True, loss_scale=128.0))
    assert isinstance(static, ConstantLossScaler) and static.scale == 128.0
    dynamic = build_loss_scaler(
        config(fp16=True, initial_loss_scale=1024.0, loss_scale_window=7, hysteresis=3)
    )
    assert isinstance(dynamic, DynamicLossScaler)
    assert (dynamic.scale, dynamic.growth_interval, dynamic.hysteresis) == (1024.0, 7, 3)


def _iteration(model, opt, sched, tokens, poison: bool = False):
    """One iteration of the training loop (as anneal's Trainer): no scheduler step when skipped."""
    opt.zero_grad()
    weight = model.layers[0].linear_fc1.weight
    hook = weight.register_hook(inf_at_first_element) if poison else None  # as backward made it
    opt.scale_loss(lm_loss(model, tokens)).backward()
    if hook is not None:
        hook.remove()
    result = opt.step()
    if not result.skipped:
        sched.step(GLOBAL_BATCH)
    return result


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_overflowing_fp16_iteration_updates_nothing_and_does_not_advance_the_scheduler():
    data = batches(4)
    model, opt, sched = build(fp16=True, initial_loss_scale=1024.0, hysteresis=2)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert not _iteration(model, opt, sched, data[0]).skipped
    steps, lrs, before = sched.num_steps, [g["lr"] for g in opt.param_groups], _params(model)

    first = _iteration(model, opt, sched, data[1], poison=True)
    assert (first.skipped, first.num_skipped, first.loss_scale) == (True, 1, 1024.0)  # hysteresis spent
    assert not torch.isfinite(first.grad_norm)
    second = _iteration(model, opt, sched, data[1], poison=True)
    assert (second.skipped, second.num_skipped, second.loss_scale) == (True, 2, 512.0)  # now halved
    assert sched.num_steps == steps and [g["lr"] for g in opt.param_groups] == lrs
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert opt.num_updates == 1

    clean = _iteration(model, opt, sched, data[1])
    assert not clean.skipped and sched.num_steps == steps + GLOBAL_BATCH
    assert opt.state_dict()["num_skipped"] == 2
    assert opt.state_dict()["loss_scaler"]["scale"] == 512.0


def test_default_initial_scale_overflows_for_real_and_backs_off():
    model, opt, sched = build(fp16=True, hysteresis=1)  # initial_loss_scale 2**32: fp16 grads overflow
    result = _iteration(model, opt, sched, batches(1)[0])
    assert result.skipped and result.loss_scale == 2.0**31 and sched.num_steps == 0


def test_clean_fp16_iterations_track_fp32_training():
    data = batches(4)
    ref_losses = reference(4, data)[0][0::2]
    model, opt, sched = build(fp16=True, initial_loss_scale=256.0)
    losses = train(model, opt, sched, data, range(4))[0::2]
    assert losses == pytest.approx(ref_losses, rel=1e-2)
    assert opt.num_skipped == 0


def test_loss_scaler_state_is_part_of_the_optimizer_state():
    model, opt, sched = build(fp16=True, initial_loss_scale=1024.0, hysteresis=1)
    _iteration(model, opt, sched, batches(1)[0], poison=True)
    state = opt.state_dict()
    _, fresh, _ = build(fp16=True, initial_loss_scale=1024.0, hysteresis=1)
    fresh.load_state_dict(state)
    assert fresh.loss_scaler.scale == 512.0 and fresh.num_skipped == 1
    assert fresh.scale_loss(torch.tensor(2.0)).item() == 1024.0
