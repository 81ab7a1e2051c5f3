"""Global-query window attention (Hatamizadeh et al., "Global Context Vision Transformers", ICML
2023, Sec. 3 "Global self-attention" and "Global query generator"; the GC ViT layer).

A GC ViT stage computes one set of *global query tokens* per image, from the whole feature map
(the global query generator: repeated MBConv + stride-2 max-pool until the map has the window's
size), and every window of the image then attends with those queries against its own keys and
values, so a local window sees image-wide context at window-attention cost::

    q_g = GQG(x)                                  (B, w_h, w_w, C): one window's worth of queries per image
    k, v = x_win W_kv                             per window
    Attn(q_g, k, v) = softmax(q_g k^T / sqrt(d) + b) v,   b the window's relative position bias

GC ViT alternates these global blocks with ordinary (local) window attention blocks;
``use_global=False`` gives the local one (q from the window too). :class:`GlobalQueryGenerator` is
the generator. Both follow the official code and timm's ``gcvit`` (``WindowAttentionGlobal``,
``FeatureBlock``), whose weights :meth:`from_timm` copies; the query of a window is the global
query of its own image (the windows are image-major).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import heads_divide, merge_heads, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["GlobalQueryAttention", "GlobalQueryGenerator"]


def _pair(owner: str, name: str, value: Union[int, Sequence[int]]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ParameterError(f"{owner}: {name}: expected an int or a pair of ints, got {value!r}", argument=name)
    return positive_int(owner, name, pair[0]), positive_int(owner, name, pair[1])


def _relative_index(wh: int, ww: int, device: Optional[torch.device] = None) -> Tensor:
    """(N, N) index of the offset (dy, dx) = query - key into a (2 wh - 1)(2 ww - 1) table (Swin's layout)."""
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)


@register_module(
    "M8",
    paper="Global Context Vision Transformers (Hatamizadeh et al., ICML 2023)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=64, num_heads=2, window_size=7), inputs=[(1, 56, 56, 64), (1, 7, 7, 64)],  # GC ViT-T stage 1, global block
        test_inputs=[(2, 8, 8, 16), (2, 4, 4, 16)], test_kwargs=dict(dim=16, num_heads=2, window_size=4),
    ),
)
class GlobalQueryAttention(nn.Module):
    """GC ViT window attention whose queries are the image's global query tokens.

    ``forward(x, q_global)``: x (B, H, W, C) with H, W multiples of the window; ``q_global``
    (B, w_h, w_w, C) or (B, w_h w_w, C), e.g. from :class:`GlobalQueryGenerator`. Each window,
    per head::

        out = softmax((q_global / sqrt(d)) (x_win W_k)^T + b) (x_win W_v),   y = out W_o

    with ``b`` a learned bias per head and relative offset in the window. With
    ``use_global=False`` the queries come from the window (``x_win W_q``; a given ``q_global`` is
    ignored, as GC ViT's local blocks do).

    Cost: O(H W w_h w_w C) for the attention, O(H W C^2) for the projections (as window attention).

    Args:
        dim: channels C. num_heads: heads (a divisor of dim). window_size: int or (w_h, w_w).
        use_global: global-query block (default) or local window block. qkv_bias: bias of the
            k/v (q/k/v) projection. backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> gen = GlobalQueryGenerator(64, levels=3)
        >>> layer = GlobalQueryAttention(64, num_heads=2, window_size=7)
        >>> x = torch.randn(2, 56, 56, 64)
        >>> y = layer(x, gen(x))     # gen: (2, 56, 56, 64) -> (2, 7, 7, 64)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 2,
        window_size: Union[int, Sequence[int]] = 7,
        *,
        use_global: bool = True,
        qkv_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        heads_divide(name, positive_int(name, "dim", dim), num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size = _pair(name, "window_size", window_size)
        self.use_global = bool(use_global)
        self.backend = backend
        self.qkv = nn.Linear(dim, (2 if self.use_global else 3) * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * wh - 1) * (2 * ww - 1), num_heads) * 0.02)
        self.register_buffer("relative_position_index", _relative_index(wh, ww), persistent=False)

    def forward(self, x: Tensor, q_global: Optional[Tensor] = None) -> Tensor:
        name = type(self).__name__
        wh, ww = self.window_size
        if x.dim() != 4 or x.shape[-1] != self.dim or x.shape[1] % wh or x.shape[2] % ww:
            raise ShapeError(
                f"{name}: x: expected (B, H, W, C={self.dim}) with H, W multiples of the window {self.window_size}, got shape {tuple(x.shape)}",
                argument="x",
            )
        b, h, w, c = x.shape
        nh, nw, n = h // wh, w // ww, wh * ww
        heads, d = self.num_heads, self.head_dim
        # image-major windows: (B * nW, N, C)
        x_win = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
        if self.use_global:
            if q_global is None:
                raise ParameterError(f"{name}: q_global: expected (B, {wh}, {ww}, C) global queries (use_global=True), got None", argument="q_global")
            if q_global.shape not in ((b, wh, ww, c), (b, n, c)):
                raise ShapeError(f"{name}: q_global: expected ({b}, {wh}, {ww}, {c}) or ({b}, {n}, {c}), got shape {tuple(q_global.shape)}", argument="q_global")
            k, v = self.qkv(x_win).view(-1, n, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
            q = q_global.reshape(b, 1, n, heads, d).transpose(2, 3).expand(b, nh * nw, heads, n, d).reshape(b * nh * nw, heads, n, d)
        else:
            q, k, v = self.qkv(x_win).view(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1).unsqueeze(0).to(x.dtype)
        out = softmax_attention(q, k, v, bias=bias, scale=d**-0.5, backend=self.backend)
        out = self.proj(merge_heads(out))  # (B * nW, N, C)
        return out.view(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)

    @classmethod
    def from_timm(cls, module: Any) -> "GlobalQueryAttention":
        """A copy of ``timm.models.gcvit.WindowAttentionGlobal`` (global or local)."""
        dim = module.qkv.in_features
        layer = cls(dim, module.num_heads, tuple(module.window_size), use_global=module.use_global, qkv_bias=module.qkv.bias is not None)
        layer.qkv, layer.proj = copy.deepcopy(module.qkv), copy.deepcopy(module.proj)
        with torch.no_grad():
            layer.relative_position_bias_table.copy_(module.rel_pos.relative_position_bias_table)
        return layer

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, use_global={self.use_global}"


class _SqueezeExcite(nn.Module):
    """x * sigmoid(W_2 GELU(W_1 mean_hw(x))) (bias-free 1x1 convs), as in GC ViT's MBConv."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1, bias=False)
        self.fc2 = nn.Conv2d(reduced, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc2(F.gelu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _MBConv(nn.Module):
    """x + PW(SE(GELU(DW3x3(x)))): the official generator's fused residual block (no norm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.se = _SqueezeExcite(dim, max(8, int(dim / 4 + 4) // 8 * 8))
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_pw(self.se(F.gelu(self.conv_dw(x))))


class GlobalQueryGenerator(nn.Module):
    """GC ViT's global query generator: (B, H, W, C) -> (B, H / 2^levels, W / 2^levels, C).

    ``levels`` times MBConv then 3x3 stride-2 max-pool (one MBConv and no pool when ``levels=0``),
    so with ``levels = log2(H / window)`` the output has the window's size: one window's worth of
    query tokens per image for :class:`GlobalQueryAttention`. Input and output channels-last.

    Cost: O(H W C^2) (the pointwise convs), shrinking by 4 per level.

    Example::

        >>> GlobalQueryGenerator(64, levels=3)(torch.randn(1, 56, 56, 64)).shape
        torch.Size([1, 7, 7, 64])
    """

    def __init__(self, dim: int, levels: int = 1):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
            raise ParameterError(f"{name}: levels: expected a non-negative int, got {levels!r}", argument="levels")
        self.dim, self.levels = dim, levels
        self.blocks = nn.ModuleList(_MBConv(dim) for _ in range(max(1, levels)))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ShapeError(f"{type(self).__name__}: x: expected (B, H, W, C={self.dim}), got shape {tuple(x.shape)}", argument="x")
        x = x.permute(0, 3, 1, 2)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < self.levels:
                x = F.max_pool2d(x, 3, 2, 1)
        return x.permute(0, 2, 3, 1)

    @classmethod
    def from_timm(cls, module: Any) -> "GlobalQueryGenerator":
        """A copy of ``timm.models.gcvit.FeatureBlock`` (max-pool reduction, GELU, SE)."""
        convs = [m for name, m in module.blocks.named_children() if name.startswith("conv")]
        pools = [m for name, m in module.blocks.named_children() if name.startswith("pool")]
        if any(not isinstance(p, nn.MaxPool2d) for p in pools):
            raise ParameterError(f"{cls.__name__}.from_timm: expected max-pool reductions, got {[type(p).__name__ for p in pools]}", argument="module")
        dim = convs[0].conv_dw.in_channels
        layer = cls(dim, len(pools))
        for ours, theirs in zip(layer.blocks, convs):
            ours.conv_dw, ours.conv_pw = copy.deepcopy(theirs.conv_dw), copy.deepcopy(theirs.conv_pw)
            ours.se.fc1, ours.se.fc2 = copy.deepcopy(theirs.se.fc1), copy.deepcopy(theirs.se.fc2)
        return layer

    def extra_repr(self) -> str:
        return f"dim={self.dim}, levels={self.levels}"
