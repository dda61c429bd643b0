"""Qwen3 recipes: Python functions returning a ``ConfigContainer``, and ``recipe=<name>`` in Hydra.

``conf/recipe/<name>.yaml`` is generated from these functions by ``scripts/export_recipes.py``.
"""

from anneal.recipes.qwen.qwen3 import qwen3_0p6b, qwen3_1p7b, qwen3_4b, qwen3_8b
from anneal.recipes.qwen.tiny import tiny

__all__ = ["qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b", "tiny"]
