"""Each validation rule fires, and its message starts with (or names) the dotted field."""

from __future__ import annotations

import pytest

from anneal.config.container import check_world
from anneal.errors import ConfigError

# (overrides, text the message must contain)
RULES = [
    (["optimizer.optimizer=adamw"], "optimizer.optimizer ('adamw')"),
    (["optimizer.lr=null"], "optimizer.lr (None) must be set"),
    (["optimizer.lr=-1"], "optimizer.lr (-1)"),
    (["optimizer.min_lr=1.0"], "optimizer.min_lr (1.0) must be <= optimizer.lr"),
    (["optimizer.bf16=true", "optimizer.fp16=true"], "optimizer.bf16 (True) and optimizer.fp16 (True)"),
    (["optimizer.adam_beta2=1.0"], "optimizer.adam_beta2 (1.0)"),
    (["optimizer.adam_eps=0"], "optimizer.adam_eps (0)"),
    (["optimizer.lr=abc"], "optimizer.lr ('abc') must be a number"),
    (["optimizer.decoupled_lr=1e-4", "optimizer.decoupled_min_lr=1e-3"], "optimizer.decoupled_min_lr"),
    (["optimizer.min_loss_scale=0"], "optimizer.min_loss_scale (0)"),
    (["scheduler.lr_decay_style=cosin"], "did you mean 'cosine'"),
    (["scheduler.lr_wsd_decay_style=sqrt"], "scheduler.lr_wsd_decay_style ('sqrt')"),
    (["scheduler.weight_decay_incr_style=exp"], "scheduler.weight_decay_incr_style ('exp')"),
    (["scheduler.lr_warmup_iters=300"], "scheduler.lr_warmup_iters (300) must be < train.train_iters (300)"),
    (["scheduler.lr_warmup_iters=250", "scheduler.lr_decay_iters=200"],
     "scheduler.lr_warmup_iters (250) must be < scheduler.lr_decay_iters (200)"),
    (["scheduler.lr_warmup_fraction=0.1"], "scheduler.lr_warmup_fraction (0.1) and scheduler.lr_warmup_iters (30)"),
    (["scheduler.lr_warmup_fraction=1.5", "scheduler.lr_warmup_iters=0"], "scheduler.lr_warmup_fraction (1.5)"),
    (["scheduler.lr_warmup_iters=0", "scheduler.lr_warmup_samples=64"],
     "scheduler.lr_warmup_samples (64) cannot be used with train.train_iters"),
    (["scheduler.lr_warmup_samples=64"],
     "scheduler.lr_warmup_iters (30) and scheduler.lr_warmup_samples (64) are mutually exclusive: unset one"),
    (["train.train_iters=null", "train.train_samples=3200"],
     "scheduler.lr_warmup_iters (30) cannot be used with train.train_samples"),
    (["train.train_samples=3200"], "train.train_iters (300) and train.train_samples (3200) are mutually exclusive"),
    (["scheduler.lr_warmup_init=1.0"], "scheduler.lr_warmup_init (1.0) must be <= optimizer.lr"),
    (["scheduler.override_opt_param_scheduler=true", "scheduler.use_checkpoint_opt_param_scheduler=true"],
     "scheduler.override_opt_param_scheduler (True) and scheduler.use_checkpoint_opt_param_scheduler (True)"),
    (["scheduler.start_weight_decay=0.2", "scheduler.end_weight_decay=0.1"], "scheduler.end_weight_decay (0.1)"),
    (["scheduler.start_weight_decay=0.0", "scheduler.end_weight_decay=0.1"],
     "scheduler.start_weight_decay (0.0) must equal scheduler.end_weight_decay (0.1)"),
    (["scheduler=wsd", "scheduler.lr_wsd_decay_iters=290"], "scheduler.lr_wsd_decay_iters (290) must leave the warmup"),
    (["scheduler=wsd", "scheduler.lr_wsd_decay_iters=0"], "scheduler.lr_wsd_decay_iters (0) must be in [1, 300]"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size (10) must be divisible"),
    (["train.train_iters=0"], "train.train_iters (0) must be >= 1"),
    (["train.rampup_batch_size=[4,4]"], "train.rampup_batch_size ([4, 4])"),
    (["train.rampup_batch_size=[8,3,100]"], "must be a non-negative multiple of the increment (3)"),
    (["train.rampup_batch_size=[4,4,100]"], "the start batch (4) must be divisible by train.micro_batch_size (8)"),
    (["checkpoint.save_interval=0"], "checkpoint.save_interval (0)"),
    (["logger.log_interval=0"], "logger.log_interval (0)"),
    (["dist.backend=mpi"], "dist.backend ('mpi')"),
    (["dist.backend=nccl", "dist.device=cpu"], "dist.backend ('nccl') needs dist.device"),
    (["rng.seed=-1"], "rng.seed (-1)"),
    (["model.tensor_model_parallel_size=2", "optimizer=distributed_fused_adam"],
     "model.tensor_model_parallel_size (2) runs on PyTorch's engine, and it and optimizer.use_distributed_optimizer"),
    (["model.tensor_model_parallel_size=4"],
     "model.num_query_groups (2) must be divisible by model.tensor_model_parallel_size (4)"),
    (["dist.use_torch_fsdp2=true", "optimizer=distributed_fused_adam"],
     "dist.use_torch_fsdp2 (True) and optimizer.use_distributed_optimizer (True) both shard the optimizer state"),
    (["dist.use_torch_fsdp2=true", "model.tensor_model_parallel_size=4"],
     "model.num_query_groups (2) must be divisible by model.tensor_model_parallel_size (4)"),
    (["dist.use_torch_fsdp2=true", "model.tensor_model_parallel_size=3"],
     "model.num_attention_heads (4) must be divisible by model.tensor_model_parallel_size (3)"),
    (["dist.use_torch_fsdp2=true", "model.tensor_model_parallel_size=0"], "model.tensor_model_parallel_size (0)"),
    (["dist.data_parallel_replicate_degree=2"], "dist.data_parallel_replicate_degree (2) needs dist.use_torch_fsdp2"),
    (["compile.backend=tvm"], "compile.backend ('tvm')"),
    (["plan.device=h100-80gb"], "plan.device ('h100-80gb') must be one of 'auto', 'A100-40GB'"),
    (["plan.device=H100"], "did you mean 'H100-80GB'?"),
    (["plan.device=H200"], "did you mean 'H200-141GB'?"),
    (["plan.world_size=0"], "plan.world_size (0) must be >= 1 or null"),
    (["plan.mfu=1.5"], "plan.mfu (1.5) must be in (0, 1]"),
    (["plan.device=MI300"], "did you mean 'MI300X'?"),
    (["model.vocab_size=200"], "model.vocab_size (200) must be > the largest token of dataset.kind 'stdlib' (256)"),
    (["downstream_eval.limit=1.5"], "downstream_eval.limit (1.5) must be a number of documents (>= 1) or a "
                                     "fraction in (0, 1)"),  # not rounded down to 1
    (["downstream_eval.limit=0"], "downstream_eval.limit (0) must be > 0 or null"),
]


@pytest.mark.parametrize("overrides,expected", RULES, ids=[" ".join(r[0]) for r in RULES])
def test_rule_fires_and_names_the_field(compose, overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose("train.train_iters=300", *overrides).validate()
    assert expected in str(info.value)


def test_misspelled_key_suggests_the_closest(compose) -> None:
    with pytest.raises(ConfigError, match=r"scheduler.lr_warmup_itres is not a config key; did you mean "
                                          r"scheduler.lr_warmup_iters=10\?"):
        compose("scheduler.lr_warmup_itres=10")


def test_misspelled_group_option_suggests_the_closest(compose) -> None:
    with pytest.raises(ConfigError, match=r"scheduler \('cosin'\) is not a config.*did you mean scheduler=cosine"):
        compose("scheduler=cosin")


def test_unset_weight_decay_bounds_take_optimizer_weight_decay(compose) -> None:
    schedule = compose("optimizer.weight_decay=0.05").validate().schedule
    assert (schedule.start_wd, schedule.end_wd) == (0.05, 0.05)
    schedule = compose("scheduler.start_weight_decay=0.0", "scheduler.end_weight_decay=0.2",
                       "scheduler.weight_decay_incr_style=linear").validate().schedule
    assert (schedule.start_wd, schedule.end_wd, schedule.wd_incr_style) == (0.0, 0.2, "linear")


def test_world_size_rule_names_the_fields(compose) -> None:
    train = compose("train.global_batch_size=16", "train.micro_batch_size=4").train
    assert check_world(train, 2) == 2
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(16\) must be divisible by "
                                          r"train.micro_batch_size \(4\) × data-parallel size \(3\)"):
        check_world(train, 3)


def test_a_misspelled_group_name_composes_twice_and_suggests_the_corrected_override(monkeypatch) -> None:
    """``schedular=wsd`` used to explain itself by composing again with the same bad override, recursively
    (317 compositions, 22-26 s): now one failed composition and one for the hint."""
    import hydra  # compose.py imports hydra.compose when it composes, so the patch is what it calls

    from anneal.config.compose import load

    calls = {"n": 0}
    real = hydra.compose

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(hydra, "compose", counted)
    with pytest.raises(ConfigError, match=r"^schedular is not a config key; did you mean scheduler=wsd\?$"):
        load(["schedular=wsd", "dry_run=true"])
    assert calls["n"] <= 2, calls


def test_tensor_parallel_alone_runs_on_pytorchs_engine_with_a_note(compose) -> None:
    cfg = compose("model.tensor_model_parallel_size=2")
    notes = cfg.validate().notes
    assert cfg.torch_engine and not cfg.dist.use_torch_fsdp2  # the config keeps what the user wrote
    assert [n for n in notes if n.startswith("model.tensor_model_parallel_size=2 runs on PyTorch's engine")]
    assert not compose().torch_engine and not any("engine" in n for n in compose().validate().notes)
