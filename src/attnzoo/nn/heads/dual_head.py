"""Spatial-temporal dual-headed attention (Li et al., "ZeroI2V: Zero-Cost Adaptation of Pre-trained
Transformers from Image to Video", ECCV 2024: STDHA; catalog H5).

An image Transformer's self-attention becomes a video one at zero extra cost by re-assigning heads:
each head attends over the tokens of ONE frame, but not necessarily its own. Heads with a frame
offset o take their keys and values from frame t + o while their queries stay in frame t (Sec. 3.2)::

    q, k, v = x W_qkv                                           per frame, as the image model
    head_j(t) = softmax(q_j(t) k_j(t + o_j)^T / sqrt(d)) v_j(t + o_j)    o_j in {0, -1, +1, ...}
    y(t) = concat_j head_j(t) W_o

The official code (leexinhao/ZeroI2V, ``mmaction/models/common/stdha.py``, ``STDHA`` with
``TemporalShift(divide_head=False)``) shifts the K and V channels after the in-projection: with
``fold = C / shift_div`` (shift_div = 4 by default), channels [0, fold) of frame t come from frame
t - 1 and channels [fold, 2 fold) from frame t + 1; where that frame does not exist (the first /
last frame) the frame keeps its own K and V (the shifted tensor starts as a copy). When the folds are
whole heads (C / shift_div a multiple of the head width, as ViT-B: 768 / 4 = 3 heads of 64), this is
the per-head offsets above: the first h / shift_div heads look one frame back, the next h / shift_div
one frame ahead, the rest stay in their frame. This module takes the per-head offsets
(``head_offsets``; default that official assignment with shift_div = 4) and keeps the official
boundary rule. No parameter is added: an image model's MHA weights load as they are.

Cost: the image model's, O(T N^2 C) for T frames of N tokens, O(T N C^2) for the projections.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import positive_int
from .._registry import ModuleExample, register_module

__all__ = ["SpatioTemporalDualHeadAttention"]


@register_module(
    "H5",
    paper="ZeroI2V: Zero-Cost Adaptation of Pre-trained Transformers from Image to Video (Li et al., ECCV 2024)",
    layout="(B, T, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8), inputs=[(1, 8, 128, 512)],  # 8 frames x 128 tokens = 1024 tokens
        test_inputs=[(2, 3, 5, 32)], test_kwargs=dict(dim=32, num_heads=4),
    ),
)
class SpatioTemporalDualHeadAttention(nn.Module):
    """STDHA over video tokens (B, T, N, C): multi-head attention within a frame, with some heads'
    keys and values taken from a neighbouring frame (per-head frame offsets).

    ``head_j(t) = softmax(q_j(t) k_j(t + o_j)^T / sqrt(d)) v_j(t + o_j)``, ``y(t) = concat_j head_j(t) W_o``
    (Sec. 3.2). Cost: O(T N^2 C + T N C^2), the image model's. Layout: (B, T, N, C) -> (B, T, N, C).

    Args:
        dim: channels C. num_heads: h (a divisor of C).
        head_offsets: one frame offset per head (0: its own frame, -1: the previous, +1: the next,
            any int). Default: the official ``shift_div=4`` assignment, ``max(1, h // 4)`` heads at -1,
            as many at +1, the rest 0.
        bias: bias of the qkv and output projections (``nn.MultiheadAttention``'s default: True).
        backend: passed to :func:`attnzoo.softmax_attention`.

    Keys/values whose frame t + o falls outside [0, T) are the frame's own (the official rule).

    Example::

        >>> layer = SpatioTemporalDualHeadAttention(768, num_heads=12)     # 3 heads back, 3 ahead
        >>> y = layer(torch.randn(2, 8, 197, 768))                          # 8 frames of 197 tokens
    """

    def __init__(self, dim: int, num_heads: int = 8, *, head_offsets: Optional[Sequence[int]] = None, bias: bool = True, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.num_heads = positive_int(name, "num_heads", num_heads)
        if dim % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")
        if head_offsets is None:
            if num_heads < 2:
                raise ParameterError(f"{name}: num_heads: expected at least 2 heads for the default offsets (or pass head_offsets), got {num_heads}", argument="num_heads")
            k = max(1, num_heads // 4)
            head_offsets = [-1] * k + [1] * k + [0] * (num_heads - 2 * k)
        offsets = list(head_offsets)
        if len(offsets) != num_heads or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise ParameterError(f"{name}: head_offsets: expected {num_heads} ints (one frame offset per head), got {head_offsets!r}", argument="head_offsets")
        self.head_offsets = tuple(offsets)
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def frame_index(self, frames: int, device=None) -> Tensor:
        """(h, T) long: the frame each head's keys/values come from, for each query frame."""
        t = torch.arange(frames, device=device)
        off = torch.tensor(self.head_offsets, device=device)[:, None]
        src = t[None, :] + off
        return torch.where((src >= 0) & (src < frames), src, t[None, :].expand_as(src))

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ShapeError(f"{name}: x: expected (B, T, N, C={self.dim}), got shape {tuple(x.shape)}", argument="x")
        b, t, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = (z.reshape(b, t, n, h, d).permute(0, 3, 1, 2, 4) for z in self.qkv(x).chunk(3, dim=-1))  # (B, h, T, N, d)
        idx = self.frame_index(t, x.device)
        heads = torch.arange(h, device=x.device)[:, None]
        k, v = k[:, heads, idx], v[:, heads, idx]  # head j, frame t <- frame idx[j, t]
        fold = lambda z: z.transpose(1, 2).reshape(b * t, h, n, d)  # noqa: E731
        out = softmax_attention(fold(q), fold(k), fold(v), backend=self.backend)  # (B T, h, N, d)
        out = out.transpose(1, 2).reshape(b, t, n, c)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_offsets={self.head_offsets}"
