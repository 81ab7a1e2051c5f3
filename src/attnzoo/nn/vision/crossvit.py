"""Cross-attention between branches through the CLS token (Chen et al., "CrossViT: Cross-Attention
Multi-Scale Vision Transformer for Image Classification", ICCV 2021, Sec. 3.3 "Cross-Attention
Fusion").

The CLS token of one branch, projected into the other branch's width, is the only query; the keys
and values are that CLS token and the other branch's patch tokens::

    x'    = [f(x_cls^l) || x_patch^s]
    q     = x'_cls W_q,   k = x' W_k,   v = x' W_v
    CA(x') = softmax(q k^T / sqrt(C / h)) v
    y_cls = f(x_cls^l) + MCA(LN(x')),   z = [g(y_cls) || x_patch^l]      (the block around it)

This module is CA with its output projection (timm's ``crossvit.CrossAttention``): one query, so
the cost is linear in the number of tokens. The scale is ``(C / h)^-1/2`` (timm notes that its
first version used another; the paper's is this one).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import check_tokens, heads_divide, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["ClassTokenCrossAttention"]


@register_module(
    "M9",
    paper="CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification (Chen et al., ICCV 2021)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=384, num_heads=12), inputs=[(1, 197, 384)],  # CrossViT-S: the small branch's CLS among the large branch's 196 patches
        test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, num_heads=2),
        output=lambda shapes: (shapes[0][0], 1, shapes[0][2]),
    ),
)
class ClassTokenCrossAttention(nn.Module):
    """CrossViT's cross-attention: token 0 (a CLS token) attends over all tokens; returns (B, 1, C).

    ``forward(x)`` with x = [cls; patch tokens] (B, 1 + N, C), as timm; or ``forward(cls, context)``
    with ``cls`` (B, 1, C) and the other branch's patch tokens ``context`` (B, N, C), which is the
    same as ``forward(torch.cat([cls, context], 1))``. Per head::

        out = softmax((x_0 W_q)(x W_k)^T / sqrt(C / h)) (x W_v),   y = out W_o

    Cost: O(N C) for the attention (one query), O(N C^2) for the key/value projections.

    Args:
        dim: channels C. num_heads: h (a divisor of dim). qkv_bias: bias of the q, k, v projections.
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> layer = ClassTokenCrossAttention(384, num_heads=12)
        >>> cls_out = layer(torch.randn(2, 197, 384))      # (2, 1, 384)
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        heads_divide(name, positive_int(name, "dim", dim), num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.backend = backend
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        name = type(self).__name__
        check_tokens(name, x, self.dim)
        if context is not None:
            if x.shape[1] != 1:
                raise ShapeError(f"{name}: x: with context, expected the CLS token alone (B, 1, C), got shape {tuple(x.shape)}", argument="x")
            check_tokens(name, context, self.dim)
            if context.shape[0] != x.shape[0]:
                raise ShapeError(f"{name}: context: expected batch {x.shape[0]}, got shape {tuple(context.shape)}", argument="context")
            x = torch.cat([x, context], dim=1)
        q = split_heads(self.wq(x[:, :1]), self.num_heads)
        k, v = split_heads(self.wk(x), self.num_heads), split_heads(self.wv(x), self.num_heads)
        out = softmax_attention(q, k, v, scale=self.head_dim**-0.5, backend=self.backend)
        return self.proj(merge_heads(out))

    @classmethod
    def from_timm(cls, module: Any) -> "ClassTokenCrossAttention":
        """A copy of ``timm.models.crossvit.CrossAttention`` (its four projections and scale)."""
        dim = module.wq.in_features
        layer = cls(dim, module.num_heads, qkv_bias=module.wq.bias is not None)
        if abs(module.scale - layer.head_dim**-0.5) > 1e-12:
            raise ParameterError(f"{cls.__name__}.from_timm: expected scale = head_dim ** -0.5, got {module.scale}", argument="module")
        for name in ("wq", "wk", "wv", "proj"):
            setattr(layer, name, copy.deepcopy(getattr(module, name)))
        return layer

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
