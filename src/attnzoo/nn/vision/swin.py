"""Swin's window attention with relative position bias, shifted windows included (catalog M1).

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021,
Sec. 3.2 (W-MSA, SW-MSA by cyclic shift and masking) and Sec. 3.2 "Relative position bias"::

    Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V        (Eq. 4)

per window of M x M tokens, with ``B = B_hat[dy + M - 1, dx + M - 1]`` read from a learned
(2M - 1) x (2M - 1) table per head. The shifted layer rolls the map by (-s, -s) (s = M // 2 in
the paper), attends within windows, and rolls back; a window of the rolled map that joins
sub-windows from different sides of the image adds -100 between tokens of different sub-windows
(the official code's value, kept here rather than -inf). This module is the attention part of a
Swin block (``SwinTransformerBlock._attn`` in timm): no norm, MLP or residual.

The grid helpers (windows, the relative-position index, the shift mask) are
:mod:`attnzoo.nn.vision._grid_ops`, shared by every windowed mixer.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional import softmax_attention
from .._checks import positive_int
from .._registry import ModuleExample, register_module

__all__ = ["SwinWindowAttention"]

from ._grid_ops import IntOr2, check_grid, pair, relative_position_index, shift_mask, unwindows, windows


@register_module(
    "M1",
    paper="Swin Transformer (Liu et al., ICCV 2021)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=3, window_size=7, shift_size=3),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 10, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, window_size=4, shift_size=2),
    ),
)
class SwinWindowAttention(nn.Module):
    """Swin (shifted-)window multi-head self-attention with relative position bias over (B, H, W, C).

    Per window of wh x ww tokens (Swin, Sec. 3.2, Eq. 4)::

        out = SoftMax(Q K^T / sqrt(d) + B + M) V,   B_ij = B_hat[y_i - y_j + wh - 1, x_i - x_j + ww - 1]

    with ``M`` = 0, or Swin's shift mask (-100 between sub-windows) when ``shift_size`` > 0: the
    map is rolled by ``-shift_size``, windowed, attended and rolled back (SW-MSA). Q, K, V come from
    one ``qkv`` linear, the heads are concatenated and projected by ``proj``.

    Sizes that are not window multiples are zero-padded at the bottom/right **after** the roll,
    and the padded tokens are keys like any other (they are not masked), as in timm's
    ``SwinTransformerBlock`` (the official classification code requires multiples; its detection
    code pads before the roll). With sizes that are window multiples all readings agree. Unlike
    timm's block, a map smaller than the window is padded rather than the window clipped
    (:meth:`from_timm` copies a block's already-clipped window).

    Cost: O(N * wh * ww * C) time for N = H * W tokens (linear in N), plus O(N * C^2) projections.

    Args:
        dim: channels C. num_heads: heads. window_size: M, an int or (wh, ww).
        shift_size: s, an int or (sh, sw) with 0 <= s < window (Swin uses window // 2 on odd layers).
        head_dim: channels per head (default dim // num_heads, as timm). qkv_bias: bias of ``qkv``.
        backend: passed to :func:`attnzoo.softmax_attention`.

    ``forward(x)``: x (B, H, W, C) -> (B, H, W, C).

    Example::

        >>> layer = SwinWindowAttention(96, num_heads=3, window_size=7, shift_size=3)
        >>> y = layer(torch.randn(2, 56, 56, 96))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: IntOr2 = 7,
        shift_size: IntOr2 = 0,
        *,
        head_dim: Optional[int] = None,
        qkv_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.num_heads = positive_int(name, "num_heads", num_heads)
        if head_dim is None:
            if dim % num_heads:
                raise ParameterError(f"{name}: num_heads: expected a divisor of dim={dim} (or pass head_dim), got {num_heads}", argument="num_heads")
            head_dim = dim // num_heads
        self.head_dim = positive_int(name, "head_dim", head_dim)
        self.window_size = pair(name, "window_size", window_size)
        self.shift_size = pair(name, "shift_size", shift_size, minimum=0)
        if any(s >= w for s, w in zip(self.shift_size, self.window_size)):
            raise ParameterError(
                f"{name}: shift_size: expected 0 <= shift < window_size={self.window_size} per axis, got {shift_size!r}", argument="shift_size"
            )
        self.backend = backend
        wh, ww = self.window_size
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * wh - 1) * (2 * ww - 1), self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(wh, ww), persistent=False)

    def relative_position_bias(self) -> Tensor:
        """B of Eq. 4 as (num_heads, N, N), N = wh * ww tokens of a window."""
        n = self.window_size[0] * self.window_size[1]
        return self.relative_position_bias_table[self.relative_position_index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_grid(type(self).__name__, x, self.dim)
        b, h, w, _ = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        shifted = bool(sh or sw)
        if shifted:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        xw = windows(x, (wh, ww))  # (B, nW, N, C)
        n_win, n = xw.shape[1], xw.shape[2]
        heads, d = self.num_heads, self.head_dim
        # windows and heads share the head axis, so one (nW * heads, N, N) bias serves every image
        q, k, v = self.qkv(xw).view(b, n_win, n, 3, heads, d).permute(3, 0, 1, 4, 2, 5).reshape(3, b, n_win * heads, n, d)
        bias = self.relative_position_bias().unsqueeze(0)  # (1, heads, N, N)
        if shifted:
            bias = bias + shift_mask((hp, wp), (wh, ww), (sh, sw), x.device, bias.dtype).unsqueeze(1)
        bias = bias.expand(n_win, heads, n, n).reshape(1, n_win * heads, n, n)
        out = softmax_attention(q, k, v, bias=bias, scale=d**-0.5, backend=self.backend)
        out = self.proj(out.view(b, n_win, heads, n, d).transpose(2, 3).reshape(b, n_win, n, heads * d))
        out = unwindows(out, (wh, ww), hp, wp)[:, :h, :w]
        if shifted:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out.contiguous()

    @classmethod
    def from_timm(cls, module: Any) -> "SwinWindowAttention":
        """A copy of a ``timm.models.swin_transformer.SwinTransformerBlock``'s attention part (its
        ``attn``, window and shift; the block's norm and MLP are not carried) or of a
        ``WindowAttention`` (no shift). Dropout is not carried."""
        attn, shift = module, (0, 0)
        if hasattr(module, "attn") and hasattr(module, "shift_size"):
            attn, shift = module.attn, tuple(module.shift_size)
        if not all(hasattr(attn, a) for a in ("qkv", "proj", "relative_position_bias_table", "window_size", "num_heads")):
            raise ParameterError(
                f"{cls.__name__}.from_timm: module: expected timm's SwinTransformerBlock or WindowAttention, got {type(module).__name__}",
                argument="module",
            )
        heads = attn.num_heads
        layer = cls(
            attn.qkv.in_features, heads, tuple(attn.window_size), shift,
            head_dim=attn.qkv.out_features // 3 // heads, qkv_bias=attn.qkv.bias is not None,
        )
        layer.qkv, layer.proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)
        layer.relative_position_bias_table.data.copy_(attn.relative_position_bias_table.data)
        return layer.to(attn.qkv.weight.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}, shift_size={self.shift_size}"
