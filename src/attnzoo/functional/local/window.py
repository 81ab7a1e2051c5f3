"""Blocked window attention with Swin's shifted windows (catalog L3)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ..._validate import per_axis
from ...registry import Mechanism, Param, Problem, flag, positive_number, register
from ._shared import (
    _attend_groups,
    _crop,
    _no_lse,
    grouped_sdpa_waste,
    _check_self,
    _add_pattern_backends,
    ints_per_axis,
    _pad_to,
    _split_groups,
    _merge_groups,
    _window_splits,
    key_padding_param,
    sample_padding,
    unpadded_keys,
)


@dataclass(frozen=True)
class WindowMask(masks.MaskMod):
    """Swin's (shifted) window attention over flattened N-D tokens as a mask predicate.

    Per axis (size L, window w, shift s), the axis is padded to ``L_p = ceil(L / w) * w`` and
    rolled by ``-s``: a token at c sits at ``c' = (c - s) mod L_p``. Two tokens attend each other
    when they share the window ``c' // w`` and, when shifted, the region of Swin's shift mask
    (``c'`` in ``[0, L_p - w)``, ``[L_p - w, L_p - s)`` or ``[L_p - s, L_p)``) on every axis.
    Padding tokens are not keys at all (Swin's code attends its zero padding; the issue asks
    for it masked).
    """

    shape: tuple[int, ...]
    window: tuple[int, ...]
    shift: tuple[int, ...]
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = None
        stride = 1
        for axis in reversed(range(len(self.shape))):
            size, w, s = self.shape[axis], self.window[axis], self.shift[axis]
            padded = -(-size // w) * w
            pq = ((q_idx // stride) % size - s) % padded
            pk = ((kv_idx // stride) % size - s) % padded
            stride *= size
            here = (pq // w) == (pk // w)
            if s:
                here = here & (_swin_region(pq, padded, w, s) == _swin_region(pk, padded, w, s))
            ok = here if ok is None else ok & here
        return ok


def _swin_region(p: Tensor, padded: int, w: int, s: int) -> Tensor:
    return (p >= padded - w).long() + (p >= padded - s).long()


def _check_window_shift(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    n = len(p.q_shape)
    window, shift = per_axis(bound["window_size"], n, int), per_axis(bound["shift_size"], n, int)
    for axis, (w, s) in enumerate(zip(window, shift)):
        if s >= w:
            return "shift_size", f"must be smaller than window_size on each axis (Swin uses window_size // 2): axis {axis} has {s} >= {w}"
    return _check_self(bound, p)


#: Why key padding is refused on 1D sequences (2D/3D: pads masked out of each window).
_PAD_1D = (
    "Swin's windows (and their shift) are laid over the padded length N, so a padded sequence is "
    "not partitioned as it would be alone; pad 2D/3D grids, or run 1D sequences unpadded"
)

WINDOW_PARAMS = (
    Param("window_size", None, "window size per axis (int or tuple); inputs are padded to a multiple, padding masked", ints_per_axis(1), (None, 0, "7", 1.5), "int | tuple"),
    Param("shift_size", 0, "Swin's cyclic shift per axis (< window_size; Swin uses window_size // 2)", ints_per_axis(0), (-1, "3", 0.5), "int | tuple"),
    key_padding_param(_PAD_1D),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _window_mask(q: Tensor, k: Tensor, *, window_size: Any, shift_size: Any) -> WindowMask:
    shape = tuple(q.shape[2:-1])
    n = len(shape)
    return WindowMask(shape, per_axis(window_size, n, int), per_axis(shift_size, n, int))


def _to_windows(x: Tensor, pattern: WindowMask) -> Tensor:
    """(B, H, *S, D) -> (B * n_windows, H, prod(window), D): pad, roll by -shift, partition (Swin)."""
    splits = _window_splits(pattern.shape, pattern.window)
    x = _pad_to(x, [o * i for o, i in splits])
    if any(pattern.shift):
        x = torch.roll(x, shifts=[-s for s in pattern.shift], dims=list(range(2, 2 + len(splits))))
    return _split_groups(x, splits, group_is_inner=False)


def _from_windows(x: Tensor, pattern: WindowMask, batch: int) -> Tensor:
    splits = _window_splits(pattern.shape, pattern.window)
    x = _merge_groups(x, splits, False, batch)
    if any(pattern.shift):
        x = torch.roll(x, shifts=list(pattern.shift), dims=list(range(2, 2 + len(splits))))
    return _crop(x, pattern.shape)


def _window_keys(pattern: WindowMask, device: torch.device) -> Tensor:
    """(n_windows, W, W) bool: which keys of a window each query sees (shift regions, padding)."""
    splits = _window_splits(pattern.shape, pattern.window)
    # real tokens vs padding: a ones tensor through the same pad, roll and partition as q, k, v
    real_w = _to_windows(torch.ones(1, 1, *pattern.shape, 1, device=device), pattern)[:, 0, :, 0] > 0.5
    # Swin's shift-region labels live in the rolled frame: partition them without a roll
    region = torch.zeros([count * w for count, w in splits], dtype=torch.long, device=device)
    for axis, ((count, w), s) in enumerate(zip(splits, pattern.shift)):
        if s:
            c = torch.arange(count * w, device=device).view([-1 if a == axis else 1 for a in range(len(splits))])
            region = region * 3 + _swin_region(c, count * w, w, s)
    region_w = _split_groups(region[None, None, ..., None], splits, group_is_inner=False)[:, 0, :, 0]
    seen = (region_w[:, :, None] == region_w[:, None, :]) & real_w[:, None, :]
    # a padding query sees itself so that no row is empty (its output is cropped away)
    return seen | torch.diag_embed(~real_w)


def _win_sdpa(q, k, v, *, window_size, shift_size, scale, return_lse, key_padding_mask=None):
    """Swin's recipe: pad, roll, partition into windows, one SDPA over all windows with the shift mask."""
    pattern = _window_mask(q, k, window_size=window_size, shift_size=shift_size)
    qw, kw, vw = (_to_windows(x, pattern) for x in (q, k, v))
    unpadded = None if key_padding_mask is None else _to_windows(unpadded_keys(key_padding_mask, k), pattern)[:, 0, :, 0] > 0.5
    out = _attend_groups(qw, kw, vw, _window_keys(pattern, q.device), q.shape[0], scale, unpadded)
    return _from_windows(out, pattern, q.shape[0])


def _win_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:  # plain: 7 per axis (or the axis), no shift
        return {"window_size": tuple(min(7, s) for s in p.q_shape)}
    window = tuple(rng.randrange(1, s + 2) for s in p.q_shape)  # may exceed the axis: padded
    shift = tuple(rng.randrange(0, w) if rng.random() < 0.6 else 0 for w in window)
    params: dict[str, Any] = {"window_size": window, "shift_size": shift}
    if rng.random() < 0.3:
        params["return_lse"] = True
    if len(p.kv_shape) > 1:  # refused on 1D sequences
        pad = sample_padding(p, rng)
        if pad is not None:
            params["key_padding_mask"] = pad
    return params


WINDOW = register(
    Mechanism(
        name="window",
        family="local",
        catalog=("L3",),
        paper="Swin Transformer (Liu et al., 2021), Sec. 3.2 and its shifted-window masking; 3D windows as in DiT-3D",
        formula="out_x = sum_{y in the same (shifted) window and shift region} softmax_y(scale q_x.k_y) v_y",
        cost="O(N * prod(window_size) * D) time; O(N * prod(window_size)) memory (sdpa over windows)",
        summary="blocked window attention over 1-3 axes with Swin's shifted windows; sizes padded, padding masked",
        patterns=frozenset({"noncausal_self"}),
        params=WINDOW_PARAMS,
        spatial_dims=(1, 2, 3),
        gqa=True,
        sample_params=_win_sample_params,
        check_params=_check_window_shift,
    )
)
_add_pattern_backends(WINDOW, _window_mask, flex=True)
def _win_sdpa_accepts(p: Problem, params: dict) -> Optional[str]:
    pattern = WindowMask(tuple(p.q_shape), per_axis(params["window_size"], len(p.q_shape), int), per_axis(params["shift_size"], len(p.q_shape), int))
    grouped = math.prod(-(-size // w) * w for size, w in zip(pattern.shape, pattern.window)) * math.prod(pattern.window)
    return _no_lse(p, params) or grouped_sdpa_waste(p, pattern, grouped)


WINDOW.implementation("sdpa", accepts=_win_sdpa_accepts, priority=50)(_win_sdpa)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: Any,
    shift_size: Any = 0,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Blocked window attention with Swin's shifted windows (catalog L3), over 1-3 axes.

    The spatial axes are padded to a multiple of ``window_size`` and cyclically shifted by
    ``-shift_size``; each token attends the tokens of its window that lie in the same region of
    Swin's shift mask (so a shifted window never mixes tokens that were far apart), and never
    the padding. ``shift_size=0`` is plain blocked (non-overlapping window) attention.

        out_x = sum_{y in window(x), region(y) = region(x)} softmax_y(scale * q_x . k_y) v_y

    Args:
        q, k, v: (B, H, *spatial, D), 1-3 spatial axes, k/v may have fewer heads (GQA).
        window_size: int or one per axis (larger than an axis: that axis is one padded window).
        shift_size: int or one per axis, each < window_size (Swin alternates 0 and window // 2).
        key_padding_mask: (B, Nk) or (B, *spatial) bool, True = ignore that key (2D/3D only):
            pads are masked out of every window they fall in, the partition is unchanged (a
            query left with no key outputs 0). Refused on 1D sequences: Swin's windows and shift are laid over the padded length N, so a shorter sequence alone is partitioned differently.
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, H, *spatial).
        backend: ``sdpa`` (Swin's pad/roll/partition + one SDPA), ``tiled`` (LSE), ``flex``
            (FlexAttention: the LSE with gradients on CUDA) or ``reference``.

    Differences from Swin's code: masking is exact (-inf, Swin adds -100) and padding is masked.
    Cost: O(N * prod(window_size) * D). Paper: Swin Transformer, Sec. 3.2.

    Example::

        >>> x = torch.randn(2, 4, 56, 56, 32)  # (B, H, height, width, D)
        >>> out = window_attention(x, x, x, window_size=7, shift_size=3)
    """
    return WINDOW(q, k, v, backend=backend, window_size=window_size, shift_size=shift_size, key_padding_mask=key_padding_mask,
        scale=scale, return_lse=return_lse,
    )


WINDOW.function = window_attention
