"""The VWA layer: DOPE's learnable re-scaling and the projections around :func:`varying_window_attention`.

Yan, Wu and Zhang, "Multi-Scale Representations by Varying Window Attention for Semantic
Segmentation" (ICLR 2024), Sec. 3; official code ``vw_head.py`` of github.com/yan-hao-tian/vw.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..._validate import per_axis
from ...errors import ParameterError, ShapeError
from ...functional.local.varying_window import varying_window_attention
from .._registry import ModuleExample, register_module

__all__ = ["VaryingWindowAttention"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@register_module(
    "L8",
    paper="Multi-Scale Representations by Varying Window Attention for Semantic Segmentation (VWA; Yan et al., ICLR 2024)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=256, num_heads=8, window_size=8, ratio=2), inputs=[(1, 64, 64, 256)], test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, window_size=4),
    ),
)
class VaryingWindowAttention(nn.Module):
    """Varying window attention over (B, *spatial, C) feature maps (catalog L8; VWA).

    Queries are projected from x; keys and values from x re-scaled by DOPE, the paper's
    densely overlapping patch embedding, applied once to the whole map (pre-scaling):

        y = Conv_{R x R, stride 1}(x)                 C -> C / R^d channels, padded to keep the size
        z_p = concat_{r in [0, R)^d} y_{p + r}        the R-block starting at p, back to C channels
        k = W_k z,  v = W_v z

    so z at the first token of a block summarises that block. :func:`varying_window_attention`
    with ``rescale="prescaled"`` then reads each query window's context (R P per axis, centred,
    shifted inward as copy-shift padding fills it) at the first token of every R-block: P^d
    tokens, as the official code's space-to-depth of each context window makes them. The
    output is ``W_o`` of the attention.

    Cost: the DOPE convolution (N C^2 multiply-adds, one more projection), the projections and
    window attention with windows of P: O(N (C^2 + P^d C)). z is computed at every position (N
    tokens of C channels), as many tokens as the official code projects per window (N in all).

    Departures from the official ``VWHead``: DOPE is a plain convolution (its ``ConvModule``
    adds BatchNorm and ReLU), the projections are linear layers on channels-last tokens (its 1x1
    convolutions), and one layer has one ratio (VWFormer runs R = 2, 4, 8 side by side and fuses
    them: a decoder, not this attention).

    Args:
        dim: channels C, divisible by ``num_heads`` and by prod(ratio).
        num_heads: attention heads. window_size: query window P (int or one per axis).
        ratio: context enlarging ratio R (int or one per axis). spatial_dims: 1, 2 (the paper) or 3.
        qkv_bias, proj_bias, dope_bias: biases of the projections and of the DOPE convolution.
        backend: passed to :func:`varying_window_attention`.

    Example::

        >>> layer = VaryingWindowAttention(dim=64, num_heads=4, window_size=8, ratio=4)
        >>> y = layer(torch.randn(2, 64, 64, 64))  # (B, height, width, C)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Any,
        ratio: Any,
        spatial_dims: int = 2,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        dope_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        if spatial_dims not in _CONV:
            raise ParameterError(f"{name}: spatial_dims: expected 1, 2 or 3, got {spatial_dims!r}", argument="spatial_dims")
        if num_heads < 1 or dim % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")
        windows, ratios = per_axis(window_size, spatial_dims, int), per_axis(ratio, spatial_dims, int)
        if windows is None or min(windows) < 1:
            raise ParameterError(f"{name}: window_size: expected a positive int or a tuple of {spatial_dims}, got {window_size!r}", argument="window_size")
        if ratios is None or min(ratios) < 1 or dim % math.prod(ratios):
            raise ParameterError(
                f"{name}: ratio: expected a positive int or a tuple of {spatial_dims} whose product divides dim={dim} "
                f"(DOPE embeds into dim / prod(ratio) channels), got {ratio!r}",
                argument="ratio",
            )
        self.dim, self.num_heads, self.spatial_dims = dim, num_heads, spatial_dims
        self.window_size, self.ratio, self.backend = windows, ratios, backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.dope = _CONV[spatial_dims](dim, dim // math.prod(ratios), kernel_size=ratios, bias=dope_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` (B, *spatial, C) -> (B, *spatial, C).

        ``key_padding_mask`` (B, N) or (B, *spatial) bool, True = a padded token (2D/3D; 1D is
        refused, see :func:`varying_window_attention`): padded tokens enter DOPE as zeros, as
        the map's border padding does, and a context token whose first token is padded is masked.
        """
        if x.dim() != 2 + self.spatial_dims or x.shape[-1] != self.dim:
            axes = ", ".join(f"S{i}" for i in range(self.spatial_dims))
            raise ShapeError(f"{type(self).__name__}: x: expected (B, {axes}, C={self.dim}), got shape {tuple(x.shape)}", argument="x")
        q = self._heads(self.q(x))
        context = x
        mask_fits = isinstance(key_padding_mask, Tensor) and key_padding_mask.dtype == torch.bool and key_padding_mask.numel() == x[..., 0].numel()
        if mask_fits:  # a mask that does not fit goes on as it is: the functional form names it in its error
            context = x.masked_fill(key_padding_mask.reshape(x.shape[:-1]).unsqueeze(-1), 0.0)
        k, v = (self._heads(t) for t in self.kv(self.prescaled_context(context)).chunk(2, dim=-1))
        out = varying_window_attention(
            q, k, v, window_size=self.window_size, ratio=self.ratio, rescale="prescaled", key_padding_mask=key_padding_mask, backend=self.backend
        )
        return self.proj(out.movedim(1, -2).flatten(-2))

    def prescaled_context(self, x: Tensor) -> Tensor:
        """(B, *spatial, C) -> (B, *spatial, C): z_p, DOPE's output over the R-block starting at p."""
        spatial = x.shape[1:-1]
        y = self.dope(_pad_axes(x.movedim(-1, 1), [((r - 1) // 2, r // 2) for r in self.ratio]))  # the official padding
        y = _pad_axes(y, [(0, r - 1) for r in self.ratio])  # blocks near the end reach past it: zeros
        blocks = [
            y[(slice(None), slice(None)) + tuple(slice(o, o + size) for o, size in zip(offset, spatial))]
            for offset in itertools.product(*(range(r) for r in self.ratio))
        ]
        return torch.cat(blocks, dim=1).movedim(1, -1)  # channels ordered (offset, DOPE channel)

    def _heads(self, t: Tensor) -> Tensor:
        """(B, *spatial, C) -> (B, heads, *spatial, C / heads)."""
        return t.unflatten(-1, (self.num_heads, -1)).movedim(-2, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, ratio={self.ratio}"


def _pad_axes(x: Tensor, pads: list[tuple[int, int]]) -> Tensor:
    """Zero-pad the spatial axes of channels-first (B, C, *spatial) by (before, after) each."""
    flat = [p for before_after in reversed(pads) for p in before_after]
    return torch.nn.functional.pad(x, flat)
