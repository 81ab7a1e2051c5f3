"""HaloNet's blocked attention with a halo (catalog L6)."""

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
class HaloMask(masks.MaskMod):
    """HaloNet's pattern over flattened N-D tokens: a query block sees its block plus a halo.

    Per axis (size L, block b, halo h), query c is in block ``c // b`` covering
    ``[start, start + b)``, ``start = (c // b) * b``; it sees the keys in
    ``[start - h, start + b + h)`` that exist (the image border is not padded with zero keys).
    """

    shape: tuple[int, ...]
    block: tuple[int, ...]
    halo: tuple[int, ...]
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = None
        stride = 1
        for axis in reversed(range(len(self.shape))):
            size, blk, halo = self.shape[axis], self.block[axis], self.halo[axis]
            cq, ck = (q_idx // stride) % size, (kv_idx // stride) % size
            stride *= size
            start = (cq // blk) * blk
            here = (ck >= start - halo) & (ck < start + blk + halo)
            ok = here if ok is None else ok & here
        return ok


#: Why key padding is refused on 1D sequences (2D/3D: pads masked out of each block's keys).
_PAD_1D = (
    "blocks are laid from the first position of the padded sequence, so pads before a sequence "
    "move its blocks and halos away from where they would be alone; pad 2D/3D grids, or run 1D "
    "sequences unpadded"
)

HALO_PARAMS = (
    Param("block_size", None, "query block size per axis (int or tuple); the last block may be shorter", ints_per_axis(1), (None, 0, "8", 2.5), "int | tuple"),
    Param("halo_size", None, "keys beyond the block on each side, per axis (HaloNet's h)", ints_per_axis(0), (None, -1, "3"), "int | tuple"),
    key_padding_param(_PAD_1D),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _halo_mask(q: Tensor, k: Tensor, *, block_size: Any, halo_size: Any) -> HaloMask:
    shape = tuple(q.shape[2:-1])
    n = len(shape)
    return HaloMask(shape, per_axis(block_size, n, int), per_axis(halo_size, n, int))


def _halo_windows(x: Tensor, pattern: HaloMask) -> Tensor:
    """(B, H, *S, D) -> (B * n_blocks, H, prod(block + 2 halo), D): each block's keys (timm's unfold)."""
    n = len(pattern.shape)
    pads = []
    for size, blk, halo in zip(reversed(pattern.shape), reversed(pattern.block), reversed(pattern.halo)):
        pads += [halo, -(-size // blk) * blk - size + halo]
    x = torch.nn.functional.pad(x, [0, 0] + pads)
    for axis, (blk, halo) in enumerate(zip(pattern.block, pattern.halo)):
        x = x.unfold(2 + axis, blk + 2 * halo, blk)  # (B, H, n_0.., D, w_0..)
    h = x.shape[1]
    x = x.permute(0, *range(2, 2 + n), 1, *range(3 + n, 3 + 2 * n), 2 + n)  # (B, n.., H, w.., D)
    return x.reshape(-1, h, math.prod(x.shape[2 + n : 2 + 2 * n]), x.shape[-1])


def _halo_sdpa(q, k, v, *, block_size, halo_size, scale, return_lse, key_padding_mask=None):
    """HaloNet's recipe: blocked queries, each block's keys unfolded with the halo, one masked SDPA."""
    pattern = _halo_mask(q, k, block_size=block_size, halo_size=halo_size)
    splits = _window_splits(pattern.shape, pattern.block)
    qb = _split_groups(_pad_to(q, [o * i for o, i in splits]), splits, group_is_inner=False)
    kb, vb = _halo_windows(k, pattern), _halo_windows(v, pattern)
    real = _halo_windows(torch.ones(1, 1, *pattern.shape, 1, device=q.device), pattern)[:, 0, :, 0] > 0.5  # (n_blocks, W)
    unpadded = None if key_padding_mask is None else _halo_windows(unpadded_keys(key_padding_mask, k), pattern)[:, 0, :, 0] > 0.5
    out = _attend_groups(qb, kb, vb, real[:, None, :], q.shape[0], scale, unpadded)  # beyond the border is no key
    return _crop(_merge_groups(out, splits, False, q.shape[0]), pattern.shape)


def _halo_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:  # plain: HaloNet's 8x8 blocks with a halo of 3
        return {"block_size": tuple(min(8, s) for s in p.q_shape), "halo_size": 3}
    params: dict[str, Any] = {
        "block_size": tuple(rng.randrange(1, s + 2) for s in p.q_shape),
        "halo_size": tuple(rng.randrange(0, 4) for _ in p.q_shape),
    }
    if rng.random() < 0.3:
        params["return_lse"] = True
    if len(p.kv_shape) > 1:  # refused on 1D sequences
        pad = sample_padding(p, rng)
        if pad is not None:
            params["key_padding_mask"] = pad
    return params


HALO = register(
    Mechanism(
        name="halo",
        family="local",
        catalog=("L6",),
        paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (HaloNet, Vaswani et al., 2021), Sec. 2.2",
        formula="out_x = sum_{y within halo h of x's block} softmax_y(scale q_x.k_y) v_y",
        cost="O(N * prod(block_size + 2 halo_size) * D) time and memory (sdpa over blocks)",
        summary="HaloNet blocked local attention over 1-3 axes: query blocks, keys from the block plus a halo",
        patterns=frozenset({"noncausal_self"}),
        params=HALO_PARAMS,
        spatial_dims=(1, 2, 3),
        gqa=True,
        sample_params=_halo_sample_params,
        check_params=_check_self,
    )
)
_add_pattern_backends(HALO, _halo_mask, flex=True)
def _halo_sdpa_accepts(p: Problem, params: dict) -> Optional[str]:
    n = len(p.q_shape)
    pattern = HaloMask(tuple(p.q_shape), per_axis(params["block_size"], n, int), per_axis(params["halo_size"], n, int))
    blocks = math.prod(-(-size // b) for size, b in zip(pattern.shape, pattern.block))
    grouped = blocks * math.prod(pattern.block) * math.prod(b + 2 * h for b, h in zip(pattern.block, pattern.halo))
    return _no_lse(p, params) or grouped_sdpa_waste(p, pattern, grouped)


HALO.implementation("sdpa", accepts=_halo_sdpa_accepts, priority=50)(_halo_sdpa)


def halo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: Any,
    halo_size: Any,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """HaloNet attention (catalog L6): blocked queries, keys from the block and a halo around it.

    Per axis the queries are cut into blocks of ``block_size`` (the last may be shorter); a query
    in the block ``[s, s + b)`` attends the keys in ``[s - h, s + b + h)`` that exist::

        out_x = sum_{y in halo(block(x))} softmax_y(scale * q_x . k_y) v_y

    HaloNet pads the image border with zero keys; here keys beyond the border do not exist
    (exact masking), so a border block attends fewer keys.

    Args:
        q, k, v: (B, H, *spatial, D), 1-3 spatial axes, k/v may have fewer heads (GQA).
        block_size: int or one per axis. halo_size: int or one per axis (>= 0).
        key_padding_mask: (B, Nk) or (B, *spatial) bool, True = ignore that key (2D/3D only):
            pads are masked out of every block's keys they fall in, the partition is unchanged (a
            query left with no key outputs 0). Refused on 1D sequences: blocks are laid from the first position of the padded sequence, so pads before a sequence move its blocks and halos.
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, H, *spatial).
        backend: ``sdpa`` (keys unfolded per block + one SDPA), ``tiled`` (LSE), ``flex`` (FlexAttention:
            the LSE with gradients on CUDA) or ``reference``.

    Cost: O(N * prod(block_size + 2 * halo_size) * D). Paper: HaloNet, Sec. 2.2.

    Example::

        >>> x = torch.randn(2, 4, 32, 32, 32)
        >>> out = halo_attention(x, x, x, block_size=8, halo_size=3)
    """
    return HALO(q, k, v, backend=backend, block_size=block_size, halo_size=halo_size, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


HALO.function = halo_attention
