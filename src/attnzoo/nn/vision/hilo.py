"""HiLo attention (Pan et al., "Fast Vision Transformers with HiLo Attention", NeurIPS 2022; LITv2), catalog M6.

The heads are split in two groups by ``alpha``: Lo-Fi heads (``floor(alpha * heads)``) attend from
every token to average-pooled keys and values (the image's low frequencies); Hi-Fi heads (the
rest) do plain self-attention inside non-overlapping ``s x s`` windows (the high frequencies).
Each group has its own projections; the two outputs are concatenated along channels, Hi-Fi first,
with no joint output projection (the arithmetic of the official ``hilo.py``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional import softmax_attention
from .._checks import heads_divide, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module
from ._grid_ops import check_divisible, check_grid, from_windows, to_windows

__all__ = ["HiLoAttention"]


@register_module(
    "M6",
    paper="Fast Vision Transformers with HiLo Attention (Pan et al., NeurIPS 2022)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=4, window_size=2, alpha=0.5),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=4),
    ),
)
class HiLoAttention(nn.Module):
    """HiLo attention: Hi-Fi heads on s x s windows, Lo-Fi heads on s x s average-pooled keys/values.

    With ``h`` heads of width ``d = C / h``, ``h_lo = floor(alpha * h)`` and ``h_hi = h - h_lo``
    (the paper's HiLo attention section; the official ``hilo.py``)::

        Hi-Fi:  [q, k, v] = x W_hi                    (C -> 3 h_hi d)
                o_hi(window) = softmax(q k^T / sqrt(d)) v    inside each s x s window
                y_hi = o_hi W_hi_proj                 (h_hi d -> h_hi d)
        Lo-Fi:  q = x W_q,  [k, v] = AvgPool_s(x) W_kv   (N / s^2 pooled tokens)
                y_lo = softmax(q k^T / sqrt(d)) v W_lo_proj
        y = concat(y_hi, y_lo)                        (C channels; no joint projection)

    ``window_size == 1`` is plain multi-head self-attention (all heads Lo-Fi, as the official code
    switches it); ``alpha = 0`` is pure window attention and ``alpha = 1`` pure pooled attention.
    The scale is ``qk_scale`` or ``d ** -0.5`` in both branches.

    Cost: Hi-Fi O(N s^2 h_hi d); Lo-Fi O(N (N / s^2) h_lo d); projections O(N C^2).
    Layout: ``(B, H, W, C)`` in and out; H and W must be multiples of ``window_size`` (the
    official standalone module assumes it too; LITv2's backbone pads before calling it).

    Args:
        dim: channels C. num_heads: h (divides C). window_size: s. alpha: the Lo-Fi share of heads.
        qkv_bias: bias of the q/kv/qkv projections (off, as the official default).
        qk_scale: overrides ``d ** -0.5``. backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> layer = HiLoAttention(64, num_heads=8, window_size=2, alpha=0.5)
        >>> y = layer(torch.randn(2, 14, 14, 64))   # (2, 14, 14, 64)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int = 2,
        alpha: float = 0.5,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        head_dim = heads_divide(name, dim, num_heads)
        positive_int(name, "window_size", window_size)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ParameterError(f"{name}: alpha: expected a float in [0, 1], got {alpha!r}", argument="alpha")
        self.dim, self.num_heads, self.head_dim, self.window_size, self.alpha = dim, num_heads, head_dim, window_size, alpha
        self.backend = backend
        self.scale = qk_scale or head_dim ** -0.5
        lo = int(num_heads * alpha)
        if window_size == 1:  # official: s = 1 is standard MSA, all heads Lo-Fi
            lo = num_heads
        self.lo_heads, self.hi_heads = lo, num_heads - lo
        self.lo_dim, self.hi_dim = lo * head_dim, (num_heads - lo) * head_dim
        if self.lo_heads:
            self.l_q = nn.Linear(dim, self.lo_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.lo_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.lo_dim, self.lo_dim)
        if self.hi_heads:
            self.h_qkv = nn.Linear(dim, 3 * self.hi_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.hi_dim, self.hi_dim)

    def hifi(self, x: Tensor) -> Tensor:
        """Window self-attention of the Hi-Fi heads: (B, H, W, C) -> (B, H, W, h_hi d)."""
        b, h, w, _ = x.shape
        s = self.window_size
        q, k, v = self.h_qkv(to_windows(x, s, s)).chunk(3, dim=-1)  # (B nW, s^2, h_hi d) each
        q, k, v = (split_heads(t, self.hi_heads) for t in (q, k, v))
        out = merge_heads(softmax_attention(q, k, v, scale=self.scale, backend=self.backend))
        return self.h_proj(from_windows(out, b, h, w, s, s))

    def lofi(self, x: Tensor) -> Tensor:
        """Attention of the Lo-Fi heads to s x s average-pooled keys/values: (B, H, W, C) -> (B, H, W, h_lo d)."""
        b, h, w, c = x.shape
        s = self.window_size
        q = split_heads(self.l_q(x).reshape(b, h * w, self.lo_dim), self.lo_heads)
        pooled = x if s == 1 else F.avg_pool2d(x.permute(0, 3, 1, 2), s, s).flatten(2).transpose(1, 2)
        k, v = self.l_kv(pooled.reshape(b, -1, c)).chunk(2, dim=-1)
        k, v = split_heads(k, self.lo_heads), split_heads(v, self.lo_heads)
        out = merge_heads(softmax_attention(q, k, v, scale=self.scale, backend=self.backend))
        return self.l_proj(out.reshape(b, h, w, self.lo_dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        name = type(self).__name__
        check_grid(name, x, self.dim)
        check_divisible(name, x, self.window_size, "window_size")
        if not self.lo_heads:
            return self.hifi(x)
        if not self.hi_heads:
            return self.lofi(x)
        return torch.cat([self.hifi(x), self.lofi(x)], dim=-1)

    def flops(self, h: int, w: int) -> int:
        """Multiply-adds at an H x W input (the official count, without padding)."""
        n, s, c = h * w, self.window_size, self.dim
        hi = n * c * 3 * self.hi_dim + (n // (s * s)) * (s * s) ** 2 * self.hi_dim * 2 + n * self.hi_dim ** 2
        m = math.ceil(h / s) * math.ceil(w / s)
        lo = n * c * self.lo_dim + m * c * 2 * self.lo_dim + n * m * self.lo_dim * 2 + n * self.lo_dim ** 2
        return hi + lo

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"hi_heads={self.hi_heads}, lo_heads={self.lo_heads}")
