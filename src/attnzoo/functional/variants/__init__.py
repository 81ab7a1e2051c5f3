"""Score-level variants of softmax attention (catalog V1-V10): other normalizations, activations,
temperatures and stabilizers of the scores, each against its paper's formula."""

from .differential import differential_attention
from .elementwise import relu_attention, sigmoid_attention
from .reversed import reversed_attention
from .selective import selective_attention
from .softcap import softcap_attention
from .softplus import softplus_attention
from .temperature import length_temperature_attention, position_temperature_attention

__all__ = ["differential_attention", "length_temperature_attention", "position_temperature_attention", "relu_attention", "reversed_attention", "selective_attention", "sigmoid_attention", "softcap_attention", "softplus_attention"]
