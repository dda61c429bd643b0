"""Training data: Megatron indexed datasets, tokenizers, fixed-window GPT datasets, weighted blends and the
microbatch loader.

``anneal.data.datasets.build_data`` is the one entry point: the training samples, the validation sets and the
end-of-document id of a ``dataset.`` section. Under it, one way down: ``builtin`` (stdlib, mock) and
``sources`` (indexed; ``blend`` for weighted blends) build on ``windows``; ``spec`` says what the section's
values mean and ``metadata`` reads the prefixes' sidecars (both pure Python, which ``anneal.config.dataset``
validates with). No module here imports ``anneal.config``.

Import the submodules directly (``anneal.data.datasets``, ``anneal.data.loader``, ...); this package
imports nothing itself, so ``import anneal.data`` stays free of numpy and torch.
"""
