"""Modules over the local family: a projection, the functional call, an output projection.

Like timm's ``Attention``, a module holds only the learnable state (the qkv and output
projections) and calls the functional form, whose ``backend=`` it passes through; tokens are
channels-last, ``(B, *spatial, C)``, the layout of ViT token mixers.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ..errors import ParameterError, ShapeError
from ..functional.local import neighborhood_attention

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    spatial_dims = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: Any,
        dilation: Any = 1,
        causal: Any = False,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ParameterError(f"{type(self).__name__}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")
        self.dim, self.num_heads = dim, num_heads
        self.kernel_size, self.dilation, self.causal, self.backend = kernel_size, dilation, causal, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, *spatial, C) -> (B, *spatial, C)."""
        if x.dim() != 2 + self.spatial_dims or x.shape[-1] != self.dim:
            axes = ", ".join(f"S{i}" for i in range(self.spatial_dims))
            raise ShapeError(
                f"{type(self).__name__}: x: expected (B, {axes}, C={self.dim}), got shape {tuple(x.shape)}", argument="x"
            )
        b, spatial = x.shape[0], x.shape[1:-1]
        head_dim = self.dim // self.num_heads
        qkv = self.qkv(x).reshape(b, *spatial, 3, self.num_heads, head_dim)
        qkv = qkv.movedim(-3, 0).movedim(-2, 2)  # (3, B, heads, *spatial, head_dim)
        out = neighborhood_attention(
            qkv[0], qkv[1], qkv[2], kernel_size=self.kernel_size, dilation=self.dilation, causal=self.causal, backend=self.backend
        )
        return self.proj(out.movedim(1, -2).reshape(b, *spatial, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, causal={self.causal}"


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """Neighborhood attention over (B, L, C) tokens (catalog M7; NAT/DiNAT), see :func:`neighborhood_attention`.

    Example::

        >>> layer = NeighborhoodAttention1D(dim=64, num_heads=4, kernel_size=7, dilation=2)
        >>> y = layer(torch.randn(2, 128, 64))
    """

    spatial_dims = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """Neighborhood attention over (B, H, W, C) feature maps (catalog M7; NAT/DiNAT).

    Example::

        >>> layer = NeighborhoodAttention2D(dim=64, num_heads=4, kernel_size=7)
        >>> y = layer(torch.randn(2, 32, 32, 64))
    """

    spatial_dims = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """Neighborhood attention over (B, T, H, W, C) volumes (catalog M7)."""

    spatial_dims = 3
