"""The Qwen3 decoder (``anneal.model.qwen3``, imports torch) and its analytic counts (no torch).

Importing this package does not import torch; ``from anneal.model.qwen3 import build_model`` does.
"""

from __future__ import annotations

from anneal.model.flops import flops_per_token, num_parameters

__all__ = ["flops_per_token", "num_parameters"]
