"""Neighborhood attention 1D/2D/3D with NATTEN semantics (catalog L1).

Each query attends the ``prod(kernel_size)`` keys of a window around it (Hassani et al.: NAT,
DiNAT, Faster NA, Generalized NA). Per axis the window is a function of the query's coordinate
alone (:func:`_window`); the predicate :class:`NeighborhoodMask` (the spec, read by the
reference, ``tiled`` and ``flex``) and :func:`neighbor_table` (each query's keys as an
``(N, K)`` index, for gather kernels) both derive from it. The optional relative positional
bias ``rpb`` (NAT/DiNAT, NATTEN <= 0.17) is a score_mod; the tiled engine differentiates a
score_mod in the score only, so :class:`_RpbGradient` supplies the table's gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...errors import ParameterError
from ...kernels.gathered import NeighborTable, gathered_attention, native_usable
from ...kernels import block_sparse
from ...kernels.flex import FLEX_CAPABILITIES, decline_reason as flex_decline_reason, flex_forward
from ...kernels.reference import default_scale, materialized_attention
from ...kernels.tiled import tiled_attention
from ..._validate import per_axis
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from ._shared import (
    _KeepKeys,
    _check_self,
    _flat,
    _result,
    _unflat,
    flat_padding,
    ints_per_axis,
    key_padding_param,
    key_spans,
    no_padding,
    sample_padding,
)

__all__ = ["NeighborhoodMask", "neighbor_table", "neighborhood_attention", "NEIGHBORHOOD"]


# --------------------------------------------------------------------------------------------
# the window of one axis
# --------------------------------------------------------------------------------------------
def _group_len(size: int, group: Tensor, dilation: int) -> Tensor:
    """Tokens in dilation group ``group`` of an axis of ``size``: ceil((size - group) / dilation)."""
    return (size - group + dilation - 1) // dilation


def _window(place: Tensor, group_len: Tensor, kernel: int, stride: int, causal: bool) -> tuple[Tensor, Tensor]:
    """``(first, last)`` place (inclusive) of the keys a query at ``place`` sees, within its dilation group.

    A stride group (``stride`` consecutive places) shares its leader's window (NATTEN >= 0.20,
    GNA). Non-causal: the leader is the group's centre place (right of centre for an even
    stride), clipped to the group's last; the window holds ``kernel // 2`` places before the
    leader and ``kernel - 1 - kernel // 2`` after it, shifted inward at the borders so it always
    holds ``kernel`` places. Causal: the leader is the group's last place (clipped); the window
    starts ``kernel - 1`` before it and ends at the query itself, so it never reaches the future.
    """
    if causal:
        leader = torch.minimum((place // stride) * stride + stride - 1, group_len - 1)
        return (leader - kernel + 1).clamp(min=0), place
    leader = torch.minimum((place // stride) * stride + stride // 2, group_len - 1)
    first = torch.minimum((leader - kernel // 2).clamp(min=0), group_len - kernel)
    return first, first + kernel - 1


# --------------------------------------------------------------------------------------------
# the pattern as a predicate
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeighborhoodMask(masks.MaskMod):
    """Neighborhood attention over flattened (row-major) N-D tokens as a mask predicate.

    Per axis of size L with kernel k, dilation d and stride s: a token's dilation group is
    ``c % d`` and its place in the group ``p = c // d``. A query sees the keys of its group
    whose place lies in its window (:func:`_window`): ``[f, f + k)`` with
    ``f = clamp(leader - k // 2, 0, L_g - k)`` (``L_g`` the group's length, ``leader`` the
    centre of p's stride group; ``leader = p`` for s = 1), or ``[max(leader - k + 1, 0), p]``
    on a causal axis (``leader`` the last of the stride group). A key is seen when every axis
    agrees.
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]
    cacheable = True

    def _coords(self, flat: Tensor) -> list[Tensor]:
        """Row-major coordinates of flat token indices, one tensor per axis."""
        coords, step = [], 1
        for size in reversed(self.shape):
            coords.append((flat // step) % size)
            step *= size
        return coords[::-1]

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = None
        for axis, (cq, ck) in enumerate(zip(self._coords(q_idx), self._coords(kv_idx))):
            here = self.axis_allows(axis, cq, ck, self.shape[axis])
            ok = here if ok is None else ok & here
        return ok

    def axis_allows(self, axis: int, cq: Tensor, ck: Tensor, size: Any) -> Tensor:
        """Whether coordinate ``ck`` is in the window of ``cq`` on ``axis`` of ``size`` tokens
        (an int, or a tensor of per-sequence lengths that broadcasts against the coordinates)."""
        d = self.dilation[axis]
        group = cq % d
        first, last = _window(cq // d, _group_len(size, group, d), self.kernel_size[axis], self.stride[axis], self.causal[axis])
        pk = ck // d
        return (ck % d == group) & (pk >= first) & (pk <= last)

    @property
    def rpb_shape(self) -> tuple[int, ...]:
        """Per-axis sizes of a relative positional bias table: 2k - 1 offsets per axis."""
        return tuple(2 * k - 1 for k in self.kernel_size)

    def bias_index(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """Flat index into the (row-major) rpb table of each pair: per axis ``p_key - p_query + k - 1``.

        Meaningful for pairs inside the pattern (there it lies in ``[0, 2k - 1)``); clamped into
        the table elsewhere, so that masked pairs index safely.
        """
        flat = None
        for axis, (cq, ck) in enumerate(zip(self._coords(q_idx), self._coords(kv_idx))):
            d, k = self.dilation[axis], self.kernel_size[axis]
            offset = (ck // d - cq // d + k - 1).clamp(0, 2 * k - 2)
            flat = offset if flat is None else flat * (2 * k - 1) + offset
        return flat


@dataclass(frozen=True, eq=False)
class _RelativePositionBias(masks.ScoreMod):
    """``score + table[h, pattern.bias_index(q, kv)]``: NAT's relative positional bias as a score_mod."""

    table: Tensor  # (H, prod(2k - 1)): one flattened table per query head
    pattern: NeighborhoodMask

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + self.table.to(score.dtype)[h, self.pattern.bias_index(q_idx, kv_idx)]


@dataclass(frozen=True, eq=False)
class _SpanNeighborhood(masks.MaskMod):
    """1D neighborhood attention placed on each sequence's real keys, as if it ran alone.

    Entry b's real keys span ``[first_b, first_b + length_b)``; coordinates count from
    ``first_b`` and the windows shift inward at that span's borders (NATTEN's rule for a
    sequence of ``length_b`` tokens). Query rows outside the span see no key (output 0).
    """

    base: NeighborhoodMask
    first: Tensor  # (B,) long
    length: Tensor  # (B,) long
    batch_head_dependent = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        first, length = self.first[b], self.length[b]
        cq, ck = q_idx - first, kv_idx - first
        return (cq >= 0) & (cq < length) & self.base.axis_allows(0, cq, ck, length)

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> masks.TileGrid:
        """Visit a tile pair when the key tile meets the keys some query of the tile reaches, in
        some sequence: O(B * N); no tile is reported full (the engine masks every visited one)."""
        visit = torch.zeros(len(qf), len(kf), dtype=torch.bool)
        for first, length in zip(self.first.tolist(), self.length.tolist()):
            if length == 0:
                continue
            index, _ = _pattern_table(dataclasses.replace(self.base, shape=(length,)), None)
            reach = torch.where(index >= 0, index, length)
            lo = reach.min(dim=1).values + first
            hi = torch.where(index >= 0, index, -1).max(dim=1).values + first
            tile = torch.bucketize(torch.arange(first, first + length), qf, right=True) - 1
            lo_t = torch.full((len(qf),), 1 << 62).scatter_reduce(0, tile, lo, "amin")
            hi_t = torch.full((len(qf),), -1).scatter_reduce(0, tile, hi, "amax")
            visit |= (kf[None, :] <= hi_t[:, None]) & (kl[None, :] >= lo_t[:, None])
        return visit, torch.zeros_like(visit)


# --------------------------------------------------------------------------------------------
# the pattern as a neighbour table
# --------------------------------------------------------------------------------------------
def _axis_neighbors(size: int, kernel: int, dilation: int, stride: int, causal: bool, device: Any) -> tuple[Tensor, Tensor]:
    """One axis: ``(key, offset)``, each (size, kernel): the coordinate of the key in window slot t
    of each query coordinate and its rpb offset ``p_key - p_query + kernel - 1``; -1 in the slots
    past the end of a causal window."""
    coord = torch.arange(size, device=device)
    group, place = coord % dilation, coord // dilation
    first, last = _window(place, _group_len(size, group, dilation), kernel, stride, causal)
    slot = first[:, None] + torch.arange(kernel, device=device)  # the window's places, in order
    inside = slot <= last[:, None]
    key = torch.where(inside, slot * dilation + group[:, None], -1)
    offset = torch.where(inside, slot - place[:, None] + kernel - 1, -1)
    return key, offset


def _combine_axes(axes: list[tuple[Tensor, Tensor]], shape: tuple[int, ...], kernel_size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per-axis ``(key, offset)`` tables -> flat ``(index, rel)``, (N, K), by broadcasting.

    Query axes come first and window slots second, both row-major, so row n is the n-th
    flattened query and column t the t-th slot of the kernel grid.
    """
    n = len(axes)
    index = rel = inside = None
    token_step = table_step = 1
    for axis in reversed(range(n)):
        key, offset = axes[axis]
        view = [1] * (2 * n)
        view[axis], view[n + axis] = key.shape
        key, offset = key.view(view), offset.view(view)
        here = key >= 0
        index = key * token_step if index is None else index + key * token_step
        rel = offset * table_step if rel is None else rel + offset * table_step
        inside = here if inside is None else inside & here
        token_step *= shape[axis]
        table_step *= 2 * kernel_size[axis] - 1
    rows, slots = math.prod(a[0].shape[0] for a in axes), math.prod(kernel_size)
    index = torch.where(inside, index, -1).reshape(rows, slots)
    rel = torch.where(inside, rel, -1).reshape(rows, slots)
    return index, rel


def neighbor_table(
    shape: Any, kernel_size: Any, dilation: Any = 1, stride: Any = 1, causal: Any = False, *, device: Any = None
) -> tuple[Tensor, Tensor]:
    """Each query's neighbourhood as an index table: ``(index, rel)``, both (N, K) int64.

    ``N = prod(shape)`` queries in row-major order, ``K = prod(kernel_size)`` window slots in
    row-major order of the kernel grid. ``index[n, t]`` is the flat (row-major) index of the key
    in slot t of query n's window; on an axis whose window starts at place ``f`` (see
    :func:`neighborhood_attention`), slot ``t`` holds the key at place ``f + t`` of the query's
    dilation group. ``rel[n, t]`` is the flat index of the pair into one head's flattened rpb
    table of shape ``(2k_1 - 1, ..., 2k_n - 1)`` (per axis ``p_key - p_query + k - 1``).
    Both are -1 in the slots a causal window does not reach (a causal axis gives the query at
    place p only ``p - f + 1`` keys, fewer than k near the start); non-causal rows are full.
    The set ``{index[n, t] >= 0}`` is exactly the keys :class:`NeighborhoodMask` lets query n
    see; a gather kernel consumes it directly.

    Built per axis ((L, k) tables) and combined by broadcasting: O(N * K) time and memory,
    no N x N tensor. Arguments are as for :func:`neighborhood_attention` (int or per axis).
    """
    return _pattern_table(_checked_pattern(shape, kernel_size, dilation, stride, causal), device)


def _pattern_table(pattern: NeighborhoodMask, device: Any) -> tuple[Tensor, Tensor]:
    """:func:`neighbor_table` of a pattern, unchecked: an axis shorter than its kernel (a short
    padded sequence) gets windows that start before the axis, whose slots there are -1."""
    axes = [
        _axis_neighbors(size, k, d, s, c, device)
        for size, k, d, s, c in zip(pattern.shape, pattern.kernel_size, pattern.dilation, pattern.stride, pattern.causal)
    ]
    return _combine_axes(axes, pattern.shape, pattern.kernel_size)


def _checked_pattern(shape: Any, kernel_size: Any, dilation: Any, stride: Any, causal: Any) -> NeighborhoodMask:
    """The pattern of explicit arguments (neighbor_table's), each checked, errors naming it."""
    shape = tuple(shape)
    n = len(shape)
    if not 1 <= n <= 3 or per_axis(shape, n, int) is None or min(shape) < 1:
        raise ParameterError(f"neighbor_table: shape: expected 1-3 positive ints, got {shape!r}", argument="shape")
    values = {"kernel_size": kernel_size, "dilation": dilation, "stride": stride}
    ints = {name: per_axis(value, n, int) for name, value in values.items()}
    for name, sizes in ints.items():
        if sizes is None or min(sizes) < 1:
            raise ParameterError(f"neighbor_table: {name}: expected a positive int or a tuple of {n}, got {values[name]!r}", argument=name)
    kernel, dil, steps = ints["kernel_size"], ints["dilation"], ints["stride"]
    if any(k * d > size for k, d, size in zip(kernel, dil, shape)):
        message = f"neighbor_table: dilation: kernel_size * dilation must fit shape {shape}, got {kernel} * {dil}"
        raise ParameterError(message, argument="dilation")
    if any(s > k for s, k in zip(steps, kernel)):
        raise ParameterError(f"neighbor_table: stride: expected at most kernel_size {kernel} per axis, got {steps}", argument="stride")
    flags = per_axis(causal, n, bool)
    if flags is None:
        raise ParameterError(f"neighbor_table: causal: expected a bool or a tuple of {n} bools, got {causal!r}", argument="causal")
    return NeighborhoodMask(shape, kernel, dil, steps, flags)


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _check_kernel(value: Any, p: Problem) -> Optional[str]:
    n = len(p.q_shape)
    sizes = per_axis(value, n, int)
    if sizes is None or any(k < 1 for k in sizes):
        return f"a positive int or a tuple of {n} (one per spatial axis)"
    too_big = [i for i, (k, size) in enumerate(zip(sizes, p.q_shape)) if k > size]
    if too_big:
        return f"a kernel no larger than the input on each axis {tuple(p.q_shape)} (axis {too_big[0]})"
    return None


def _check_causal_axes(value: Any, p: Problem) -> Optional[str]:
    n = len(p.q_shape)
    return None if per_axis(value, n, bool) is not None else f"a bool or a tuple of {n} bools"


def _check_rpb(value: Any, p: Problem) -> Optional[str]:
    """Type, device, rank and head count here; the per-axis sizes need kernel_size (check_params)."""
    if value is None:
        return None
    n = len(p.q_shape)
    expected = f"None or a floating tensor of shape (heads={p.q_heads}, {', '.join(['2k-1'] * n)}) on {p.device}"
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device:
        return expected
    return None if value.dim() == 1 + n and value.shape[0] == p.q_heads else expected


def _check_neighborhood(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    n = len(p.q_shape)
    kernel, dilation, stride = (per_axis(bound[name], n, int) for name in ("kernel_size", "dilation", "stride"))
    for axis, (k, d, size) in enumerate(zip(kernel, dilation, p.q_shape)):
        if k * d > size:
            return "dilation", f"kernel_size * dilation must fit the input: axis {axis} has {size} tokens, got {k} * {d}"
    for axis, (k, s) in enumerate(zip(kernel, stride)):
        if s > k:
            return "stride", f"expected at most kernel_size on each axis: axis {axis} has kernel {k}, got stride {s}"
    rpb = bound["rpb"]
    if rpb is not None:
        want = (p.q_heads, *(2 * k - 1 for k in kernel))
        if tuple(rpb.shape) != want:
            return "rpb", f"expected shape {want} (heads, 2 * kernel_size - 1 per axis), got {tuple(rpb.shape)}"
    return _check_self(bound, p)


NEIGHBORHOOD_PARAMS = (
    Param("kernel_size", None, "window size per axis (int or tuple); even sizes allowed", _check_kernel, (None, 0, "3", 10**6, (3, 3, 3, 3)), "int | tuple"),
    Param("dilation", 1, "gap between window keys per axis (DiNAT)", ints_per_axis(1), (0, -2, 1.5), "int | tuple"),
    Param(
        "stride",
        1,
        "per axis: queries in a stride group share one window (GNA); stride = kernel_size is blocked attention",
        ints_per_axis(1),
        (0, -1, 1.5, "2", (1, 1, 1, 1), 10**6),
        "int | tuple",
    ),
    Param("causal", False, "per axis: only keys at or before the query", _check_causal_axes, ("yes", 1, (True,) * 4), "bool | tuple"),
    Param(
        "rpb",
        None,
        "relative positional bias (H, 2k-1 per axis) added to the scores (NAT/DiNAT); differentiable",
        _check_rpb,
        ("table", torch.zeros(5), torch.zeros(4, 12), torch.zeros(4, 13, dtype=torch.long)),
        "Tensor | None",
    ),
    key_padding_param(
        doc="(B, Nk) or (B, *spatial) bool, True = ignore that key; 1D: windows placed on each sequence's real keys (exact per "
        "sequence), 2D/3D: pads masked out of the windows"
    ),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _neighborhood_mask(q: Tensor, *, kernel_size: Any, dilation: Any, stride: Any, causal: Any) -> NeighborhoodMask:
    """The pattern of a call whose parameters the registry has checked."""
    n = q.dim() - 3
    ints = (per_axis(value, n, int) for value in (kernel_size, dilation, stride))
    return NeighborhoodMask(tuple(q.shape[2:-1]), *ints, per_axis(causal, n, bool))


#: Keys per query up to which dispatch prefers the neighbor table to the block-sparse kernel
#: (1D, 2D/3D). Measured (B=1, H=8, D=64, fp32, 2-core AVX-512 EPYC, forward / forward+backward
#: ms, table vs fused): 1D N=4096 63 keys 11.8 / 46.0 vs 14.8 / 45.8, 127: 20.7 / 87.4 vs
#: 14.7 / 45.1; 2D 64x64 13x13: 28.8 / 128 vs 59.6 / 178, 21x21: 68.6 / 319 vs 86.7 / 279,
#: 25x25: 94.6 / 436 vs 105 / 337 (the tiled engine: 2-3x slower than both throughout).
_GATHERED_MAX_SLOTS_1D = 96
_GATHERED_MAX_SLOTS_ND = 400

# --------------------------------------------------------------------------------------------
# the gradient of the rpb table on the tiled engine
# --------------------------------------------------------------------------------------------
#: Gathered key/value elements one chunk of queries may hold in the rpb backward (16M floats).
_GATHER_BUDGET = 1 << 24


def _rpb_table_grad(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    rpb: Tensor,
    pattern: NeighborhoodMask,
    scale: float,
    pad: Optional[Tensor] = None,
    grad_lse: Optional[Tensor] = None,
) -> Tensor:
    """dL/d(rpb): the score gradient ``dS = P * (dP - rowsum(P * dP))`` summed per table entry.

    An additive bias has the score's gradient, so entry r of head h collects dS over the pairs
    whose ``rel`` is r. Each chunk of queries gathers its K neighbour keys and values from
    :func:`neighbor_table` and recomputes ``P = exp(S - lse)`` with the forward's LSE: O(N K D)
    time, O(chunk * K * D) memory. Flat layouts: q (B, H, N, D), k/v (B, Hkv, N, D), lse (B, H, N).
    ``pad`` (B, N) bool: padded keys, whose P is 0. ``grad_lse`` (B, H, N): the gradient of the
    returned LSE, which adds ``g_i P_ij`` to dS (``d lse_i / d s_ij = P_ij``).
    """
    batch, heads, n_tokens, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    table = rpb.detach().to(cdt).reshape(heads, -1)
    grad = torch.zeros_like(table)
    index, rel = _pattern_table(pattern, q.device)
    slots = index.shape[1]
    chunk = max(1, _GATHER_BUDGET // (batch * heads * slots * max(q.shape[-1], v.shape[-1])))
    to_groups = lambda t: t.to(cdt).view(batch, kv_heads, group, *t.shape[2:])  # noqa: E731
    qg, dog, lseg = to_groups(q) * scale, to_groups(grad_out), to_groups(lse)
    glseg = None if grad_lse is None else to_groups(grad_lse.masked_fill(lse == float("-inf"), 0.0))
    kc, vc = k.to(cdt), v.to(cdt)
    for start in range(0, n_tokens, chunk):
        rows = slice(start, min(start + chunk, n_tokens))
        keys, inside, r = index[rows], index[rows] >= 0, rel[rows]
        k_nb, v_nb = kc[:, :, keys.clamp(min=0)], vc[:, :, keys.clamp(min=0)]  # (B, Hkv, C, K, D)
        bias = table[:, r.clamp(min=0)].view(kv_heads, group, *r.shape)
        s = torch.einsum("bhgcd,bhckd->bhgck", qg[:, :, :, rows], k_nb) + bias
        p = torch.exp(s - lseg[:, :, :, rows, None]).masked_fill(~inside, 0.0)
        if pad is not None:  # masked_fill, not a product: exp(s - lse) is inf in a row whose keys are all padded
            p = p.masked_fill(pad[:, keys.clamp(min=0)].view(batch, 1, 1, *keys.shape), 0.0)
        dp = torch.einsum("bhgcd,bhckd->bhgck", dog[:, :, :, rows], v_nb)
        delta = (p * dp).sum(-1, keepdim=True)
        if glseg is not None:
            delta = delta - glseg[:, :, :, rows, None]
        ds = p * (dp - delta)
        grad.index_add_(1, r[inside], ds.sum(0).reshape(heads, *r.shape)[:, inside])
    return grad.view(rpb.shape).to(rpb.dtype)


class _RpbGradient(torch.autograd.Function):
    """Passes ``out`` and ``lse`` through; its backward adds the rpb table's gradient (:func:`_rpb_table_grad`).

    The tiled engine differentiates its score_mod in the score only (the table it captures gets
    no gradient); this node sits on the engine's output, so it sees dL/d(out) first and computes
    the table's share from it, leaving q, k, v to the engine's own backward.
    """

    @staticmethod
    def forward(
        ctx: Any, out: Tensor, rpb: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, pattern: NeighborhoodMask, scale: float,
        pad: Optional[Tensor] = None, spans: Optional[list[tuple[int, int]]] = None,
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(rpb, q, k, v, lse)
        ctx.pattern, ctx.scale, ctx.pad, ctx.spans = pattern, scale, pad, spans
        ctx.set_materialize_grads(False)
        # new tensors: returning the inputs as-is would forbid in-place edits of the result
        return out.clone(), lse.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]) -> tuple[Any, ...]:
        rpb, q, k, v, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        if ctx.spans is None:
            grad = _rpb_table_grad(q, k, v, lse, grad_out, rpb, ctx.pattern, ctx.scale, ctx.pad, grad_lse)
        else:  # 1D padded: each sequence over its own span, as alone (rows outside a span see no key)
            grad = torch.zeros_like(rpb)
            for b, (first, stop) in enumerate(ctx.spans):
                if stop > first:
                    part = dataclasses.replace(ctx.pattern, shape=(stop - first,))
                    rows = (slice(b, b + 1), slice(None), slice(first, stop))
                    pieces = (t[rows] for t in (q, k, v, lse, grad_out))
                    glse = None if grad_lse is None else grad_lse[rows]
                    grad += _rpb_table_grad(*pieces, rpb, part, ctx.scale, ctx.pad[b : b + 1, first:stop], glse)
        return grad_out, grad, None, None, None, grad_lse, None, None, None, None


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _rpb_mod(rpb: Optional[Tensor], pattern: NeighborhoodMask) -> Optional[_RelativePositionBias]:
    return None if rpb is None else _RelativePositionBias(rpb.reshape(rpb.shape[0], -1), pattern)


Padded = tuple[NeighborhoodMask, masks.MaskMod, Optional[Tensor], Optional[list[tuple[int, int]]]]


def _padded_pattern(q: Tensor, key_padding_mask: Optional[Tensor], window: dict) -> Padded:
    """``(pattern, predicate, pad, spans)``: the call's pattern, the predicate the backends mask
    with, the padding as (B, N) and, for a padded 1D batch, each entry's real span.

    2D/3D: pads are masked out of the windows, which stay where they are. 1D: windows are placed
    on each sequence's real keys (:class:`_SpanNeighborhood`), so a batch padded on either side
    equals each sequence alone. One host sync (the spans).
    """
    pattern = _neighborhood_mask(q, **window)
    pad = flat_padding(key_padding_mask, q.shape[0])
    if pad is None or len(pattern.shape) > 1:
        return pattern, pattern, pad, None
    first, stop = key_spans(pad)
    spans = list(zip(first.tolist(), stop.tolist()))
    if all(span == (0, pattern.shape[0]) for span in spans):
        return pattern, pattern, pad, None
    return pattern, _SpanNeighborhood(pattern, first, stop - first), pad, spans


def _reference(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, rpb: Optional[Tensor], key_padding_mask: Optional[Tensor] = None, **window: Any) -> Any:
    """The pattern as a dense mask over materialized scores, rpb as a score_mod: the spec."""
    pattern, predicate, pad, _ = _padded_pattern(q, key_padding_mask, window)
    n = math.prod(pattern.shape)
    allowed = masks.dense_mask(predicate, n, n, batch=q.shape[0], device=q.device)
    if pad is not None:
        allowed = allowed & ~pad.view(q.shape[0], 1, 1, n)
    # rpb reads the key's place relative to the query's: the same on a sequence's span
    out, lse = materialized_attention(_flat(q), _flat(k), _flat(v), scale=scale, allowed=allowed, score_mod=_rpb_mod(rpb, pattern))
    return _unflat(_result(out, lse, return_lse), q, v, return_lse)


def _tiled(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, rpb: Optional[Tensor], key_padding_mask: Optional[Tensor] = None, **window: Any) -> Any:
    """The tiled FA2 engine over the key tiles the pattern touches; rpb's gradient by :class:`_RpbGradient`."""
    pattern, predicate, pad, spans = _padded_pattern(q, key_padding_mask, window)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    n = qf.shape[2]
    plan = masks.plan_for(predicate, n, n, batch=q.shape[0])
    mod = None if rpb is None else _rpb_mod(rpb.detach(), pattern)
    out, lse = tiled_attention(qf, kf, vf, plan=plan, scale=scale, mask_mod=predicate, score_mod=mod, key_padding_mask=pad)
    if rpb is not None and rpb.requires_grad and torch.is_grad_enabled():
        out, lse = _RpbGradient.apply(out, rpb, qf, kf, vf, lse, pattern, default_scale(q, scale), pad, spans)
    return _unflat(_result(out, lse, return_lse), q, v, return_lse)


@functools.lru_cache(maxsize=16)
def _table(pattern: NeighborhoodMask, device: torch.device) -> tuple[NeighborTable, Tensor]:
    """The pattern's neighbor table with its inverse, and the rpb index of each slot (cached:
    a model calls the same pattern in every layer and step)."""
    index, rel = neighbor_table(pattern.shape, pattern.kernel_size, pattern.dilation, pattern.stride, pattern.causal, device=device)
    return NeighborTable.build(index, math.prod(pattern.shape)), rel


def _gathered(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, rpb: Optional[Tensor], key_padding_mask: Optional[Tensor] = None, **window: Any) -> Any:
    """Each query over the K keys of its neighbor table: no tile waste, rpb as a gathered bias."""
    pattern = _neighborhood_mask(q, **window)
    table, rel = _table(pattern, q.device)
    bias = None
    if rpb is not None:
        # gather in float32: the gather's backward sums each entry's many slot gradients, which
        # bfloat16 accumulation would round away (the kernel computes in float32 anyway)
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = rpb.reshape(rpb.shape[0], -1).to(wide)[:, rel.clamp(min=0)].unsqueeze(0)
    out, lse = gathered_attention(_flat(q), _flat(k), _flat(v), table, scale=default_scale(q, scale), bias=bias)
    return _unflat(_result(out, lse, return_lse), q, v, return_lse)


def _gathered_prefers(p: Problem, params: dict) -> Optional[str]:
    """Dispatch takes the table over the tiles when the C++ kernel runs it and windows are small.

    Measured (B=1, H=8, D=64, fp32, 2-core CPU, forward / forward+backward ms, the kernel on
    both threads): 1D N=4096 with 63 keys: tiled 129 / 304, table 12 / 49; 127: 76 / 251 vs
    28 / 116; 255: 88 / 229 vs 47 / 175; 511: 127 / 408 vs 100 / 407; 1023: 223 / 691 vs
    181 / 874. 2D 64x64 with 7x7: 184 / 547 vs 13 / 50; 21x21: 418 / 1021 vs 98 / 440; 31x31
    (961 keys): 520 / 1173 vs 181 / 867; 41x41 (1681): 460 / 1327 vs 374 / 1702. A 2D/3D window
    is scattered over many rows of the flattened tokens, so tiles waste most of their work; a 1D
    window is contiguous and tiles only waste their edges. The PyTorch path of the table was
    5-40x slower than tiled: never preferred.
    """
    limit = _GATHERED_MAX_SLOTS_1D if len(p.q_shape) == 1 else _GATHERED_MAX_SLOTS_ND
    slots = math.prod(per_axis(params["kernel_size"], len(p.q_shape), int))
    if slots > limit:
        return f"{slots} keys per query: the block-sparse kernel (fused) wins above {limit} on {len(p.q_shape)}D inputs"
    if not native_usable(p.device, p.dtype):
        return "the C++ kernel does not run these inputs here (GPU, float64, or not built); its PyTorch path is slower than tiled"
    return None


def _fused_accepts(p: Problem, params: dict) -> Optional[str]:
    """The C++ block-sparse kernel: no rpb (it takes no bias), CPU, float32/bf16/f16, built here."""
    if params["rpb"] is not None:
        return "takes no relative position bias (gathered and tiled do)"
    return block_sparse.decline_reason(p)


def _fused(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, rpb: Optional[Tensor], key_padding_mask: Optional[Tensor] = None, **window: Any) -> Any:
    """The C++ block-sparse FA2 kernel over the 64x64 blocks of the flattened tokens the windows touch."""
    _, predicate, pad, _ = _padded_pattern(q, key_padding_mask, window)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    n = qf.shape[2]
    plan = block_sparse.SparsePlan.from_mask(predicate, n, n, batch=q.shape[0], heads=q.shape[1])
    out, lse = block_sparse.block_sparse_attention(qf, kf, vf, plan, scale=scale, key_padding_mask=pad)
    return _unflat(_result(out, lse, return_lse), q, v, return_lse)


def _flex_accepts(p: Problem, params: dict) -> Optional[str]:
    """What compiled FlexAttention cannot do here (CPU: small head dims, grad, LSE; CUDA: head dims below 16).

    On CUDA a learnable rpb is differentiated by FlexAttention itself (the score_mod's captured
    table gets its gradient in the backward kernel); on CPU any gradient is declined, rpb's too.
    """
    # an rpb that requires grad marks the problem as requiring grad (Mechanism.prepare): CPU declines it
    return flex_decline_reason(p, return_lse=params["return_lse"])


def _flex(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, rpb: Optional[Tensor], key_padding_mask: Optional[Tensor] = None, **window: Any) -> Any:
    """Compiled FlexAttention with the pattern as a BlockMask and rpb as its score_mod."""
    pattern, predicate, pad, _ = _padded_pattern(q, key_padding_mask, window)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    n = qf.shape[2]
    batch = None
    if pad is not None:
        predicate, batch = masks.and_masks(predicate, _KeepKeys(pad)), q.shape[0]
    block_mask = masks.flex_block_mask(predicate, n, n, batch=batch, device=q.device)
    result = flex_forward(qf, kf, vf, block_mask=block_mask, scale=scale, score_mod=_rpb_mod(rpb, pattern), return_lse=return_lse)
    return _unflat(result, q, v, return_lse)


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark
# --------------------------------------------------------------------------------------------
def _nbr_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    n = len(p.q_shape)
    causal_first = pattern.startswith("causal")
    if rng is None:  # plain: 7 per axis (or the axis), no dilation, stride or bias
        return {"kernel_size": tuple(min(7, s) for s in p.q_shape), "causal": (causal_first,) + (False,) * (n - 1)}
    kernel, dilation, stride = [], [], []
    for size in p.q_shape:
        d = rng.choice((1, 1, 2, 3)) if size >= 4 else 1
        d = min(d, size)
        k = rng.randrange(1, size // d + 1)
        kernel.append(k)
        dilation.append(d)
        stride.append(rng.randrange(1, k + 1) if rng.random() < 0.4 else 1)
    # the suite's causal checks perturb the first axis: keep it causal in causal patterns
    causal = (causal_first,) + tuple(rng.random() < 0.3 for _ in range(n - 1))
    params: dict[str, Any] = {"kernel_size": tuple(kernel), "dilation": tuple(dilation), "stride": tuple(stride), "causal": causal}
    if rng.random() < 0.3:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        table = torch.randn(p.q_heads, *(2 * k - 1 for k in kernel), generator=gen)
        params["rpb"] = table.to(device=p.device, dtype=p.dtype)
    if rng.random() < 0.3:
        params["return_lse"] = True
    pad = sample_padding(p, rng)
    if pad is not None:
        params["key_padding_mask"] = pad
    return params


# --------------------------------------------------------------------------------------------
# registration and the public function
# --------------------------------------------------------------------------------------------
NEIGHBORHOOD = register(
    Mechanism(
        name="neighborhood",
        family="local",
        catalog=("L1",),
        paper="Neighborhood Attention Transformer (Hassani et al., 2023); Dilated NA (DiNAT, 2022); Faster NA (2024, causal); Generalized NA (2025, stride)",
        formula="out_x = sum_{y in N(x)} softmax_y(scale q_x.k_y + rpb[h, y - x]) v_y, N(x) = the k^n window of x's stride group in its dilation group, shifted inward at borders",
        cost="O(N * prod(kernel_size) * D) time (tiled, flex); O(N^2) memory (reference)",
        summary="neighborhood attention 1D/2D/3D (NATTEN semantics): kernel size, dilation, stride, per-axis causal, relative positional bias",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=NEIGHBORHOOD_PARAMS,
        spatial_dims=(1, 2, 3),
        gqa=True,
        sample_params=_nbr_sample_params,
        check_params=_check_neighborhood,
    )
)
# Its own three backends rather than _shared's _add_pattern_backends, which has no score_mod to
# carry rpb; they are the same calls with rpb as a score_mod.
_REFERENCE_DOC = "the pattern as a dense mask over materialized scores, rpb as a score_mod: the spec"
_TILED_DOC = "the tiled FA2 engine over the key tiles the pattern touches (gives the LSE; rpb differentiable)"
_GATHERED_DOC = "per-query neighbor table (kernels/gathered.py: C++ on CPU when built, else PyTorch chunks); no tile waste, rpb differentiable"
_FLEX_DOC = "compiled FlexAttention with the pattern as a BlockMask, rpb as its score_mod (forward only on CPU; rpb differentiable on CUDA)"
NEIGHBORHOOD.add_backend(Backend("reference", _reference, doc=_REFERENCE_DOC, priority=-100, materializes_scores=True))
NEIGHBORHOOD.add_backend(Backend("tiled", _tiled, doc=_TILED_DOC, priority=20))
NEIGHBORHOOD.add_backend(Backend("gathered", _gathered, doc=_GATHERED_DOC, priority=30, prefers=_gathered_prefers, accepts=no_padding))
NEIGHBORHOOD.add_backend(Backend("fused", _fused, doc=_fused.__doc__, accepts=_fused_accepts, **{**block_sparse.FUSED_CAPABILITIES, "priority": 25}))
NEIGHBORHOOD.add_backend(Backend("flex", _flex, doc=_FLEX_DOC, accepts=_flex_accepts, **FLEX_CAPABILITIES))


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: Any,
    dilation: Any = 1,
    stride: Any = 1,
    causal: Any = False,
    rpb: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Neighborhood attention over 1, 2 or 3 spatial axes (catalog L1), NATTEN's semantics.

    Each query x attends the keys of its neighborhood N(x) (``prod(kernel_size)`` of them unless
    causal)::

        out_x = sum_{y in N(x)} exp(s_xy) v_y / sum_{y in N(x)} exp(s_xy),
        s_xy = scale * q_x . k_y + rpb[h, y - x]

    Per axis (size L, kernel k, dilation d, stride s), tokens split into d interleaved groups
    (coordinate c is at place ``p = c // d`` of group ``c % d``, a group of ``L_g`` tokens);
    N(x) holds the places ``[f, f + k)`` of x's group, ``f = clamp(leader - k//2, 0, L_g - k)``:
    near a border the window shifts inward, so every query sees exactly k keys per axis; an even
    k puts k//2 keys before the leader and k//2 - 1 after. Stride (GNA, NATTEN >= 0.20): the s
    consecutive places ``[s*floor(p/s), s*floor(p/s) + s)`` form a stride group that shares the
    window of its leader, the group's centre place ``s*floor(p/s) + s//2`` (right of centre for
    even s), clipped to ``L_g - 1``; s = 1 gives ``leader = p``, s = k gives blocked (window)
    attention when k divides L_g. On a causal axis the window is ``[max(leader - k + 1, 0), p]``
    with the leader the stride group's *last* place (clipped): queries of a group share the
    window's start, each stops at itself, so nothing after the query is ever seen.

    ``rpb`` (NAT, DiNAT; NATTEN <= 0.17, which dropped it later) is one learnable table per head
    of shape ``(H, 2k_1 - 1, ..., 2k_n - 1)``; the pair (x, y) adds the entry at per-axis offset
    ``p_y - p_x + k - 1``, the key's place relative to the query's counted in dilated steps. In
    the interior that is the centre band ``k//2 .. k//2 + k - 1``; where the window shifts at a
    border the offsets run further out (up to 0 or 2k - 2), which is why the table has 2k - 1
    entries: NATTEN's ``get_pb_start(i) + ki`` rule, extended unchanged to even k, stride (the
    offset is from the query, not its leader) and causal axes (offsets ``<= k - 1`` only).

    Args:
        q, k, v: (B, H, *spatial, D) with 1-3 spatial axes (k/v may have fewer heads: GQA).
        kernel_size: int or one per axis, each <= the axis size (kernel_size * dilation too).
        dilation: int or one per axis (DiNAT). stride: int or one per axis, 1 <= stride <= kernel.
        causal: bool or one per axis.
        rpb: None or a floating (Hq, 2k_1 - 1, ..., 2k_n - 1) tensor on q's device; gradients
            reach it on ``reference`` and ``tiled``.
        key_padding_mask: (B, Nk) or (B, *spatial) bool, True = ignore that key. 1D: NATTEN
            shifts a window inward at the sequence's end, so masking alone would differ from the
            sequence run alone; instead each sequence's windows are placed on its real keys
            (from its first to its last unpadded key, as for a sequence of that length; pads
            inside are masked) and query rows outside that span output 0. A batch padded on
            the right or the left therefore equals each sequence alone, rpb included. 2D/3D:
            pads are masked out of the windows, which do not move (a query left with no key
            outputs 0). ``gathered`` takes no padding; one host sync per padded 1D call.
        scale: defaults to ``D ** -0.5`` (rpb is added after scaling, as in NAT).
        return_lse: also return lse (B, H, *spatial). backend: ``reference``, ``tiled`` or ``flex``.

    Cost: O(N * prod(kernel_size) * D) on ``tiled`` (tiles of flattened tokens); the rpb
    gradient adds one gather pass of the same order (O(chunk * K * D) memory).
    Papers: Neighborhood Attention Transformer; Dilated Neighborhood Attention Transformer;
    Faster Neighborhood Attention (causal NA); Generalized Neighborhood Attention (stride).

    Example::

        >>> x = torch.randn(1, 4, 32, 32, 64)  # (B, H, height, width, D)
        >>> out = neighborhood_attention(x, x, x, kernel_size=7, dilation=2, stride=(1, 7))
        >>> bias = torch.zeros(4, 13, 13, requires_grad=True)  # (H, 2*7-1, 2*7-1)
        >>> out = neighborhood_attention(x, x, x, kernel_size=7, rpb=bias)
    """
    return NEIGHBORHOOD(
        q,
        k,
        v,
        backend=backend,
        kernel_size=kernel_size,
        dilation=dilation,
        stride=stride,
        causal=causal,
        rpb=rpb,
        key_padding_mask=key_padding_mask,
        scale=scale,
        return_lse=return_lse,
    )


NEIGHBORHOOD.function = neighborhood_attention
NEIGHBORHOOD.decoder_refusal = "not written yet: causal windows clamp at the sequence start and N-D grids have no token order to decode in (1D: sliding_window decodes)"
