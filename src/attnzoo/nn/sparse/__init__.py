"""Modules of the content-sparse family (catalog S): the learned routers, gates, predictors and
compressors around the functional sparse mechanisms."""

from .clustering import RoutingAttention, TokenCentreAttention
from .nsa import BlockCompressor, NativeSparseAttention
from .routing import BiLevelRoutingAttention
from .seer import SeerAttentionGate, seer_distillation_loss, seer_distillation_target
from .sparsifiner import Sparsifiner, sparsifiner_reconstruction_loss
from .token_pruning import TokenKeepFuse

__all__ = [
    "RoutingAttention",
    "TokenCentreAttention",
    "BlockCompressor",
    "NativeSparseAttention",
    "BiLevelRoutingAttention",
    "SeerAttentionGate",
    "seer_distillation_loss",
    "seer_distillation_target",
    "Sparsifiner",
    "sparsifiner_reconstruction_loss",
    "TokenKeepFuse",
]
