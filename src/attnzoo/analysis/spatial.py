"""Spatial attention distance per head (catalog A4; Dosovitskiy et al. 2021, ViT, Fig. 7)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ParameterError
from ._checks import as_float64, attention_maps, heads_first

__all__ = ["attention_distance"]


def attention_distance(maps: Tensor, grid: Sequence[int], *, prefix: int = 0, patch_size: float = 1.0) -> Tensor:
    """Mean attention distance per head: ``mean_i sum_j p_ij ||pos_i - pos_j|| * patch_size``.

    ViT's Fig. 7 (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"): the distance in
    image space across which a head integrates, the analogue of a CNN's receptive field. Tokens
    are laid out row-major on ``grid``; the first ``prefix`` tokens (a class token, registers)
    have no position and are dropped from rows and columns, and each row is renormalized over
    the positioned keys (a row with no mass left is skipped).

    Args:
        maps: (..., H, N, N), N = prefix + prod(grid); leading axes are averaged.
        grid: the token grid, e.g. (14, 14), or (N,) for a sequence (distance in tokens).
        patch_size: pixels per token (ViT-B/16: 16).

    Returns:
        (H,) float64. Cost: O(H N^2).
    """
    p = heads_first(as_float64(attention_maps(maps, "maps", square=True)))
    sizes = tuple(grid) if isinstance(grid, Sequence) else ()
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ParameterError(f"grid: expected a sequence of positive ints, got {grid!r}", argument="grid")
    n = 1
    for s in sizes:
        n *= s
    if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0 or prefix + n != p.shape[-1]:
        raise ParameterError(f"prefix: prefix + prod(grid) must be N = {p.shape[-1]}, got {prefix} + {n}", argument="prefix")
    p = p[..., prefix:, prefix:]
    mass = p.sum(-1, keepdim=True)
    p = p / torch.where(mass > 0, mass, torch.ones_like(mass))
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=p.device) for s in sizes], indexing="ij")
    pos = torch.stack([a.reshape(-1) for a in axes], dim=-1)  # (n, d)
    dist = torch.cdist(pos, pos) * float(patch_size)
    per_query = (p * dist).sum(-1)  # (M, H, n)
    live = (mass.squeeze(-1) > 0).to(p.dtype)
    return (per_query * live).sum((0, 2)) / live.sum((0, 2)).clamp_min(1.0)
