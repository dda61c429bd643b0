"""Activation recompute with Megatron's semantics (``recompute_granularity``, ``_method``, ``_num_layers``).

- ``full`` + ``uniform``: the layers are split into consecutive units of ``recompute_num_layers``
  (the last may be shorter); each unit keeps only its input and recomputes its forward in the
  backward pass.
- ``full`` + ``block``: the first ``recompute_num_layers`` layers are recomputed one by one; the
  others keep their activations.
- ``selective``: only the attention core (``scaled_dot_product_attention``, or flex_attention under a
  document mask) is recomputed, the part whose activations grow with ``seq²`` in Megatron's accounting.
  A document mask is made once per forward outside the recomputed functions and passed in: the
  checkpoint keeps a reference to it, never a copy.

Recompute uses ``torch.utils.checkpoint`` with ``use_reentrant=False`` and only while gradients
are being recorded; the recomputed forward is the same computation, so gradients are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def recompute_units(num_layers: int, method: str | None, recompute_num_layers: int | None
                    ) -> tuple[tuple[int, int, bool], ...]:
    """``(start, stop, recomputed)`` layer ranges in order, covering ``range(num_layers)``."""
    if method == "uniform":
        step = recompute_num_layers or num_layers
        return tuple((i, min(i + step, num_layers), True) for i in range(0, num_layers, step))
    if method == "block":
        n = recompute_num_layers or 0
        return tuple((i, i + 1, i < n) for i in range(num_layers))
    return ((0, num_layers, False),) if num_layers else ()


def maybe_recompute(recompute: bool, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, through a non-reentrant checkpoint when ``recompute`` and grads are recorded."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)
