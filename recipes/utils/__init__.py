"""Small builders that recipes are made of (Megatron-Bridge's ``recipes/utils``)."""

from anneal.recipes.utils.optimizer_utils import (
    distributed_fused_adam_with_cosine_annealing,
    distributed_fused_adam_with_wsd,
)

__all__ = ["distributed_fused_adam_with_cosine_annealing", "distributed_fused_adam_with_wsd"]
