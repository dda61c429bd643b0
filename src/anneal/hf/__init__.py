"""Hugging Face ``Qwen3ForCausalLM`` weights in and out of anneal.

``anneal.hf.mapping`` (no torch): names and config fields, one correspondence for both ways.
``anneal.hf.importer``: ``checkpoint.pretrained_checkpoint`` (``check_pretrained``, ``load_pretrained``).
``anneal.hf.exporter``: ``export_checkpoint``; ``anneal.hf.cli``: the ``anneal-export-hf`` command.
Importing this package imports nothing else.
"""
