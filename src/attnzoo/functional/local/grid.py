"""MaxViT's grid attention (catalog L4)."""

from __future__ import annotations

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
    _check_self,
    _add_pattern_backends,
    _pad_to,
    _split_groups,
    _merge_groups,
    key_padding_param,
    sample_padding,
    unpadded_keys,
)


@dataclass(frozen=True)
class GridMask(masks.MaskMod):
    """MaxViT's grid attention over flattened N-D tokens as a mask predicate.

    Per axis of size L with grid g, the axis is padded to a multiple of g and cut into g strips
    of ``stride = ceil(L / g)``; a group holds the g tokens (one per strip) at the same offset
    ``c % stride``, spaced ``stride`` apart. Tokens attend the members of their group (on every
    axis); padding is never a key.
    """

    shape: tuple[int, ...]
    grid: tuple[int, ...]
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = None
        stride_flat = 1
        for axis in reversed(range(len(self.shape))):
            size, g = self.shape[axis], self.grid[axis]
            stride = -(-size // g)
            cq, ck = (q_idx // stride_flat) % size, (kv_idx // stride_flat) % size
            stride_flat *= size
            here = (cq % stride) == (ck % stride)
            ok = here if ok is None else ok & here
        return ok


def _grid_splits(shape: tuple[int, ...], grid: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(g, -(-size // g)) for size, g in zip(shape, grid)]


def _check_grid_size(value: Any, p: Problem) -> Optional[str]:
    n = len(p.q_shape)
    sizes = per_axis(value, n, int)
    if sizes is None or any(g < 1 for g in sizes):
        return f"a positive int or a tuple of {n} (one per spatial axis)"
    if any(g > size for g, size in zip(sizes, p.q_shape)):
        return f"at most the axis size on each axis {tuple(p.q_shape)} (a group takes one token per strip)"
    return None


#: Why key padding is refused on 1D sequences (2D/3D: pads masked out of each group).
_PAD_1D = (
    "a group's stride ceil(N / grid_size) is set by the padded length N, so a padded sequence is "
    "not grouped as it would be alone; pad 2D/3D grids, or run 1D sequences unpadded"
)

GRID_PARAMS = (
    Param("grid_size", None, "tokens per group along each axis (MaxViT's G), spaced size // G apart", _check_grid_size, (None, 0, "7", 10**6), "int | tuple"),
    key_padding_param(_PAD_1D),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _grid_mask(q: Tensor, k: Tensor, *, grid_size: Any) -> GridMask:
    shape = tuple(q.shape[2:-1])
    return GridMask(shape, per_axis(grid_size, len(shape), int))


def _grid_sdpa(q, k, v, *, grid_size, scale, return_lse, key_padding_mask=None):
    """MaxViT's grid partition (timm's grid_partition): pad, group by offset, one SDPA over the groups."""
    pattern = _grid_mask(q, k, grid_size=grid_size)
    splits = _grid_splits(pattern.shape, pattern.grid)
    padded = [g * s for g, s in splits]
    qg, kg, vg = (_split_groups(_pad_to(x, padded), splits, group_is_inner=True) for x in (q, k, v))
    # padding is no key; a padded query sees itself so that no row is empty (it is cropped away)
    real = _pad_to(torch.ones(1, 1, *pattern.shape, 1, device=q.device), padded)
    real_g = _split_groups(real, splits, group_is_inner=True)[:, 0, :, 0] > 0.5  # (groups, members)
    keys = real_g[:, None, :] | torch.diag_embed(~real_g)
    unpadded = None
    if key_padding_mask is not None:
        unpadded = _split_groups(_pad_to(unpadded_keys(key_padding_mask, k), padded), splits, group_is_inner=True)[:, 0, :, 0] > 0.5
    out = _attend_groups(qg, kg, vg, keys, q.shape[0], scale, unpadded)
    return _crop(_merge_groups(out, splits, True, q.shape[0]), pattern.shape)


def _grid_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:  # plain: MaxViT's 7 (or the axis)
        return {"grid_size": tuple(min(7, s) for s in p.q_shape)}
    params: dict[str, Any] = {"grid_size": tuple(rng.randrange(1, s + 1) for s in p.q_shape)}
    if rng.random() < 0.3:
        params["return_lse"] = True
    if len(p.kv_shape) > 1:  # refused on 1D sequences
        pad = sample_padding(p, rng)
        if pad is not None:
            params["key_padding_mask"] = pad
    return params


GRID = register(
    Mechanism(
        name="grid",
        family="local",
        catalog=("L4",),
        paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., 2022), Sec. 3.1 (grid attention)",
        formula="out_x = sum_{y: y = x mod stride on every axis} softmax_y(scale q_x.k_y) v_y, stride = ceil(size / grid)",
        cost="O(N * prod(grid_size) * D) time; O(N * prod(grid_size)) memory (sdpa over groups)",
        summary="MaxViT grid (dilated global) attention over 1-3 axes; sizes padded, padding masked",
        patterns=frozenset({"noncausal_self"}),
        params=GRID_PARAMS,
        spatial_dims=(1, 2, 3),
        gqa=True,
        sample_params=_grid_sample_params,
        check_params=_check_self,
    )
)
_add_pattern_backends(GRID, _grid_mask, flex=True)
GRID.implementation("sdpa", accepts=_no_lse, priority=50)(_grid_sdpa)


def grid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    grid_size: Any,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """MaxViT grid attention (catalog L4): sparse global attention over a dilated grid.

    Each axis (size L) is cut into ``grid_size`` strips of ``stride = ceil(L / grid_size)``
    tokens (padded at the end when L is not a multiple); a group holds the tokens at the same
    offset in every strip, i.e. ``grid_size`` tokens per axis spaced ``stride`` apart, and each
    token attends its group::

        out_x = sum_{y : y_a = x_a (mod stride_a) for every axis a} softmax_y(scale * q_x . k_y) v_y

    MaxViT alternates this with window attention (``window_attention``, its block attention).

    Args:
        q, k, v: (B, H, *spatial, D), 1-3 spatial axes, k/v may have fewer heads (GQA).
        grid_size: int or one per axis (MaxViT uses 7), at most the axis size.
        key_padding_mask: (B, Nk) or (B, *spatial) bool, True = ignore that key (2D/3D only):
            pads are masked out of every group they fall in, the partition is unchanged (a
            query left with no key outputs 0). Refused on 1D sequences: a group's stride ceil(N / grid_size) is set by the padded length N, so a padded sequence is grouped differently from the sequence alone.
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, H, *spatial).
        backend: ``sdpa`` (timm's grid partition + one SDPA), ``tiled`` (LSE), ``flex`` (FlexAttention:
            the LSE with gradients on CUDA) or ``reference``.

    Cost: O(N * prod(grid_size) * D). Paper: MaxViT, Sec. 3.1.

    Example::

        >>> x = torch.randn(2, 4, 56, 56, 32)
        >>> out = grid_attention(x, x, x, grid_size=7)  # 7x7 tokens per group, 8 apart
    """
    return GRID(q, k, v, backend=backend, grid_size=grid_size, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


GRID.function = grid_attention
