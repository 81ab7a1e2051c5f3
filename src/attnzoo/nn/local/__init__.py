"""Modules of the local family (catalog L, M7): neighborhood attention layers, varying windows, FIT."""

from .fit import FITBlock
from .neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .varying_window import VaryingWindowAttention

__all__ = [
    "FITBlock",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "VaryingWindowAttention",
]
