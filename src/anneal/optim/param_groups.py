"""Parameter groups with Megatron-Core's rules, plus anneal's layer-wise multiplier rules.

Every group carries what ``OptimizerParamScheduler`` reads: ``max_lr`` and ``min_lr`` (already
scaled by the matching rule's ``lr_mult``, and replaced by ``decoupled_lr`` /
``decoupled_min_lr`` for embedding and output-layer parameters) and ``wd_mult``. Unlike
Megatron, ``lr_mult`` is not left in the group for the scheduler to apply: anneal's scheduler
writes ``lr = lr_at(max_lr, min_lr)`` as is, so the multiplier is folded into the bounds.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from anneal.config.optimizer import OptimizerConfig, ParamGroupRule
from anneal.errors import ConfigError, closest

# Module names whose weights are the input embedding or the output layer (Megatron's
# ``is_embedding_or_output_parameter``; a parameter attribute of that name also counts).
EMBEDDING_OR_OUTPUT_MODULES = ("embedding", "output_layer")
QK_NORM_MODULES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def is_embedding_or_output(name: str, param: torch.Tensor) -> bool:
    if getattr(param, "is_embedding_or_output_parameter", False):
        return True
    return name.split(".")[0] in EMBEDDING_OR_OUTPUT_MODULES


def no_weight_decay(name: str, param: torch.Tensor, apply_wd_to_qk_layernorm: bool) -> bool:
    """Megatron's rule: biases and 1-D parameters (norm weights) get no weight decay."""
    if apply_wd_to_qk_layernorm and any(part in QK_NORM_MODULES for part in name.split(".")):
        return False
    return name.endswith(".bias") or param.dim() == 1


def get_param_groups(
    model: torch.nn.Module, config: OptimizerConfig, *, fallback_min_lr: float = 0.0
) -> list[dict[str, Any]]:
    """Group the trainable parameters of ``model`` by (wd_mult, max_lr, min_lr, decoupled).

    ``fallback_min_lr`` stands in for ``config.min_lr`` when that is None. Groups come in order of their first parameter in ``model.named_parameters()``; each holds
    ``params``, ``param_names``, ``wd_mult``, ``max_lr``, ``min_lr`` and ``is_decoupled_lr``.
    Raises ConfigError if a rule in ``config.param_group_rules`` matches no parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rules = list(config.param_group_rules)
    used = [False] * len(rules)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, param in named:
        index = _first_match(name, rules)
        rule = rules[index] if index is not None else ParamGroupRule()
        if index is not None:
            used[index] = True
        key = _group_key(name, param, rule, config, fallback_min_lr)
        group = groups.setdefault(key, _new_group(key))
        group["params"].append(param)
        group["param_names"].append(name)
    _check_rules_used(rules, used, [n for n, _ in named])
    return list(groups.values())


def _first_match(name: str, rules: list[ParamGroupRule]) -> int | None:
    return next((i for i, rule in enumerate(rules) if fnmatch.fnmatchcase(name, rule.pattern)), None)


def _group_key(
    name: str, param: torch.Tensor, rule: ParamGroupRule, config: OptimizerConfig, fallback_min_lr: float
) -> tuple:
    wd_mult = 0.0 if no_weight_decay(name, param, config.apply_wd_to_qk_layernorm) else 1.0
    decoupled = config.decoupled_lr is not None and is_embedding_or_output(name, param)
    if decoupled:
        max_lr = config.decoupled_lr
        min_lr = config.decoupled_min_lr if config.decoupled_min_lr is not None else config.min_lr
    else:
        max_lr, min_lr = config.lr, config.min_lr
    min_lr = fallback_min_lr if min_lr is None else min_lr
    return (wd_mult * rule.wd_mult, max_lr * rule.lr_mult, min_lr * rule.lr_mult, decoupled)


def _new_group(key: tuple) -> dict[str, Any]:
    wd_mult, max_lr, min_lr, decoupled = key
    return {
        "params": [],
        "param_names": [],
        "wd_mult": wd_mult,
        "max_lr": max_lr,
        "min_lr": min_lr,
        "is_decoupled_lr": decoupled,
    }


def _check_rules_used(rules: list[ParamGroupRule], used: list[bool], names: list[str]) -> None:
    for i, (rule, hit) in enumerate(zip(rules, used)):
        if hit:
            continue
        shadowed = any(fnmatch.fnmatchcase(n, rule.pattern) for n in names)
        why = (
            "every parameter it matches is taken by an earlier rule"
            if shadowed
            else "it matches no parameter"
        )
        hint = closest(rule.pattern, names)
        suggestion = f"; did you mean {hint!r}?" if hint else f"; parameter names look like {names[:3]}"
        raise ConfigError(
            f"optimizer.param_group_rules[{i}].pattern ({rule.pattern!r}) is unused: {why} "
            f"(fnmatch against the full dotted name){suggestion}"
        )


def with_defaults(group: dict[str, Any], weight_decay: float) -> dict[str, Any]:
    """A copy of ``group`` with ``lr`` and ``weight_decay`` present before the scheduler's first write."""
    out = dict(group)
    out.setdefault("lr", group.get("max_lr", 0.0))
    out.setdefault("weight_decay", weight_decay * group.get("wd_mult", 1.0))
    return out
