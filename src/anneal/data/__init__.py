"""Training data: Megatron indexed datasets, tokenizers, fixed-window GPT datasets, weighted blends
(``blend``, ``sources``, ``mix``) and the microbatch loader.

Import the submodules directly (``anneal.data.datasets``, ``anneal.data.loader``, ...); this package
imports nothing itself, so ``import anneal.data`` stays free of numpy and torch.
"""
