"""anneal's flat optimizer in one process: parity with torch.optim, mixed precision, clipping, state."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import GLOBAL_BATCH, SCHEDULE, TinyLM, batches, build, config, lm_loss, reference, train

from anneal.optim import FlatOptimizer, get_param_groups
from anneal.optim.update_rules import AdamWUpdate, SgdUpdate
from anneal.scheduler import OptimizerParamScheduler


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("distributed", [False, True])
def test_adamw_matches_torch_adamw_with_groups_clipping_and_schedule(distributed):
    data = batches(8)
    ref_losses, ref_params, _ = reference(8, data)
    model, opt, sched = build(use_distributed_optimizer=distributed)
    losses = train(model, opt, sched, data, range(8))
    assert opt.backend == ("native-zero1" if distributed else "torch-adamw-fused")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), ref_params[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip_grad", [0.0, 0.3])
def test_sgd_matches_torch_sgd(clip_grad):
    data = batches(5)
    model, opt, sched = build(optimizer="sgd", sgd_momentum=0.9, clip_grad=clip_grad)
    train(model, opt, sched, data, range(5))
    assert opt.backend == "torch-sgd-fused"

    ref = TinyLM()
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in get_param_groups(ref, config())]
    torch_opt = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    torch_sched = OptimizerParamScheduler(
        torch_opt, **SCHEDULE.__dict__, use_checkpoint_opt_param_scheduler=False
    )
    for tokens in data:
        torch_opt.zero_grad()
        lm_loss(ref, tokens).backward()
        if clip_grad > 0:
            assert (
                torch.nn.utils.clip_grad_norm_(ref.parameters(), clip_grad) > clip_grad
            )  # clipping is active
        torch_opt.step()
        torch_sched.step(GLOBAL_BATCH)
    for name, param in ref.named_parameters():
        torch.testing.assert_close(model.get_parameter(name).detach(), param.detach(), rtol=1e-5, atol=1e-7)


def test_update_reads_lr_and_weight_decay_from_param_groups_every_step():
    model, opt, _ = build(clip_grad=0.0)
    before = _snapshot(model)
    for group in opt.param_groups:
        group["lr"] = 0.0
    _one_step(model, opt)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    for group in opt.param_groups:
        group["lr"] = 1e-2
    _one_step(model, opt)
    assert not torch.equal(before["layers.0.linear_fc1.weight"], model.layers[0].linear_fc1.weight)


def _one_step(model, opt):
    opt.zero_grad()
    opt.scale_loss(lm_loss(model, batches(1)[0])).backward()
    return opt.step()


def test_grad_norm_is_the_pre_clip_global_norm_and_clipping_matches_torch():
    model, opt, _ = build(clip_grad=0.05)
    ref = TinyLM()
    lm_loss(ref, batches(1)[0]).backward()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    result = _one_step(model, opt)
    assert result.grad_norm.dim() == 0 and not result.skipped and result.loss_scale == 1.0
    torch.testing.assert_close(result.grad_norm, expected, rtol=1e-6, atol=0)
    assert expected > 0.05  # the clip was active


def test_without_clipping_the_norm_is_not_computed_as_in_megatron():
    model, opt, _ = build(clip_grad=0.0)
    assert _one_step(model, opt).grad_norm.item() == 0.0


def test_bf16_casts_the_model_and_keeps_fp32_master_weights_and_state():
    data = batches(4)
    model, opt, sched = build(bf16=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref_params = {n: p.detach().clone() for n, p in TinyLM().named_parameters()}  # fp32 initial weights
    ref_model = TinyLM()
    groups = [
        {k: v for k, v in g.items() if k != "param_names"} for g in get_param_groups(ref_model, config())
    ]
    torch_opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95))
    names = [n for g in opt.param_groups for n in g["param_names"]]
    torch.testing.assert_close(
        opt._master, torch.cat([ref_params[n].reshape(-1) for n in names]), rtol=0, atol=0
    )
    for step in range(4):
        opt.zero_grad()
        lm_loss(model, data[step]).backward()
        grads = {n: opt._grad_views[i].clone() for i, n in enumerate(names)}  # the fp32 main grads
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()]))
        result = opt.step()
        torch.testing.assert_close(result.grad_norm, norm, rtol=1e-5, atol=0)
        for group in torch_opt.param_groups:  # the same lr / wd the scheduler gave anneal's groups
            twin = next(
                g
                for g in opt.param_groups
                if g["max_lr"] == group["max_lr"] and g["wd_mult"] == group["wd_mult"]
            )
            group["lr"], group["weight_decay"] = twin["lr"], twin["weight_decay"]
        for n, p in ref_model.named_parameters():
            p.grad = grads[n] * min(1.0, 0.3 / (norm.item() + 1e-6))
        torch_opt.step()
        sched.step(GLOBAL_BATCH)
    expected = torch.cat([ref_model.get_parameter(n).detach().reshape(-1) for n in names])
    torch.testing.assert_close(opt._master, expected, rtol=1e-5, atol=1e-7)
    flat_model = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    assert torch.equal(flat_model, opt._master.to(torch.bfloat16))
    assert all(t.dtype == torch.float32 for k, t in opt.state_dict().items() if isinstance(t, torch.Tensor))


def test_model_zero_grad_to_none_still_trains_correctly():
    data = batches(3)
    _, ref_params, _ = reference(3, data)
    model, opt, sched = build()
    for step in range(3):
        model.zero_grad(set_to_none=True)  # not the optimizer's zero_grad: grads leave the flat buffer
        lm_loss(model, data[step]).backward()
        opt.step()
        sched.step(GLOBAL_BATCH)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), ref_params[name], rtol=1e-5, atol=1e-7)
        assert param.grad.data_ptr() == opt._grad_views[opt.layout.names.index(name)].data_ptr()


def test_state_dict_round_trip_continues_identically():
    data = batches(6)
    model, opt, sched = build(use_distributed_optimizer=True)
    train(model, opt, sched, data, range(3))
    saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state_dict().items()}
    model_state, sched_state = {k: v.clone() for k, v in model.state_dict().items()}, sched.state_dict()
    expected = train(model, opt, sched, data, range(3, 6))

    model2, opt2, sched2 = build(use_distributed_optimizer=True)
    model2.load_state_dict(model_state)
    opt2.load_state_dict(saved)
    sched2.load_state_dict(sched_state)
    assert train(model2, opt2, sched2, data, range(3, 6)) == expected


def test_a_checkpoint_of_another_model_is_rejected():
    _, opt, _ = build()
    other = FlatOptimizer(
        get_param_groups(TinyLM(layers=1), config()),
        update=AdamWUpdate(0.9, 0.95, 1e-8), dtype=torch.float32, clip_grad=1.0, weight_decay=0.1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="does not match this model"):
        opt.load_state_dict(other.state_dict())


def test_sgd_state_is_a_momentum_buffer():
    _, opt, _ = build(optimizer="sgd")
    assert isinstance(opt.update, SgdUpdate)
    assert set(opt.state_dict()) >= {"momentum_buffer", "layout", "num_updates"}


@pytest.mark.parametrize("bf16", [False, True])
def test_backward_accumulates_straight_into_the_flat_gradient_buffer(bf16):
    model, opt, _ = build(bf16=bf16)
    opt.zero_grad()
    for _ in range(2):  # two microbatches
        lm_loss(model, batches(1)[0]).backward()
    if bf16:  # the hooks moved each bf16 .grad into the fp32 main grad and freed it
        assert opt._flat_grad.dtype == torch.float32 and all(p.grad is None for p in opt.params)
    else:
        assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(opt.params, opt._grad_views))
    assert opt._flat_grad.abs().sum() > 0


def test_grad_norm_of_a_long_buffer_is_accurate_to_fp32():
    # One fp32 vector_norm over millions of elements accumulates serially on CPU: 3e-4 relative off at
    # 10M elements (a wrong clip coefficient). The norm is taken per block, then over the blocks.
    weight = torch.nn.Parameter(torch.zeros(2_000_000))
    opt = FlatOptimizer([{"params": [weight], "param_names": ["w"]}], update=AdamWUpdate(0.9, 0.95, 1e-8),
                        dtype=torch.float32, clip_grad=1.0, weight_decay=0.0)
    grad = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0)) * 0.01
    weight.grad = grad.clone()
    norm = opt.step().grad_norm.item()
    exact = torch.linalg.vector_norm(grad.double()).item()
    assert abs(norm - exact) / exact < 1e-6, (norm, exact)


MICROBATCHES = 32


def _microbatch_grads(model, opt, data: torch.Tensor) -> list[torch.Tensor]:
    """Each microbatch's gradient on its own (the engine's buffer zeroed before each), as fp32."""
    grads = []
    for tokens in data.split(1):
        opt.zero_grad()
        opt.scale_loss(lm_loss(model, tokens) / len(data)).backward()
        grads.append(opt._flat_grad.float().clone())
    return grads


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_microbatch_gradients_accumulate_in_fp32(precision):
    # 32 low-precision microbatch gradients accumulated by backward must equal their fp32 sum: a
    # bf16 (or fp16) accumulation rounds after every add and ends many ulps away.
    model, opt, _ = build(**{precision: True}, initial_loss_scale=1024.0)
    data = torch.randint(0, 64, (MICROBATCHES, 17), generator=torch.Generator().manual_seed(3))
    expected = torch.zeros_like(_microbatch_grads(model, opt, data[:1])[0])
    for grad in _microbatch_grads(model, opt, data):
        expected += grad  # the same order backward adds them in
    opt.zero_grad()
    for tokens in data.split(1):
        opt.scale_loss(lm_loss(model, tokens) / len(data)).backward()
    actual = opt._flat_grad.float()
    ulp = torch.finfo(model.embedding.weight.dtype).eps * expected.abs()
    ulps = (actual - expected).abs() / ulp.clamp_min(1e-30)
    assert torch.isfinite(expected).all() and expected.abs().sum() > 0
    assert torch.equal(actual, expected), (
        f"{int((ulps > 0).sum())} of {ulps.numel()} elements differ from the fp32 sum: median "
        f"{ulps.median().item():.2f}, 99th percentile {ulps.quantile(0.99).item():.1f} {precision} ulps")
    assert opt._flat_grad.dtype == torch.float32


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("distributed", [False, True])
@pytest.mark.parametrize(("precision", "grad_reduce_in_fp32"),
                         [("fp32", True), ("bf16", True), ("fp16", True), ("bf16", False), ("fp16", False)])
def test_planner_bytes_are_the_native_engines_real_tensors(distributed, precision, grad_reduce_in_fp32):
    from anneal.parallel import single_process
    from anneal.planner import state_bytes

    overrides = {"use_distributed_optimizer": distributed, "grad_reduce_in_fp32": grad_reduce_in_fp32}
    if precision != "fp32":
        overrides[precision] = True
    model, opt, _ = build(**overrides)
    opt.zero_grad()
    lm_loss(model, batches(1)[0]).backward()
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    planned = state_bytes(None, config(**overrides), single_process(), shapes=shapes)
    buffer = opt._flat_grad.untyped_storage().data_ptr()
    stray = [p.grad for p in model.parameters() if p.grad is not None
             and p.grad.untyped_storage().data_ptr() != buffer]  # gradients held outside the flat buffer
    real_grads = opt.grad_bytes() + _bytes(*stray)
    assert (planned.params, planned.grads, planned.optimizer) == (
        _bytes(opt._flat_param), real_grads, opt.state_bytes())
