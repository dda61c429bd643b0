"""Typed configuration: one dataclass per section, validated before anything starts.

Pure Python: importing this package imports neither torch nor Hydra.
"""
