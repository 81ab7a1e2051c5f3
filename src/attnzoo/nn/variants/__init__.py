"""Modules of the score-level variants (catalog V): layers around the softmax replacements."""

from .differential import DifferentialAttention

__all__ = ["DifferentialAttention"]
