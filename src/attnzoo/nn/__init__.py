"""Modules: learnable state (projections) around the functional forms."""

from .local import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .varying_window import VaryingWindowAttention
from .linear import HedgehogFeatureMap as HedgehogFeatureMap, LinearAttention as LinearAttention, RandomFeatureMap as RandomFeatureMap, Retention as Retention

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D", "VaryingWindowAttention"]
