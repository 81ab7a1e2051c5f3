"""Modules of the linear family (catalog F): feature maps, linear-attention and retention layers,
and the papers' layers built on them (Based, TransNormer, LinFusion, MossFormer, Agent, InLine, L2ViT)."""

from .agent import AgentAttention
from .attention import HedgehogFeatureMap, LinearAttention, RandomFeatureMap, Retention
from .based import BaseConv, BasedMixer, SlidingWindowAttention, TaylorLinearAttention
from .inline import InLineAttention
from .kernelized_rpe import KernelizedRPEAttention
from .l2vit import L2ViTAttention, LocalConcentrationModule
from .linfusion import LinFusionAttention
from .mossformer import MossFormerAttention
from .titans import NeuralMemory, TitansMAC, TitansMAG
from .transnormer import TransNormerAttention

__all__ = [
    "AgentAttention",
    "HedgehogFeatureMap",
    "LinearAttention",
    "RandomFeatureMap",
    "Retention",
    "BaseConv",
    "BasedMixer",
    "SlidingWindowAttention",
    "TaylorLinearAttention",
    "InLineAttention",
    "KernelizedRPEAttention",
    "L2ViTAttention",
    "LocalConcentrationModule",
    "LinFusionAttention",
    "MossFormerAttention",
    "NeuralMemory",
    "TitansMAC",
    "TitansMAG",
    "TransNormerAttention",
]
