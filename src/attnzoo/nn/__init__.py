"""Modules: learnable state (projections, feature maps, pooling) around the functional forms."""

from .agent import AgentAttention
from .differential import DifferentialAttention
from .based import BaseConv, BasedMixer, SlidingWindowAttention, TaylorLinearAttention
from .clustering import RoutingAttention, TokenCentreAttention
from .fit import FITBlock
from .inline import InLineAttention
from .kernelized_rpe import KernelizedRPEAttention
from .l2vit import L2ViTAttention, LocalConcentrationModule
from .linfusion import LinFusionAttention
from .heads import AttentiveProbe, PointerHead
from .mha import MultiheadAttention, ShortConvolution
from .mossformer import MossFormerAttention
from .nsa import BlockCompressor, NativeSparseAttention
from .routing import BiLevelRoutingAttention
from .sparsifiner import Sparsifiner, sparsifiner_reconstruction_loss
from .seer import SeerAttentionGate, seer_distillation_loss, seer_distillation_target
from .token_pruning import TokenKeepFuse
from .transnormer import TransNormerAttention
from .linear import HedgehogFeatureMap, LinearAttention, RandomFeatureMap, Retention
from .local import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .varying_window import VaryingWindowAttention

__all__ = [
    "DifferentialAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "VaryingWindowAttention",
    "HedgehogFeatureMap",
    "RandomFeatureMap",
    "LinearAttention",
    "Retention",
    "AgentAttention",
    "TaylorLinearAttention",
    "SlidingWindowAttention",
    "BaseConv",
    "BasedMixer",
    "TransNormerAttention",
    "LinFusionAttention",
    "MossFormerAttention",
    "MultiheadAttention",
    "InLineAttention",
    "KernelizedRPEAttention",
    "L2ViTAttention",
    "LocalConcentrationModule",
    "ShortConvolution",
    "AttentiveProbe",
    "PointerHead",
    "BiLevelRoutingAttention",
    "RoutingAttention",
    "TokenCentreAttention",
    "TokenKeepFuse",
    "SeerAttentionGate",
    "NativeSparseAttention",
    "BlockCompressor",
    "seer_distillation_target",
    "seer_distillation_loss",
    "FITBlock",
    "Sparsifiner",
    "sparsifiner_reconstruction_loss",
]
