"""Score-level variants of softmax attention (catalog V1-V10): other normalizations, activations,
temperatures and stabilizers of the scores, each against its paper's formula."""

from .differential import differential_attention
from .elementwise import relu_attention, sigmoid_attention

__all__ = ["differential_attention", "relu_attention", "sigmoid_attention"]
