"""Grid helpers shared by the official-arithmetic vision mixers (HiLo, CrossFormer, StyleSwin, HAT, TransNeXt, ...).

Tokens are channels-last ``(B, H, W, C)``. Windows are taken row-major over the grid of windows and
row-major inside a window, the order of Swin's ``window_partition`` (and of every official code base
that copies it), so a window's token ``t`` sits at ``(t // ww, t % ww)`` inside it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ...errors import ParameterError, ShapeError

IntOr2 = Union[int, Sequence[int]]


def check_grid(owner: str, x: Tensor, dim: int) -> None:
    """``x`` must be a channels-last grid (B, H, W, C) with C = ``dim``."""
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ShapeError(f"{owner}: x: expected (B, H, W, C={dim}), got shape {tuple(x.shape)}", argument="x")


__all__ = [
    "IntOr2",
    "pair",
    "windows",
    "unwindows",
    "shift_mask",
    "SHIFT_MASK_VALUE",
    "check_grid",
    "check_divisible",
    "to_windows",
    "from_windows",
    "relative_position_index",
    "shift_window_mask",
]


def check_divisible(owner: str, x: Tensor, size: int, what: str) -> None:
    """H and W of ``x`` (B, H, W, C) must be multiples of ``size`` (``what`` names the argument)."""
    h, w = x.shape[1], x.shape[2]
    if h % size or w % size:
        raise ShapeError(
            f"{owner}: x: expected H and W divisible by {what}={size}, got shape {tuple(x.shape)}", argument="x"
        )


#: The official Swin code's (and timm's) additive mask between sub-windows of a shifted window.
SHIFT_MASK_VALUE = -100.0


def pair(owner: str, name: str, value: Any, *, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints (each >= ``minimum``) as a (height, width) pair."""
    items = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in items):
        raise ParameterError(f"{owner}: {name}: expected an int >= {minimum} or a pair of them, got {value!r}", argument=name)
    return items  # type: ignore[return-value]


def relative_position_index(height: int, width: int, device: Optional[torch.device] = None) -> Tensor:
    """(N, N) long, N = height * width: the bias-table row of query i's offset to key j in a window.

    Offsets (dy, dx) = position_i - position_j index a (2 * height - 1) x (2 * width - 1) table
    row-major: ``(dy + height - 1) * (2 * width - 1) + (dx + width - 1)`` (Swin's and timm's order).
    """
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    dy = ys[:, None] - ys[None, :] + height - 1
    dx = xs[:, None] - xs[None, :] + width - 1
    return dy * (2 * width - 1) + dx


def windows(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W, C) -> (B, n_windows, wh * ww, C): contiguous windows, row-major over windows and inside."""
    b, h, w, c = x.shape
    wh, ww = size
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def unwindows(x: Tensor, size: tuple[int, int], height: int, width: int) -> Tensor:
    """The inverse of :func:`windows`: (B, n_windows, wh * ww, C) -> (B, H, W, C)."""
    b, _, _, c = x.shape
    wh, ww = size
    x = x.view(b, height // wh, width // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def _shift_regions(length: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Per rolled position along one padded axis: its sub-window label 0, 1 or 2 (all 0 without shift)."""
    pos = torch.arange(length, device=device)
    if not shift:
        return torch.zeros_like(pos)
    return (pos >= length - window).long() + (pos >= length - shift).long()


def shift_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_windows, N, N): 0 within a sub-window, -100 across, for the rolled and padded map (Swin's SW-MSA mask).

    Bands are laid on the padded size, as timm does (it pads after the roll): rows
    ``[0, Hp - wh)``, ``[Hp - wh, Hp - sh)``, ``[Hp - sh, Hp)``; an axis without shift is one band.
    """
    rows = _shift_regions(padded[0], window[0], shift[0], device)
    cols = _shift_regions(padded[1], window[1], shift[1], device)
    label = (rows[:, None] * 3 + cols[None, :]).to(dtype)[None, :, :, None]
    lw = windows(label, window)[0, :, :, 0]  # (n_windows, N)
    same = lw[:, :, None] == lw[:, None, :]
    return torch.zeros(same.shape, device=device, dtype=dtype).masked_fill(~same, SHIFT_MASK_VALUE)


def to_windows(x: Tensor, wh: int, ww: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, wh * ww, C): :func:`windows` with the batch and window axes merged."""
    return windows(x, (wh, ww)).flatten(0, 1)


def from_windows(flat: Tensor, b: int, h: int, w: int, wh: int, ww: int) -> Tensor:
    """The inverse of :func:`to_windows`: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    return unwindows(flat.reshape(b, -1, *flat.shape[1:]), (wh, ww), h, w)


def shift_window_mask(h: int, w: int, window: int, shift: int, device=None, dtype=torch.float32) -> Tensor:
    """:func:`shift_mask` for a square ``window`` and ``shift`` on an (h, w) map."""
    return shift_mask((h, w), (window, window), (shift, shift), torch.device("cpu") if device is None else device, dtype)
