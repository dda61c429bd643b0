"""Recipes: plain functions returning a ``ConfigContainer`` (Megatron-Bridge style).

``RECIPES`` maps each name to its function; ``recipe=<name>`` on the command line selects the
overlay ``conf/recipe/<name>.yaml`` that ``scripts/export_recipes.py`` generates from it.
"""

from anneal.recipes.qwen import qwen3_0p6b, qwen3_1p7b, qwen3_4b, qwen3_8b, tiny

RECIPES = {fn.__name__: fn for fn in (qwen3_0p6b, qwen3_1p7b, qwen3_4b, qwen3_8b, tiny)}

__all__ = ["RECIPES"]
