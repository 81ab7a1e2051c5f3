"""Modules over the local family: a projection, the functional call, an output projection.

Like timm's ``Attention``, a module holds only the learnable state (the qkv and output
projections, and NAT's relative positional bias table when asked for) and calls the functional
form, whose ``backend=`` it passes through; tokens are channels-last, ``(B, *spatial, C)``, the
layout of ViT token mixers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..._validate import per_axis
from ...errors import ParameterError, ShapeError
from ...functional.local import neighborhood_attention
from .._registry import ModuleExample, register_module

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    """qkv projection, :func:`~attnzoo.functional.neighborhood_attention` per head, output projection.

    ``kernel_size``, ``dilation``, ``stride`` and ``causal`` are the functional form's (int or
    one per axis), checked against the input at each call. ``rpb=True`` adds NAT's learnable
    relative positional bias, a ``(num_heads, 2k_1 - 1, ..., 2k_n - 1)`` parameter initialised
    from a truncated normal with std 0.02 (as in NAT/DiNAT). ``backend`` is passed through.
    """

    spatial_dims = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: Any,
        dilation: Any = 1,
        stride: Any = 1,
        causal: Any = False,
        rpb: bool = False,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        if num_heads < 1 or dim % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")
        self.dim, self.num_heads = dim, num_heads
        self.kernel_size, self.dilation, self.stride, self.causal, self.backend = kernel_size, dilation, stride, causal, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        if rpb:
            kernel = per_axis(kernel_size, self.spatial_dims, int)
            if kernel is None or min(kernel) < 1:  # the table's shape needs it now; the rest is checked per call
                expected = f"a positive int or a tuple of {self.spatial_dims}"
                raise ParameterError(f"{name}: kernel_size: expected {expected}, got {kernel_size!r}", argument="kernel_size")
            # NAT's table: one (2k-1)^n per head, trunc_normal_(std=0.02) (its cut at +-2 is NAT's too)
            self.rpb = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, *(2 * k - 1 for k in kernel)), std=0.02))
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` (B, *spatial, C) -> (B, *spatial, C).

        ``key_padding_mask`` (B, N) or (B, *spatial) bool, True = a padded token (passed to
        :func:`neighborhood_attention`): in 1D each sequence's windows are placed on its real
        tokens, so its rows equal the sequence alone; in 2D/3D pads are masked out of the windows.
        """
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
            qkv[0],
            qkv[1],
            qkv[2],
            kernel_size=self.kernel_size,
            dilation=self.dilation,
            stride=self.stride,
            causal=self.causal,
            rpb=self.rpb,
            key_padding_mask=key_padding_mask,
            backend=self.backend,
        )
        return self.proj(out.movedim(1, -2).reshape(b, *spatial, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"stride={self.stride}, causal={self.causal}, rpb={self.rpb is not None}"
        )


@register_module(
    "L1",
    "M7",
    paper="Neighborhood Attention Transformer (Hassani et al., CVPR 2023); Dilated Neighborhood Attention Transformer (Hassani & Shi, 2022)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8, kernel_size=7, dilation=2), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(dim=32, num_heads=2, kernel_size=5),
    ),
)
class NeighborhoodAttention1D(_NeighborhoodAttention):
    """Neighborhood attention over (B, L, C) tokens (catalog M7; NAT/DiNAT), see :func:`neighborhood_attention`.

    Example::

        >>> layer = NeighborhoodAttention1D(dim=64, num_heads=4, kernel_size=7, dilation=2)
        >>> y = layer(torch.randn(2, 128, 64))
    """

    spatial_dims = 1


@register_module(
    "L1",
    "M7",
    paper="Neighborhood Attention Transformer (Hassani et al., CVPR 2023); Dilated Neighborhood Attention Transformer (Hassani & Shi, 2022)",
    layout="(B, H, W, C)",
    # bench: NAT-Mini's first stage (64 channels, 2 heads, 7 x 7 windows with NAT's relative bias)
    example=ModuleExample(
        dict(dim=64, num_heads=2, kernel_size=7, rpb=True), inputs=[(1, 56, 56, 64)], test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, kernel_size=3),
    ),
)
class NeighborhoodAttention2D(_NeighborhoodAttention):
    """Neighborhood attention over (B, H, W, C) feature maps (catalog M7; NAT/DiNAT).

    Example::

        >>> layer = NeighborhoodAttention2D(dim=64, num_heads=4, kernel_size=7, rpb=True)  # NAT's layer
        >>> y = layer(torch.randn(2, 32, 32, 64))
    """

    spatial_dims = 2


@register_module(
    "L1",
    "M7",
    paper="Generalized Neighborhood Attention (Hassani et al., 2025); Faster Neighborhood Attention (Hassani et al., NeurIPS 2024)",
    layout="(B, T, H, W, C)",
    example=ModuleExample(
        dict(dim=64, num_heads=4, kernel_size=(3, 7, 7), rpb=True), inputs=[(1, 8, 32, 32, 64)], test_inputs=[(2, 4, 5, 5, 16)],
        test_kwargs=dict(dim=16, num_heads=2, kernel_size=3),
    ),
)
class NeighborhoodAttention3D(_NeighborhoodAttention):
    """Neighborhood attention over (B, T, H, W, C) volumes (catalog M7).

    Example::

        >>> layer = NeighborhoodAttention3D(dim=64, num_heads=4, kernel_size=(3, 7, 7))
        >>> y = layer(torch.randn(2, 8, 32, 32, 64))
    """

    spatial_dims = 3
