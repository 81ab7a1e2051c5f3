"""Modules of the score-level variants (catalog V): layers around the softmax replacements."""

from .differential import DifferentialAttention
from .diffqkv import DiffQKVAttention
from .gaussian import GaussianAdaptiveAttention
from .graph import GINAttention, TokenAwareAttention, TokenAwarePooling, attention_diversification_loss
from .relative import RelativeConvAttention, UniversalRPEAttention
from .stabilizers import QKNormAttention, SigmaReparamLinear

__all__ = ["DifferentialAttention", "QKNormAttention", "SigmaReparamLinear", "DiffQKVAttention", "GaussianAdaptiveAttention", "GINAttention", "TokenAwareAttention", "TokenAwarePooling", "attention_diversification_loss", "RelativeConvAttention", "UniversalRPEAttention"]
