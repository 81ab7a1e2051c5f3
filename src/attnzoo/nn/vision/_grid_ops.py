"""Grid helpers shared by the official-arithmetic vision mixers (HiLo, CrossFormer, StyleSwin, HAT, TransNeXt, ...).

Tokens are channels-last ``(B, H, W, C)``. Windows are taken row-major over the grid of windows and
row-major inside a window, the order of Swin's ``window_partition`` (and of every official code base
that copies it), so a window's token ``t`` sits at ``(t // ww, t % ww)`` inside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import ParameterError, ShapeError

__all__ = [
    "check_grid",
    "check_divisible",
    "heads_divide",
    "to_windows",
    "from_windows",
    "relative_position_index",
    "shift_window_mask",
]


def check_grid(owner: str, x: Tensor, dim: int) -> None:
    """``x`` must be a grid of tokens (B, H, W, C) with C = ``dim``."""
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ShapeError(f"{owner}: x: expected (B, H, W, C={dim}), got shape {tuple(x.shape)}", argument="x")


def check_divisible(owner: str, x: Tensor, size: int, what: str) -> None:
    """H and W of ``x`` (B, H, W, C) must be multiples of ``size`` (``what`` names the argument)."""
    h, w = x.shape[1], x.shape[2]
    if h % size or w % size:
        raise ShapeError(
            f"{owner}: x: expected H and W divisible by {what}={size}, got shape {tuple(x.shape)}", argument="x"
        )


def heads_divide(owner: str, dim: int, num_heads: int) -> int:
    """The head width ``dim // num_heads``; a ParameterError unless ``num_heads`` divides ``dim``."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ParameterError(f"{owner}: num_heads: expected a divisor of dim={dim}, got {num_heads!r}", argument="num_heads")
    return dim // num_heads


def to_windows(x: Tensor, wh: int, ww: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, wh * ww, C), windows row-major (Swin's ``window_partition``)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def from_windows(windows: Tensor, b: int, h: int, w: int, wh: int, ww: int) -> Tensor:
    """The inverse of :func:`to_windows`: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(wh: int, ww: int, device=None) -> Tensor:
    """Swin's (wh*ww, wh*ww) index into a ((2wh-1)(2ww-1)) table: (dy + wh - 1)(2ww - 1) + dx + ww - 1."""
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def shift_window_mask(h: int, w: int, window: int, shift: int, device=None, dtype=torch.float32) -> Tensor:
    """Swin's shifted-window mask (nW, N, N): 0 inside one region of the rolled image, -100 across regions.

    The image rolled by ``-shift`` is cut into 3 x 3 regions (the last ``window`` rows/columns split at
    ``-shift``); a window that straddles regions must not mix them (-100, as the official codes use).
    """
    label = torch.zeros(1, h, w, 1, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for rows in cuts:
        for cols in cuts:
            label[:, rows, cols, :] = count
            count += 1
    win = to_windows(label, window, window).squeeze(-1)  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros(diff.shape, device=device, dtype=dtype).masked_fill(diff != 0, -100.0)
