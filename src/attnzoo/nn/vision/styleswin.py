"""StyleSwin's double attention (Zhang et al., "StyleSwin: Transformer-based GAN for High-resolution Image
Generation", CVPR 2022, "double attention"), catalog M1.

One qkv projection is split along channels: the first half of the channels (and of the heads)
does window attention on non-overlapping windows, the second half does it on windows shifted by
half a window (Swin's roll and region mask), and the two halves are concatenated before one
output projection. Every token so sees its own window and the shifted one in a single layer.
The arithmetic follows the official ``models/generator.py`` (``StyleSwinTransformerBlock``'s
attention part; its AdaIN norms, MLP and residuals belong to the block, not to this mixer).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional import softmax_attention
from .._checks import heads_divide, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module
from ._grid_ops import (
    check_divisible,
    check_grid,
    from_windows,
    relative_position_index,
    shift_window_mask,
    to_windows,
)

__all__ = ["DoubleWindowAttention"]


@register_module(
    "M1",
    paper="StyleSwin: Transformer-based GAN for High-resolution Image Generation (Zhang et al., CVPR 2022)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=4, window_size=7),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=4, window_size=4),
    ),
)
class DoubleWindowAttention(nn.Module):
    """Double window attention: half the heads on windows, half on shifted windows, concatenated.

    With ``[q, k, v] = x W_qkv`` split by channel into halves ``(.)_1`` and ``(.)_2`` (h/2 heads
    each, head width ``d = C / h``), window size ``M`` and shift ``s = M // 2`` (the paper's
    double-attention equation)::

        y_1 = W-MSA(q_1, k_1, v_1)                          windows of M x M, + RPB_1
        y_2 = roll_s(SW-MSA(roll_-s(q_2, k_2, v_2)))        shifted windows, + RPB_2 + Swin's mask (-100)
        y   = concat(y_1, y_2) W_proj

    Each half has its own relative position bias table ((2M-1)^2 x h/2, truncated normal with std
    0.02). When ``min(H, W) == M`` the image is one window and, as in the official block, both
    halves use unshifted windows.

    Cost: O(N M^2 C) for the attention, O(N C^2) for the projections.
    Layout: ``(B, H, W, C)`` in and out; H and W multiples of ``window_size`` (the official block
    works at fixed resolutions that are).

    Args:
        dim: C. num_heads: h (even; h/2 heads per half). window_size: M. qkv_bias: bias of qkv.
        qk_scale: overrides ``d ** -0.5``. backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> layer = DoubleWindowAttention(64, num_heads=4, window_size=8)
        >>> y = layer(torch.randn(2, 32, 32, 64))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 8,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        head_dim = heads_divide(name, dim, num_heads)
        if num_heads % 2:
            raise ParameterError(f"{name}: num_heads: expected an even number (half per window kind), got {num_heads}", argument="num_heads")
        positive_int(name, "window_size", window_size)
        self.dim, self.num_heads, self.window_size, self.shift_size = dim, num_heads, window_size, window_size // 2
        self.scale = qk_scale or head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        table = (2 * window_size - 1) ** 2
        self.rpb_window = nn.Parameter(nn.init.trunc_normal_(torch.zeros(table, num_heads // 2), std=0.02))
        self.rpb_shifted = nn.Parameter(nn.init.trunc_normal_(torch.zeros(table, num_heads // 2), std=0.02))
        self.register_buffer("rel_index", relative_position_index(window_size, window_size), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def _bias(self, table: Tensor) -> Tensor:
        n = self.window_size ** 2
        return table[self.rel_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)  # (h/2, N, N)

    def _windows(self, q: Tensor, k: Tensor, v: Tensor, table: Tensor, mask: Optional[Tensor]) -> Tensor:
        b, h, w, c = q.shape
        m = self.window_size
        q, k, v = (split_heads(to_windows(t, m, m), self.num_heads // 2) for t in (q, k, v))
        bias = self._bias(table).to(q.dtype).unsqueeze(0)  # (1, h/2, N, N)
        if mask is not None:  # (nW, N, N), windows of one image consecutive in the batch
            bias = (bias + mask.to(q.dtype)[:, None]).repeat(b, 1, 1, 1)
        out = softmax_attention(q, k, v, bias=bias, scale=self.scale, backend=self.backend)
        return from_windows(merge_heads(out), b, h, w, m, m)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        name = type(self).__name__
        check_grid(name, x, self.dim)
        check_divisible(name, x, self.window_size, "window_size")
        _, h, w, c = x.shape
        half = c // 2
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        y1 = self._windows(q[..., :half], k[..., :half], v[..., :half], self.rpb_window, None)
        s = self.shift_size if min(h, w) > self.window_size else 0
        q2, k2, v2 = (t[..., half:] for t in (q, k, v))
        if s:
            q2, k2, v2 = (torch.roll(t, shifts=(-s, -s), dims=(1, 2)) for t in (q2, k2, v2))
            mask = shift_window_mask(h, w, self.window_size, s, device=x.device)
        else:
            mask = None
        y2 = self._windows(q2, k2, v2, self.rpb_shifted, mask)
        if s:
            y2 = torch.roll(y2, shifts=(s, s), dims=(1, 2))
        return self.proj(torch.cat([y1, y2], dim=-1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}"
