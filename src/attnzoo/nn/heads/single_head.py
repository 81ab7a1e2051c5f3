"""Single-head attention on a slice of the channels (Yun and Ro, "SHViT: Single-Head Vision
Transformer with Memory Efficient Macro Design", CVPR 2024: the single-head self-attention layer, SHSA).

Multi-head attention's heads are largely redundant at the early stages, so SHViT runs one head
on the first C_p = r C channels and passes the rest through untouched (the block's depthwise-conv
residual provides the local mixing), then mixes both with one projection::

    SHSA(X)   = Concat(X~_att, X_res) W^O
    X~_att    = Attention(X_att W^Q, X_att W^K, X_att W^V)
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_qk)) V,        [X_att | X_res] = split(X, [C_p, C - C_p])

As in the official code (and timm's ``shvit.SHSA``): X_att is normalised first (GroupNorm with one
group), the projections are 1x1 Conv-BN, and the output is ReLU then Conv-BN.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import positive_int
from .._registry import ModuleExample, register_module
from .cascaded import ConvBN

__all__ = ["SingleHeadAttention"]


@register_module(
    "H3",
    paper="SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design (Yun and Ro, CVPR 2024)",
    layout="(B, C, H, W)",
    example=ModuleExample(
        dict(dim=128, qk_dim=16, pdim=32), inputs=[(1, 128, 14, 14)],  # SHViT-S1 stage 1 (32 of 128 channels attend)
        test_inputs=[(2, 16, 6, 6)], test_kwargs=dict(dim=16, qk_dim=4, pdim=4),
    ),
)
class SingleHeadAttention(nn.Module):
    """SHViT's single-head self-attention on the first ``pdim`` channels of a (B, C, H, W) map.

    ::

        x_att, x_res = x[:, :pdim], x[:, pdim:]
        q, k, v      = ConvBN(GroupNorm(x_att))           # qk_dim, qk_dim, pdim channels
        x_att'       = v softmax(q^T k / sqrt(qk_dim))^T   # one head over all H W pixels
        y            = ConvBN(ReLU([x_att' | x_res]))

    Cost: O((H W)^2 (qk_dim + pdim)) for the attention, O(H W C^2) for the output projection;
    the attention's memory is that of one head.

    Args:
        dim: channels C. qk_dim: width of q and k. pdim: channels that enter the attention (C_p <= C).
        zero_init_proj: start the output BatchNorm's scale at 0 (the official init, so the
            residual block starts as the identity); off by default.
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> layer = SingleHeadAttention(128, qk_dim=16, pdim=32)
        >>> y = layer(torch.randn(2, 128, 14, 14))
    """

    def __init__(self, dim: int, qk_dim: int = 16, pdim: int = 32, *, zero_init_proj: bool = False, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        positive_int(name, "qk_dim", qk_dim)
        if positive_int(name, "pdim", pdim) > dim:
            raise ParameterError(f"{name}: pdim: expected at most dim={dim}, got {pdim}", argument="pdim")
        self.dim, self.qk_dim, self.pdim = dim, qk_dim, pdim
        self.backend = backend
        self.pre_norm = nn.GroupNorm(1, pdim)
        self.qkv = ConvBN(pdim, 2 * qk_dim + pdim)
        self.proj = ConvBN(dim, dim, bn_weight=0.0 if zero_init_proj else 1.0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ShapeError(f"{type(self).__name__}: x: expected (B, C={self.dim}, H, W), got shape {tuple(x.shape)}", argument="x")
        b, _, h, w = x.shape
        x_att, x_res = x.split([self.pdim, self.dim - self.pdim], dim=1)
        q, k, v = self.qkv(self.pre_norm(x_att)).split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k, v))  # (B, 1, HW, d): one head
        out = softmax_attention(q, k, v, scale=self.qk_dim**-0.5, backend=self.backend)
        x_att = out.squeeze(1).transpose(1, 2).reshape(b, self.pdim, h, w)
        return self.proj(torch.relu(torch.cat([x_att, x_res], dim=1)))

    @classmethod
    def from_timm(cls, module: Any) -> "SingleHeadAttention":
        """A copy of ``timm.models.shvit.SHSA`` (its GroupNorm, Conv-BN projections and statistics)."""
        layer = cls(module.dim, module.qk_dim, module.pdim)
        norm = module.pre_norm
        if not isinstance(norm, nn.GroupNorm) or norm.num_groups != 1:
            raise ParameterError(f"{cls.__name__}.from_timm: expected a one-group GroupNorm pre_norm, got {type(norm).__name__}", argument="module")
        if not isinstance(module.proj[0], nn.ReLU):
            raise ParameterError(f"{cls.__name__}.from_timm: expected ReLU before the projection, got {type(module.proj[0]).__name__}", argument="module")
        layer.pre_norm = nn.GroupNorm(1, module.pdim, eps=norm.eps, affine=norm.affine)
        layer.pre_norm.load_state_dict(norm.state_dict())
        layer.qkv.copy_from(module.qkv.c, module.qkv.bn)
        layer.proj.copy_from(module.proj[1].c, module.proj[1].bn)
        return layer.train(module.training)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, qk_dim={self.qk_dim}, pdim={self.pdim}"
