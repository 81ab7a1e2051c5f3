"""Channel group attention: channels as tokens (Ding et al., "DaViT: Dual Attention Vision
Transformers", ECCV 2022, Sec. 3 "Channel group attention").

The map is transposed: a channel is a token whose feature is its column over all N pixels, so the
attention matrix is C_g x C_g per group and the cost is linear in N::

    A(Q_i, K_i, V_i) = [softmax(Q_i^T K_i / sqrt(C_g)) V_i^T]^T,   i = 1..N_g groups of C_g = C / N_g channels

The official code (and timm's ``davit.ChannelAttention``) builds the C_g x C_g map from the
projections it names k and v and applies it to the one it names q
(``out = (softmax(k^T v * C_g^-1/2) q^T)^T``); the three projections are symmetric in the
parameters, so this is the paper's formula with the roles of the three slices of the qkv
projection renamed. This module follows that layout, so timm's weights load unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import heads_divide, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["ChannelGroupAttention"]


@register_module(
    "M5",
    paper="DaViT: Dual Attention Vision Transformers (Ding et al., ECCV 2022)",
    layout="(B, H, W, C) or (B, N, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=3), inputs=[(1, 56, 56, 96)],  # DaViT-T stage 1
        test_inputs=[(2, 8, 8, 16)], test_kwargs=dict(dim=16, num_heads=2),
    ),
)
class ChannelGroupAttention(nn.Module):
    """Channel group attention (DaViT): the C_g channels of each group attend to each other.

    Per group of C_g = C / num_heads channels, with q, k, v (N, C_g) slices of one linear
    projection of the N tokens::

        out_g = q_g softmax(k_g^T v_g / sqrt(C_g))^T          (N, C_g)
        y     = concat_g(out_g) W_o

    which is :func:`attnzoo.softmax_attention` with the channels of k^T as queries, those of v^T as
    keys and those of q^T as values (features of length N).

    Cost: O(N C^2 / num_heads) time, O(C^2 / num_heads) for the maps: linear in N.

    Args:
        dim: channels C. num_heads: the groups N_g (a divisor of dim). qkv_bias: bias of the qkv
            projection. backend: passed to :func:`attnzoo.softmax_attention`.

    Input (B, H, W, C) or (B, N, C); the output has the input's shape. Every pixel of the map is a
    feature of each channel token, so both layouts give the same result on the same pixels.

    Example::

        >>> layer = ChannelGroupAttention(96, num_heads=3)
        >>> y = layer(torch.randn(2, 56, 56, 96))
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        heads_divide(name, positive_int(name, "dim", dim), num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            raise ShapeError(
                f"{type(self).__name__}: x: expected (B, H, W, C={self.dim}) or (B, N, C={self.dim}), got shape {tuple(x.shape)}",
                argument="x",
            )
        shape = x.shape
        x = x.reshape(shape[0], -1, self.dim)
        b, n, c = x.shape
        # (B, heads, C_g, N): the channel tokens of each slice
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 4, 1).unbind(0)
        out = softmax_attention(k, v, q, scale=self.head_dim**-0.5, backend=self.backend)  # (B, heads, C_g, N)
        out = out.permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj(out).view(shape)

    @classmethod
    def from_timm(cls, module: Any) -> "ChannelGroupAttention":
        """A copy of ``timm.models.davit.ChannelAttention`` (its qkv and output projections)."""
        dim = module.qkv.in_features
        layer = cls(dim, module.num_heads, qkv_bias=module.qkv.bias is not None)
        if abs(module.scale - layer.head_dim**-0.5) > 1e-12:
            raise ParameterError(f"{cls.__name__}.from_timm: expected scale = head_dim ** -0.5, got {module.scale}", argument="module")
        layer.qkv, layer.proj = copy.deepcopy(module.qkv), copy.deepcopy(module.proj)
        return layer

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
