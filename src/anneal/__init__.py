"""anneal: a Hydra-driven LLM pretraining launcher with Megatron's exact LR/WD schedules.

Importing anneal imports nothing heavy (no torch, no Hydra) and does nothing else.
"""

__version__ = "0.1.0"
