"""Command-line entry points (``anneal-pretrain``; ``scripts/`` holds thin wrappers)."""
