"""Checkpoints: torch.distributed.checkpoint for tensors, JSON for everything else, atomic and locked."""
