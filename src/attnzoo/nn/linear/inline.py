"""The InLine attention module (Han et al., NeurIPS 2024; catalog F8).

:class:`InLineAttention` is the paper's token mixer around :func:`~attnzoo.functional.inline_attention`,
as the official code builds it (LeapLabTHU/InLine, ``InLineAttention`` in ``models/inline_swin.py``):

    q, k, v = x W_qkv (per head)
    out = inline_attention(q, k, v, feature_map)            (eq. 5: injective linear attention)
        + DWConv_w(v)                                       (the local attention residual)
    w = Conv1x1(GELU(Conv1x1(mean_tokens(x))))              (a k x k kernel per channel, per sample)
    y = out W_proj

The local term is a depthwise convolution of V whose kernel is predicted from the mean input
token by a two-layer grouped (per-head) 1x1-convolution MLP, so each sample gets its own kernel.
Tokens are channels-last: (B, H, W, C) with ``spatial_dims=2`` (a k x k kernel, as the paper) or
(B, N, C) with ``spatial_dims=1`` (a length-k kernel over the sequence, an extension). The
official DeiT variant skips the class token in the convolution; this module has no class token.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ShapeError
from ...functional.linear.inline import inline_attention
from .._checks import odd_kernel, spatial_dims_1_or_2
from .._registry import ModuleExample, register_module
from .attention import _TokenMixer

__all__ = ["InLineAttention"]


@register_module(
    "F8",
    paper="Bridging the Divide: Reconsidering Softmax and Linear Attention (InLine; Han et al., NeurIPS 2024)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=3), inputs=[(1, 56, 56, 96)], test_inputs=[(2, 8, 8, 16)], test_kwargs=dict(dim=16, num_heads=2)
    ),
)
class InLineAttention(_TokenMixer):
    """Injective linear attention plus the predicted depthwise-convolution term, over channels-last tokens.

    Args:
        dim: channels C. num_heads: heads (a divisor of C).
        spatial_dims: 2 for (B, H, W, C) grids (the paper), 1 for (B, N, C) sequences.
        feature_map: phi of :func:`~attnzoo.functional.inline_attention` (``"identity"``, the
            official default; ``"relu"``, ``"leaky_relu"``, ``"exp"`` or a callable).
        kernel_size: of the predicted depthwise convolution (odd; the paper: 3); None drops the term.
        backend: passed to :func:`~attnzoo.functional.inline_attention`.

    Example::

        >>> layer = InLineAttention(dim=96, num_heads=3)
        >>> y = layer(torch.randn(2, 56, 56, 96))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        spatial_dims: int = 2,
        feature_map: Any = "identity",
        kernel_size: Optional[int] = 3,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        name = type(self).__name__
        spatial_dims_1_or_2(name, spatial_dims)
        odd_kernel(name, kernel_size)
        self.spatial_dims, self.feature_map, self.kernel_size, self.backend = spatial_dims, feature_map, kernel_size, backend
        taps = None if kernel_size is None else kernel_size**spatial_dims
        self.residual = (
            None
            if taps is None
            else nn.Sequential(
                nn.Conv1d(dim, dim, kernel_size=1, groups=num_heads),
                nn.GELU(),
                nn.Conv1d(dim, dim * taps, kernel_size=1, groups=num_heads),
            )
        )

    def local_kernels(self, tokens: Tensor) -> Tensor:
        """(B, N, C) tokens -> (B C, 1, *k) depthwise kernels predicted from the mean token."""
        weights = self.residual(tokens.mean(dim=1).unsqueeze(-1))  # (B, C k^d, 1)
        return weights.reshape(tokens.shape[0] * self.dim, 1, *(self.kernel_size,) * self.spatial_dims)

    def local_term(self, tokens: Tensor, v: Tensor, spatial: tuple[int, ...]) -> Tensor:
        """The per-sample depthwise convolution of V over the token grid, (B, N, C)."""
        b = tokens.shape[0]
        values = self.merge(v).transpose(1, 2).reshape(1, b * self.dim, *spatial)  # every (sample, channel) its own group
        conv = F.conv1d if self.spatial_dims == 1 else F.conv2d
        out = conv(values, self.local_kernels(tokens), padding=self.kernel_size // 2, groups=b * self.dim)
        return out.reshape(b, self.dim, -1).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 + self.spatial_dims or x.shape[-1] != self.dim:
            layout = "(B, N, C)" if self.spatial_dims == 1 else "(B, H, W, C)"
            raise ShapeError(f"{type(self).__name__}: x: expected {layout} with C={self.dim}, got shape {tuple(x.shape)}", argument="x")
        spatial = tuple(x.shape[1:-1])
        tokens = x.reshape(x.shape[0], -1, self.dim)
        q, k, v = self.heads(tokens)
        out = self.merge(inline_attention(q, k, v, feature_map=self.feature_map, backend=self.backend))
        if self.residual is not None:
            out = out + self.local_term(tokens, v, spatial)
        return self.proj(out).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, spatial_dims={self.spatial_dims}, feature_map={self.feature_map!r}, kernel_size={self.kernel_size}"
