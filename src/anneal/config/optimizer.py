"""``optimizer.``: Megatron-Core's ``OptimizerConfig`` fields and defaults, plus anneal's rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from anneal.errors import ConfigError, check_choice

OPTIMIZERS = ("adam", "sgd")
DISTRIBUTED_BACKENDS = ("auto", "native", "apex")


@dataclass
class ParamGroupRule:
    """Layer-wise multipliers for every parameter whose name matches ``pattern`` (``fnmatch``).

    ``lr_mult`` scales the group's ``max_lr`` and ``min_lr``; ``wd_mult`` multiplies its weight
    decay. The first matching rule wins. A rule that matches no parameter is an error.
    """

    pattern: str = "*"  # fnmatch pattern over parameter names, e.g. 'embedding.*'
    lr_mult: float = 1.0  # multiplies the group's max_lr and min_lr
    wd_mult: float = 1.0  # multiplies the group's weight decay


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"  # one of OPTIMIZERS: adam (decoupled weight decay, AdamW) or sgd
    lr: float | None = None  # peak learning rate (the schedule's max_lr)
    min_lr: float | None = None  # learning rate at the end of the decay; None means 0.0
    decoupled_lr: float | None = None  # embeddings and output layer, when set
    decoupled_min_lr: float | None = None  # min_lr of the decoupled_lr parameters
    weight_decay: float = 0.01  # decoupled weight decay; the scheduler's start/end default to it
    apply_wd_to_qk_layernorm: bool = False  # also decay the q/k RMSNorm weights (never other norms)
    adam_beta1: float = 0.9  # Adam's first-moment decay, in [0, 1)
    adam_beta2: float = 0.999  # Adam's second-moment decay, in [0, 1)
    adam_eps: float = 1e-08  # Adam's denominator epsilon, > 0
    sgd_momentum: float = 0.9  # SGD momentum, in [0, 1); 0 keeps no momentum buffer
    clip_grad: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    use_distributed_optimizer: bool = False  # shard the optimizer state over data-parallel ranks (ZeRO-1)
    overlap_grad_reduce: bool = False  # overlap the gradient reduction with the backward pass
    overlap_param_gather: bool = False  # overlap the parameter all-gather with the next forward
    bf16: bool = False  # bf16 mixed precision: bf16 weights, fp32 main grads and master weights
    fp16: bool = False  # fp16 mixed precision with loss scaling
    # bf16/fp16: accumulate microbatch gradients in an fp32 main-grad buffer and reduce them over data
    # parallel in fp32, each rank's divided by the data-parallel size first (Megatron-Bridge's
    # ddp.grad_reduce_in_fp32, forced by Megatron-LM); false keeps them, and their sum, in bf16/fp16
    grad_reduce_in_fp32: bool = True
    # CUDA: fp32 matmuls run on TF32 tensor cores (torch.set_float32_matmul_precision("high"); about 7x
    # faster on an H100, 10 mantissa bits per product, fp32 accumulation); false: full fp32 ("highest").
    # HF Trainer's name (neither Megatron-Bridge nor torchtitan has a field). No effect on CPU.
    tf32: bool = True
    loss_scale: float | None = None  # static loss scale; None means dynamic (fp16 only)
    initial_loss_scale: float = 4294967296.0  # 2**32
    min_loss_scale: float = 1.0  # the dynamic loss scale never drops below this
    loss_scale_window: float = 1000  # iterations without overflow before the dynamic scale doubles
    hysteresis: int = 2  # overflows tolerated before the dynamic scale halves
    # anneal's additions
    distributed_backend: str = "auto"  # auto: apex when importable with CUDA, else native
    # Layer-wise multipliers: [{pattern: 'embedding.*', lr_mult: 0.1}, ...]; the first match wins.
    param_group_rules: list[ParamGroupRule] = field(default_factory=list)

    def validate(self) -> None:
        check_choice("optimizer.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("optimizer.distributed_backend", self.distributed_backend, DISTRIBUTED_BACKENDS)
        if self.lr is None:
            raise ConfigError("optimizer.lr (None) must be set")
        _non_negative("optimizer.lr", self.lr)
        _non_negative("optimizer.min_lr", self.min_lr)
        _non_negative("optimizer.weight_decay", self.weight_decay)
        _non_negative("optimizer.clip_grad", self.clip_grad)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr ({self.min_lr}) must be <= optimizer.lr ({self.lr})")
        if self.decoupled_lr is not None and (self.decoupled_min_lr or 0.0) > self.decoupled_lr:
            raise ConfigError(
                f"optimizer.decoupled_min_lr ({self.decoupled_min_lr}) must be <= "
                f"optimizer.decoupled_lr ({self.decoupled_lr})"
            )
        if self.bf16 and self.fp16:
            raise ConfigError("optimizer.bf16 (True) and optimizer.fp16 (True) are mutually exclusive")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optimizer.{name} ({value}) must be in [0, 1)")
        if not self.adam_eps > 0:
            raise ConfigError(f"optimizer.adam_eps ({self.adam_eps}) must be > 0")
        if self.loss_scale is not None and not self.loss_scale > 0:
            raise ConfigError(f"optimizer.loss_scale ({self.loss_scale}) must be > 0 or null (dynamic)")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale:
            raise ConfigError(
                f"optimizer.min_loss_scale ({self.min_loss_scale}) must be in (0, optimizer.initial_loss_scale "
                f"({self.initial_loss_scale})]"
            )
        if self.hysteresis < 1 or self.loss_scale_window < 1:
            raise ConfigError(
                f"optimizer.hysteresis ({self.hysteresis}) and optimizer.loss_scale_window "
                f"({self.loss_scale_window}) must be >= 1"
            )
        for i, rule in enumerate(self.param_group_rules):
            _non_negative(f"optimizer.param_group_rules[{i}].lr_mult", rule.lr_mult)
            _non_negative(f"optimizer.param_group_rules[{i}].wd_mult", rule.wd_mult)


def _non_negative(path: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{path} ({value}) must be >= 0")
