"""Local attention with fixed patterns (catalog L).

Every mechanism here is softmax attention restricted to a fixed set of keys per query; the
pattern is a :mod:`attnzoo.masks` predicate, so the reference materializes it as a dense mask
(the spec) and the ``tiled`` backend visits only the key tiles the pattern touches
(:mod:`attnzoo.kernels.tiled`), forward and backward, in O(N * window) time.

``sliding_window`` (L2): query i, sitting at key position ``i' = i + Nk - Nq`` (bottom-right,
the default) or ``i' = i`` (top-left), sees keys ``i' - left <= j <= i' + right``; ``causal``
means ``right = 0``; ``sinks = S`` adds the first S keys to every query's set (StreamingLLM's
attention sinks, used by SinkLoRA and LongGen), still causally when causal.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import masks
from ..errors import ParameterError
from ..kernels.flex import FLEX_CAPABILITIES, cpu_decline_reason, flex_forward
from ..kernels.reference import materialized_attention
from ..kernels.tiled import BlockPlan, _fit_block, tiled_attention
from ..registry import PATTERNS, Backend, Mechanism, Param, Problem, choice, flag, positive_number, register

__all__ = ["sliding_window_attention", "SLIDING_WINDOW", "neighborhood_attention", "NEIGHBORHOOD", "NeighborhoodMask", "axial_attention", "AXIAL", "AxialMask", "window_attention", "WINDOW", "WindowMask", "grid_attention", "GRID", "GridMask", "halo_attention", "HALO", "HaloMask", "per_head_patterns_attention", "PER_HEAD", "HeadPattern", "PerHeadMask"]


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _is_extent(x: Any) -> bool:
    return x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)


def _check_window(value: Any, p: Problem) -> Optional[str]:
    expected = "an int (the same extent both sides) or a (left, right) pair of non-negative ints or None (unbounded)"
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value >= 0 else expected
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_extent(x) for x in value):
        return None
    return expected


def _check_sinks(value: Any, p: Problem) -> Optional[str]:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "a non-negative int"


def _extents(window: Any, causal: bool) -> tuple[Optional[int], Optional[int]]:
    """(left, right) from ``window`` (an int means both sides; causal means right = 0)."""
    if isinstance(window, int):
        return window, (0 if causal else window)
    return window[0], window[1]


def _check_combination(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound["causal"] and not isinstance(bound["window"], int) and bound["window"][1] != 0:
        return "window", f"the right extent must be 0 with causal=True (causal means right = 0), got {tuple(bound['window'])}"
    return None


SLIDING_WINDOW_PARAMS = (
    Param(
        "window",
        None,
        "(left, right) keys each side of the query (None: unbounded), or an int for both sides",
        _check_window,
        (None, (-1, 0), (3,), "256", (1.5, 0)),
        "int | (int | None, int | None)",
    ),
    flag("causal", False, "no key after the query (right extent 0)"),
    Param("sinks", 0, "the first `sinks` keys are seen by every query (attention sinks)", _check_sinks, (-1, 1.0, "2"), "int"),
    choice(
        "causal_alignment",
        ("bottom_right", "top_left"),
        "bottom_right",
        "when Nq != Nk, where query i sits among the keys: i + Nk - Nq (bottom_right) or i (top_left)",
    ),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


# --------------------------------------------------------------------------------------------
# the pattern
# --------------------------------------------------------------------------------------------
def _pattern(nq: int, nk: int, window: Any, causal: bool, sinks: int, alignment: str) -> masks.MaskMod:
    left, right = _extents(window, causal)
    offset = nk - nq if alignment == "bottom_right" else 0
    pattern = masks.sliding_window(left, right, offset=offset)
    if sinks:
        sink = masks.sinks(sinks)
        pattern = pattern | (sink & masks.causal(offset) if causal else sink)
    return pattern


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def _result(out: Tensor, lse: Tensor, return_lse: bool) -> Any:
    return (out, lse) if return_lse else out


def _flat(x: Tensor) -> Tensor:
    """(B, H, *spatial, D) -> (B, H, N, D): the tokens in row-major order."""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _unflat(out: Any, q: Tensor, v: Tensor, return_lse: bool) -> Any:
    spatial = tuple(q.shape[2:-1])
    if return_lse:
        o, lse = out
        return o.reshape(*q.shape[:2], *spatial, v.shape[-1]), lse.reshape(*q.shape[:2], *spatial)
    return out.reshape(*q.shape[:2], *spatial, v.shape[-1])


def _no_lse(p: Problem, params: dict) -> Optional[str]:
    """SDPA over lines, windows or groups gives no LSE."""
    return "cannot return the LSE (use tiled)" if params["return_lse"] else None


def _check_self(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    """Spatial patterns relate a token to its neighbours: q and k must share their grid."""
    if p.q_shape != p.kv_shape:
        return "k", f"self-attention over a grid: k must have q's spatial sizes {p.q_shape}, got {p.kv_shape}"
    return None


PatternOf = Callable[..., masks.MaskMod]  # (q, k, **the mechanism's pattern parameters) -> predicate


def _add_pattern_backends(mech: Mechanism, pattern_of: PatternOf, *, flex: bool = False) -> None:
    """Register the backends every fixed-pattern mechanism shares, over its flattened tokens.

    ``reference``: the pattern as a dense mask over materialized scores (the spec); ``tiled``:
    the FA2 engine over the tiles the pattern touches (gives the LSE); ``flex``: compiled
    FlexAttention with the pattern as a BlockMask. Backends receive ``scale``, ``return_lse``
    and the pattern's parameters, which go to ``pattern_of``.
    """

    def reference(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, **params: Any) -> Any:
        pattern = pattern_of(q, k, **params)
        nq, nk = math.prod(q.shape[2:-1]), math.prod(k.shape[2:-1])
        allowed = masks.dense_mask(pattern, nq, nk, heads=q.shape[1], device=q.device)
        out, lse = materialized_attention(_flat(q), _flat(k), _flat(v), scale=_scale(q, scale), allowed=allowed)
        return _unflat(_result(out, lse, return_lse), q, v, return_lse)

    def tiled(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, **params: Any) -> Any:
        pattern = pattern_of(q, k, **params)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        plan = _plan(pattern, qf.shape[2], kf.shape[2], q.shape[1])
        out, lse = tiled_attention(qf, kf, vf, plan=plan, scale=_scale(q, scale), mask_mod=pattern)
        return _unflat(_result(out, lse, return_lse), q, v, return_lse)

    def flex_backend(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, **params: Any) -> Any:
        pattern = pattern_of(q, k, **params)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        block_mask = masks.flex_block_mask(pattern, qf.shape[2], kf.shape[2], heads=q.shape[1], device=q.device)
        return _unflat(flex_forward(qf, kf, vf, block_mask=block_mask, scale=scale, return_lse=return_lse), q, v, return_lse)

    mech.add_backend(
        Backend("reference", reference, doc="the pattern as a dense mask over materialized scores: the spec", priority=-100, materializes_scores=True)
    )
    mech.add_backend(Backend("tiled", tiled, doc="the tiled FA2 engine over the key tiles the pattern touches (gives the LSE)", priority=20))
    if flex:
        mech.add_backend(Backend("flex", flex_backend, doc="compiled FlexAttention with the pattern as a BlockMask", accepts=_flex_accepts, **FLEX_CAPABILITIES))


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
TILE = 128


@functools.lru_cache(maxsize=256)
def _plan(pattern: masks.MaskMod, nq: int, nk: int, heads: int = 1) -> BlockPlan:
    """The pattern's tile plan (cached: the built-in patterns are pure functions of the indices).

    A head-dependent pattern is planned over all ``heads`` (the union of their tiles).
    """
    return masks.block_plan(
        pattern, nq, nk, block_q=_fit_block(TILE, nq), block_k=_fit_block(TILE, nk), heads=heads if pattern.batch_head_dependent else 1
    )


def _flex_accepts(p: Problem, params: dict) -> Optional[str]:
    """What compiled FlexAttention cannot do on this device (CPU: small head dims, grad, LSE)."""
    return cpu_decline_reason(p, score_mod=None, return_lse=params["return_lse"])


def _sliding_pattern(q: Tensor, k: Tensor, *, window: Any, causal: bool, sinks: int, causal_alignment: str) -> masks.MaskMod:
    return _pattern(q.shape[2], k.shape[2], window, causal, sinks, causal_alignment)


# --------------------------------------------------------------------------------------------
# decoding: a rolling cache of the sinks and the last `left` keys (StreamingLLM)
# --------------------------------------------------------------------------------------------
@dataclass
class RollingKV:
    """The keys a causal sliding window can still need: the sinks and the last ``left`` keys.

    Memory stays O((sinks + left) * D) however long the stream; ``positions`` are the keys'
    absolute positions.
    """

    k: Optional[Tensor] = None
    v: Optional[Tensor] = None
    positions: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    seen: int = 0


class _SlidingWindowDecoder:
    def init_state(self, problem: Problem, **params: Any) -> RollingKV:
        return RollingKV()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: RollingKV, **params: Any) -> tuple[Any, RollingKV]:
        left, right = _extents(params["window"], True)
        if not params["causal"] or right != 0:
            raise ParameterError("sliding_window: causal: decoding needs causal=True (no key after the query)", argument="causal")
        sinks, t = params["sinks"], q.shape[2]
        new_pos = torch.arange(state.seen, state.seen + t)
        keys = k if state.k is None else torch.cat([state.k, k], dim=2)
        values = v if state.v is None else torch.cat([state.v, v], dim=2)
        pos = torch.cat([state.positions, new_pos])
        q_pos = new_pos[:, None]
        allowed = pos[None, :] <= q_pos
        if left is not None:
            allowed &= (pos[None, :] >= q_pos - left) | (pos[None, :] < sinks)
        out, lse = materialized_attention(q, keys, values, scale=_scale(q, params["scale"]), allowed=allowed.to(q.device))
        state.seen += t
        keep = torch.ones_like(pos, dtype=torch.bool) if left is None else (pos < sinks) | (pos >= state.seen - left)
        keep_idx = keep.nonzero().flatten().to(keys.device)
        state.k, state.v, state.positions = keys.index_select(2, keep_idx), values.index_select(2, keep_idx), pos[keep]
        return _result(out, lse, params["return_lse"]), state


# --------------------------------------------------------------------------------------------
# parameters for the suite and the benchmark
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    causal = pattern.startswith("causal")
    if rng is None:  # the plain case: a quarter of the keys (256 at most) each side
        extent = max(1, min(256, p.kv_len // 4))
        return {"window": (extent, 0) if causal else (extent, extent), "causal": causal}
    left = rng.choice((None, 0, 1, rng.randrange(0, 40)))
    right = 0 if causal else rng.choice((None, 0, rng.randrange(0, 40)))
    params: dict[str, Any] = {"window": (left, right), "causal": causal}
    if rng.random() < 0.4:
        params["sinks"] = rng.randrange(0, 6)
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    if rng.random() < 0.3:
        params["return_lse"] = True
    return params


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
SLIDING_WINDOW = register(
    Mechanism(
        name="sliding_window",
        family="local",
        catalog=("L2",),
        paper="Longformer (Beltagy et al., 2020) local attention; sinks: StreamingLLM (Xiao et al., 2024) via SinkLoRA, LongGen",
        formula="out_i = sum_{j in W(i)} softmax_j(scale q_i.k_j) v_j, W(i) = {i'-left <= j <= i'+right} U {j < sinks}",
        cost="O(N * (left + right + sinks) * D) time (tiled, flex); O(Nq * Nk) memory (reference)",
        summary="1D sliding-window attention, (left, right) extents, causal, attention sinks",
        patterns=frozenset(PATTERNS),
        params=SLIDING_WINDOW_PARAMS,
        gqa=True,
        decoder=_SlidingWindowDecoder(),
        sample_params=_sample_params,
        check_params=_check_combination,
    )
)
_add_pattern_backends(SLIDING_WINDOW, _sliding_pattern, flex=True)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: Any,
    causal: bool = False,
    sinks: int = 0,
    causal_alignment: str = "bottom_right",
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Sliding-window attention with optional attention sinks (catalog L2).

    Query i, at key position ``i' = i + Nk - Nq`` (``causal_alignment="bottom_right"``, the
    default) or ``i' = i`` (``"top_left"``), attends the keys
    ``W(i) = {j : i' - left <= j <= i' + right} U {j < sinks}`` with softmax weights::

        out_i = sum_{j in W(i)} exp(s_ij) v_j / sum_{j in W(i)} exp(s_ij),   s_ij = scale * q_i . k_j

    Args:
        q: (B, Hq, Nq, D). k, v: (B, Hkv, Nk, D|Dv), Hq a multiple of Hkv.
        window: ``(left, right)`` key counts before/after the query (``None``: unbounded on that
            side), or an int for both sides (with ``causal``, left only).
        causal: no key after the query (the right extent must then be 0).
        sinks: every query also sees the first ``sinks`` keys (StreamingLLM); causally if causal.
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, Hq, Nq), float32.
        backend: force ``reference``, ``tiled`` or ``flex``.

    Cost: O(N * (left + right + 1 + sinks) * D) time and O(N * tile) memory on ``tiled``.
    Decoding (``init_state``/``step``, causal) keeps only the sinks and the last ``left`` keys.
    Papers: Longformer (local window); StreamingLLM sinks as used by SinkLoRA and LongGen.

    Example::

        >>> q = k = v = torch.randn(1, 8, 16384, 64)
        >>> out = sliding_window_attention(q, k, v, window=(256, 0), causal=True, sinks=4)
    """
    return SLIDING_WINDOW(
        q, k, v, backend=backend, window=window, causal=causal, sinks=sinks,
        causal_alignment=causal_alignment, scale=scale, return_lse=return_lse,
    )


SLIDING_WINDOW.function = sliding_window_attention


# ============================================================================================
# neighborhood (L1): NATTEN's neighborhood attention, 1D/2D/3D, dilation, per-axis causal
# ============================================================================================
@dataclass(frozen=True)
class NeighborhoodMask(masks.MaskMod):
    """Neighborhood attention over flattened N-D tokens as a mask predicate.

    Per axis of size L with kernel k and dilation d: a token's group is ``c % d`` and its place
    in the group ``p = c // d``; the group holds ``L_g = ceil((L - c % d) / d)`` tokens. A query
    sees the keys of its group whose place is in ``[s, s + k)`` with
    ``s = clamp(p - k // 2, 0, L_g - k)`` (the window shifts inward at the borders, so every query
    sees exactly k keys per axis), or in ``[max(p - k + 1, 0), p]`` on a causal axis. A key is
    seen when every axis agrees. Even k: k // 2 keys before and k // 2 - 1 after.
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = None
        stride = 1
        for axis in reversed(range(len(self.shape))):
            size, k, d = self.shape[axis], self.kernel_size[axis], self.dilation[axis]
            cq, ck = (q_idx // stride) % size, (kv_idx // stride) % size
            stride *= size
            pq, pk = cq // d, ck // d
            here = (cq % d) == (ck % d)
            if self.causal[axis]:
                here = here & (pk <= pq) & (pk >= pq - k + 1)
            else:
                group_len = (size - cq % d + d - 1) // d
                start = torch.minimum((pq - k // 2).clamp(min=0), group_len - k)
                here = here & (pk >= start) & (pk < start + k)
            ok = here if ok is None else ok & here
        return ok


def _neighborhood_axes(p: Problem) -> int:
    return len(p.q_shape)


def _per_axis(value: Any, n: int, kind: type) -> Optional[tuple]:
    """``value`` as a tuple of n entries of ``kind``, or None when it is not one."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n:
        return None
    for x in values:
        if kind is bool and not isinstance(x, bool):
            return None
        if kind is int and (isinstance(x, bool) or not isinstance(x, int)):
            return None
    return values


def _check_kernel(value: Any, p: Problem) -> Optional[str]:
    n = _neighborhood_axes(p)
    sizes = _per_axis(value, n, int)
    if sizes is None or any(k < 1 for k in sizes):
        return f"a positive int or a tuple of {n} (one per spatial axis)"
    too_big = [i for i, (k, size) in enumerate(zip(sizes, p.q_shape)) if k > size]
    if too_big:
        return f"a kernel no larger than the input on each axis {tuple(p.q_shape)} (axis {too_big[0]})"
    return None


def _check_dilation(value: Any, p: Problem) -> Optional[str]:
    n = _neighborhood_axes(p)
    sizes = _per_axis(value, n, int)
    return None if sizes is not None and all(d >= 1 for d in sizes) else f"a positive int or a tuple of {n}"


def _check_causal_axes(value: Any, p: Problem) -> Optional[str]:
    n = _neighborhood_axes(p)
    return None if _per_axis(value, n, bool) is not None else f"a bool or a tuple of {n} bools"


def _check_neighborhood(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    n = _neighborhood_axes(p)
    kernel, dilation = _per_axis(bound["kernel_size"], n, int), _per_axis(bound["dilation"], n, int)
    for axis, (k, d, size) in enumerate(zip(kernel, dilation, p.q_shape)):
        if k * d > size:
            return "dilation", f"kernel_size * dilation must fit the input: axis {axis} has {size} tokens, got {k} * {d}"
    return _check_self(bound, p)


NEIGHBORHOOD_PARAMS = (
    Param("kernel_size", None, "window size per axis (int or tuple); even sizes allowed", _check_kernel, (None, 0, "3", 10**6, (3, 3, 3, 3)), "int | tuple"),
    Param("dilation", 1, "gap between window keys per axis (DiNAT)", _check_dilation, (0, -2, 1.5), "int | tuple"),
    Param("causal", False, "per axis: only keys at or before the query", _check_causal_axes, ("yes", 1, (True,) * 4), "bool | tuple"),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _neighborhood_mask(q: Tensor, k: Tensor, *, kernel_size: Any, dilation: Any, causal: Any) -> NeighborhoodMask:
    shape = tuple(q.shape[2:-1])
    n = len(shape)
    return NeighborhoodMask(shape, _per_axis(kernel_size, n, int), _per_axis(dilation, n, int), _per_axis(causal, n, bool))


def _nbr_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    n = len(p.q_shape)
    causal_first = pattern.startswith("causal")
    if rng is None:  # plain: 7 per axis (or the axis), no dilation
        return {"kernel_size": tuple(min(7, s) for s in p.q_shape), "causal": (causal_first,) + (False,) * (n - 1)}
    kernel, dilation = [], []
    for size in p.q_shape:
        d = rng.choice((1, 1, 2, 3)) if size >= 4 else 1
        d = min(d, size)
        k = rng.randrange(1, size // d + 1)
        kernel.append(k)
        dilation.append(d)
    # the suite's causal checks perturb the first axis: keep it causal in causal patterns
    causal = (causal_first,) + tuple(rng.random() < 0.3 for _ in range(n - 1))
    params: dict[str, Any] = {"kernel_size": tuple(kernel), "dilation": tuple(dilation), "causal": causal}
    if rng.random() < 0.3:
        params["return_lse"] = True
    return params


NEIGHBORHOOD = register(
    Mechanism(
        name="neighborhood",
        family="local",
        catalog=("L1",),
        paper="Neighborhood Attention Transformer (Hassani et al., 2023); Dilated NA (DiNAT, 2022); Faster NA (2024, causal)",
        formula="out_x = sum_{y in N(x)} softmax_y(scale q_x.k_y) v_y, N(x) = the k^n window of x's dilation group, shifted inward at borders",
        cost="O(N * prod(kernel_size) * D) time (tiled, flex); O(N^2) memory (reference)",
        summary="neighborhood attention 1D/2D/3D (NATTEN semantics): kernel size, dilation, per-axis causal",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=NEIGHBORHOOD_PARAMS,
        spatial_dims=(1, 2, 3),
        gqa=True,
        sample_params=_nbr_sample_params,
        check_params=_check_neighborhood,
    )
)
_add_pattern_backends(NEIGHBORHOOD, _neighborhood_mask, flex=True)


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: Any,
    dilation: Any = 1,
    causal: Any = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Neighborhood attention over 1, 2 or 3 spatial axes (catalog L1), NATTEN's semantics.

    Each query x attends the ``prod(kernel_size)`` keys of its neighborhood N(x)::

        out_x = sum_{y in N(x)} exp(s_xy) v_y / sum_{y in N(x)} exp(s_xy),   s_xy = scale * q_x . k_y

    Per axis (size L, kernel k, dilation d), tokens split into d interleaved groups; within its
    group of L_g tokens a query at place p sees places ``[s, s + k)``, ``s = clamp(p - k//2, 0,
    L_g - k)``: near a border the window shifts inward, so every query sees exactly k keys per
    axis. On a causal axis the window is ``[max(p - k + 1, 0), p]``.

    Args:
        q, k, v: (B, H, *spatial, D) with 1-3 spatial axes (k/v may have fewer heads: GQA).
        kernel_size: int or one per axis, each <= the axis size (kernel_size * dilation too).
        dilation: int or one per axis (DiNAT). causal: bool or one per axis.
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, H, *spatial).
        backend: force ``reference``, ``tiled`` or ``flex``.

    Cost: O(N * prod(kernel_size) * D) on ``tiled`` (tiles of flattened tokens).
    Papers: Neighborhood Attention Transformer; Dilated Neighborhood Attention Transformer;
    Faster Neighborhood Attention (causal NA). Stride (GNA) and relative positional bias are not
    implemented yet.

    Example::

        >>> x = torch.randn(1, 4, 32, 32, 64)  # (B, H, height, width, D)
        >>> out = neighborhood_attention(x, x, x, kernel_size=7, dilation=2)
    """
    return NEIGHBORHOOD(q, k, v, backend=backend, kernel_size=kernel_size, dilation=dilation, causal=causal, scale=scale, return_lse=return_lse)


NEIGHBORHOOD.function = neighborhood_attention


# ============================================================================================
# axial (L5): attention along one spatial axis
# ============================================================================================
@dataclass(frozen=True)
class AxialMask(masks.MaskMod):
    """Tokens see the tokens of their line along ``axis`` (all other coordinates equal)."""

    shape: tuple[int, ...]
    axis: int
    causal: bool
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        inner = math.prod(self.shape[self.axis + 1 :])
        size = self.shape[self.axis]
        cq, ck = (q_idx // inner) % size, (kv_idx // inner) % size
        # the same line: every coordinate but `axis` agrees
        same_line = (q_idx - cq * inner) == (kv_idx - ck * inner)
        return same_line & (ck <= cq) if self.causal else same_line


def _check_axis(value: Any, p: Problem) -> Optional[str]:
    n = len(p.q_shape)
    ok = isinstance(value, int) and not isinstance(value, bool) and -n <= value < n
    return None if ok else f"a spatial axis index in [{-n}, {n}) (0 is the first axis after the heads)"


AXIAL_PARAMS = (
    Param("axis", None, "the spatial axis to attend along (negative counts from the last)", _check_axis, (None, 3, -4, "0", 1.0), "int"),
    flag("causal", False, "only earlier tokens of the line (along the axis)"),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _axial_mask(q: Tensor, k: Tensor, *, axis: int, causal: bool) -> AxialMask:
    shape = tuple(q.shape[2:-1])
    return AxialMask(shape, axis % len(shape), causal)


def _lines(x: Tensor, axis: int) -> tuple[Tensor, tuple[int, ...]]:
    """(B, H, *spatial, D) -> (B * other, H, L_axis, D): one attention problem per line."""
    d = x.dim()
    moved = x.movedim(2 + axis, d - 2)  # (B, H, *other, L, D)
    other = tuple(moved.shape[2:-2])
    lines = moved.movedim(1, d - 3)  # (B, *other, H, L, D)
    return lines.reshape(-1, *lines.shape[-3:]), other


def _unlines(out: Tensor, batch: int, other: tuple[int, ...], axis: int) -> Tensor:
    lines = out.reshape(batch, *other, *out.shape[-3:])  # (B, *other, H, L, D)
    d = lines.dim()
    return lines.movedim(d - 3, 1).movedim(d - 2, 2 + axis)


def _axial_sdpa(q, k, v, *, axis, causal, scale, return_lse):
    """Each line along the axis becomes one SDPA problem (other axes folded into the batch): exact, O(N * L_axis)."""
    axis = axis % (q.dim() - 3)
    ql, other = _lines(q, axis)
    kl, _ = _lines(k, axis)
    vl, _ = _lines(v, axis)
    out = torch.nn.functional.scaled_dot_product_attention(ql, kl, vl, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return _unlines(out, q.shape[0], other, axis)


def _axial_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    n = len(p.q_shape)
    params: dict[str, Any] = {"axis": -1 if rng is None else rng.randrange(-n, n), "causal": pattern.startswith("causal")}
    if rng is not None and rng.random() < 0.3:
        params["return_lse"] = True
    return params


AXIAL = register(
    Mechanism(
        name="axial",
        family="local",
        catalog=("L5",),
        paper="Axial Attention in Multidimensional Transformers (Ho et al., 2019); used by P2AT and light-field EPI attention",
        formula="out_x = sum_{y on x's line along axis} softmax_y(scale q_x.k_y) v_y",
        cost="O(N * L_axis * D) time; O(N) memory (sdpa on lines)",
        summary="attention along one spatial axis (the other coordinates fixed), causal along it",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=AXIAL_PARAMS,
        spatial_dims=(1, 2, 3),
        gqa=True,
        sample_params=_axial_sample_params,
        check_params=_check_self,
    )
)
_add_pattern_backends(AXIAL, _axial_mask)
AXIAL.implementation("sdpa", accepts=_no_lse, priority=50)(_axial_sdpa)


def axial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    axis: int,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Axial attention (catalog L5): each token attends the tokens of its line along ``axis``.

    For q, k, v of shape (B, H, S_0, ..., S_{n-1}, D), token x attends the tokens y that agree
    with it on every spatial coordinate except ``axis``::

        out_x = sum_{y: y_a = x_a for a != axis} softmax_y(scale * q_x . k_y) v_y

    (causal: only ``y_axis <= x_axis``). On 1 spatial axis this is full attention.

    Args:
        q, k, v: (B, H, *spatial, D), 1-3 spatial axes, k/v may have fewer heads (GQA).
        axis: which spatial axis (0 = the first after the heads; negative from the last).
        causal: along the axis. scale: defaults to ``D ** -0.5``. return_lse: also return lse.
        backend: ``sdpa`` (lines folded into the batch), ``tiled`` (gives the LSE) or ``reference``.

    Cost: O(N * S_axis * D). Paper: Axial Attention in Multidimensional Transformers.

    Example::

        >>> x = torch.randn(2, 8, 64, 64, 32)          # (B, H, height, width, D)
        >>> rows = axial_attention(x, x, x, axis=-1)   # along the width
        >>> cols = axial_attention(x, x, x, axis=0)    # along the height
    """
    return AXIAL(q, k, v, backend=backend, axis=axis, causal=causal, scale=scale, return_lse=return_lse)


AXIAL.function = axial_attention


# ============================================================================================
# window (L3): blocked window attention with Swin's shifted windows
# ============================================================================================
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


def _check_window_size(value: Any, p: Problem) -> Optional[str]:
    n = len(p.q_shape)
    sizes = _per_axis(value, n, int)
    return None if sizes is not None and all(w >= 1 for w in sizes) else f"a positive int or a tuple of {n} (one per spatial axis)"


def _check_shift(value: Any, p: Problem) -> Optional[str]:
    n = len(p.q_shape)
    sizes = _per_axis(value, n, int)
    return None if sizes is not None and all(s >= 0 for s in sizes) else f"a non-negative int or a tuple of {n}"


def _check_window_shift(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    n = len(p.q_shape)
    window, shift = _per_axis(bound["window_size"], n, int), _per_axis(bound["shift_size"], n, int)
    for axis, (w, s) in enumerate(zip(window, shift)):
        if s >= w:
            return "shift_size", f"must be smaller than window_size on each axis (Swin uses window_size // 2): axis {axis} has {s} >= {w}"
    return _check_self(bound, p)


WINDOW_PARAMS = (
    Param("window_size", None, "window size per axis (int or tuple); inputs are padded to a multiple, padding masked", _check_window_size, (None, 0, "7", 1.5), "int | tuple"),
    Param("shift_size", 0, "Swin's cyclic shift per axis (< window_size; Swin uses window_size // 2)", _check_shift, (-1, "3", 0.5), "int | tuple"),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _window_mask(q: Tensor, k: Tensor, *, window_size: Any, shift_size: Any) -> WindowMask:
    shape = tuple(q.shape[2:-1])
    n = len(shape)
    return WindowMask(shape, _per_axis(window_size, n, int), _per_axis(shift_size, n, int))


def _pad_to(x: Tensor, padded: list[int]) -> Tensor:
    """Zero-pad the spatial axes of (B, H, *S, D) at their ends to ``padded``."""
    pads = []
    for size, target in zip(reversed(x.shape[2:-1]), reversed(padded)):
        pads += [0, target - size]
    return torch.nn.functional.pad(x, [0, 0] + pads)


def _split_groups(x: Tensor, splits: list[tuple[int, int]], group_is_inner: bool) -> Tensor:
    """(B, H, *P, D), each axis split as (outer, inner) -> (B * n_groups, H, group size, D).

    Windows (Swin) group by the outer factor (the window index), grids (MaxViT) by the inner
    one (the offset within a stride); the other factor indexes the members of a group.
    """
    b, h, d = x.shape[0], x.shape[1], x.shape[-1]
    n = len(splits)
    x = x.reshape(b, h, *[f for pair in splits for f in pair], d)
    outer, inner = [2 + 2 * i for i in range(n)], [3 + 2 * i for i in range(n)]
    groups, members = (inner, outer) if group_is_inner else (outer, inner)
    x = x.permute(0, *groups, 1, *members, x.dim() - 1)
    return x.reshape(-1, h, math.prod(x.shape[2 + n : 2 + 2 * n]), d)


def _merge_groups(x: Tensor, splits: list[tuple[int, int]], group_is_inner: bool, batch: int) -> Tensor:
    """The inverse of :func:`_split_groups`: back to (B, H, *P, D)."""
    n = len(splits)
    h, d = x.shape[1], x.shape[-1]
    group_sizes = [pair[1] if group_is_inner else pair[0] for pair in splits]
    member_sizes = [pair[0] if group_is_inner else pair[1] for pair in splits]
    x = x.reshape(batch, *group_sizes, h, *member_sizes, d)
    order = [0, n + 1]
    for i in range(n):
        member, group = n + 2 + i, 1 + i
        order += [member, group] if group_is_inner else [group, member]
    return x.permute(*order, x.dim() - 1).reshape(batch, h, *[o * i for o, i in splits], d)


def _window_splits(shape: tuple[int, ...], window: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(-(-size // w), w) for size, w in zip(shape, window)]


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
    return x[(slice(None), slice(None)) + tuple(slice(0, size) for size in pattern.shape)]


def _window_keys(pattern: WindowMask, device: torch.device) -> Tensor:
    """(n_windows, W, W) bool: which keys of a window each query sees (shift regions, padding)."""
    n = len(pattern.shape)
    padded = [-(-size // w) * w for size, w in zip(pattern.shape, pattern.window)]
    # the padded grid's region labels and real/padding flags, laid out like the windows
    coords = torch.stack(torch.meshgrid(*[torch.arange(p, device=device) for p in padded], indexing="ij"), dim=-1)
    real = torch.ones(padded, dtype=torch.bool, device=device)
    region = torch.zeros(padded, dtype=torch.long, device=device)
    for axis, (size, w, s) in enumerate(zip(pattern.shape, pattern.window, pattern.shift)):
        c_rolled = coords[..., axis]  # coordinate in the rolled frame
        original = (c_rolled + s) % padded[axis]
        real &= original < size
        if s:
            region = region * 3 + _swin_region(c_rolled, padded[axis], w, s)
    grid = torch.stack([real.long(), region], dim=0).unsqueeze(0).unsqueeze(-1).to(torch.float32)  # (1, 2, *padded, 1)
    flat = _to_windows(grid, WindowMask(tuple(padded), pattern.window, (0,) * n))  # no second roll/pad
    real_w, region_w = flat[:, 0, :, 0] > 0.5, flat[:, 1, :, 0].long()
    seen = (region_w[:, :, None] == region_w[:, None, :]) & real_w[:, None, :]
    # a padding query sees itself so that no row is empty (its output is cropped away)
    return seen | torch.diag_embed(~real_w)


def _win_sdpa(q, k, v, *, window_size, shift_size, scale, return_lse):
    """Swin's recipe: pad, roll, partition into windows, one SDPA over all windows with the shift mask."""
    pattern = _window_mask(q, k, window_size=window_size, shift_size=shift_size)
    qw, kw, vw = (_to_windows(x, pattern) for x in (q, k, v))
    keys = _window_keys(pattern, q.device)  # (nW, W, W)
    mask = keys.repeat(q.shape[0], 1, 1).unsqueeze(1)  # (B * nW, 1, W, W), windows batch-major
    if bool(keys.all()):
        mask = None  # no shift, no padding: plain attention in each window
    out = torch.nn.functional.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return _from_windows(out, pattern, q.shape[0])


def _win_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:  # plain: 7 per axis (or the axis), no shift
        return {"window_size": tuple(min(7, s) for s in p.q_shape)}
    window = tuple(rng.randrange(1, s + 2) for s in p.q_shape)  # may exceed the axis: padded
    shift = tuple(rng.randrange(0, w) if rng.random() < 0.6 else 0 for w in window)
    params: dict[str, Any] = {"window_size": window, "shift_size": shift}
    if rng.random() < 0.3:
        params["return_lse"] = True
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
_add_pattern_backends(WINDOW, _window_mask)
WINDOW.implementation("sdpa", accepts=_no_lse, priority=50)(_win_sdpa)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: Any,
    shift_size: Any = 0,
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
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, H, *spatial).
        backend: ``sdpa`` (Swin's pad/roll/partition + one SDPA), ``tiled`` (LSE) or ``reference``.

    Differences from Swin's code: masking is exact (-inf, Swin adds -100) and padding is masked.
    Cost: O(N * prod(window_size) * D). Paper: Swin Transformer, Sec. 3.2.

    Example::

        >>> x = torch.randn(2, 4, 56, 56, 32)  # (B, H, height, width, D)
        >>> out = window_attention(x, x, x, window_size=7, shift_size=3)
    """
    return WINDOW(q, k, v, backend=backend, window_size=window_size, shift_size=shift_size, scale=scale, return_lse=return_lse)


WINDOW.function = window_attention


# ============================================================================================
# grid (L4): MaxViT's grid (dilated global) attention
# ============================================================================================
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
    sizes = _per_axis(value, n, int)
    if sizes is None or any(g < 1 for g in sizes):
        return f"a positive int or a tuple of {n} (one per spatial axis)"
    if any(g > size for g, size in zip(sizes, p.q_shape)):
        return f"at most the axis size on each axis {tuple(p.q_shape)} (a group takes one token per strip)"
    return None


GRID_PARAMS = (
    Param("grid_size", None, "tokens per group along each axis (MaxViT's G), spaced size // G apart", _check_grid_size, (None, 0, "7", 10**6), "int | tuple"),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _grid_mask(q: Tensor, k: Tensor, *, grid_size: Any) -> GridMask:
    shape = tuple(q.shape[2:-1])
    return GridMask(shape, _per_axis(grid_size, len(shape), int))


def _grid_sdpa(q, k, v, *, grid_size, scale, return_lse):
    """MaxViT's grid partition (timm's grid_partition): pad, group by offset, one SDPA over the groups."""
    pattern = _grid_mask(q, k, grid_size=grid_size)
    splits = _grid_splits(pattern.shape, pattern.grid)
    padded = [g * s for g, s in splits]
    qg, kg, vg = (_split_groups(_pad_to(x, padded), splits, group_is_inner=True) for x in (q, k, v))
    mask = None
    if padded != list(pattern.shape):  # padding: a key mask per group, a padded query sees itself
        real = _pad_to(torch.ones(1, 1, *pattern.shape, 1, device=q.device), padded)
        real_g = _split_groups(real, splits, group_is_inner=True)[:, 0, :, 0] > 0.5  # (groups, members)
        keys = real_g[:, None, :] | torch.diag_embed(~real_g)
        mask = keys.repeat(q.shape[0], 1, 1).unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out = _merge_groups(out, splits, True, q.shape[0])
    return out[(slice(None), slice(None)) + tuple(slice(0, size) for size in pattern.shape)]


def _grid_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:  # plain: MaxViT's 7 (or the axis)
        return {"grid_size": tuple(min(7, s) for s in p.q_shape)}
    params: dict[str, Any] = {"grid_size": tuple(rng.randrange(1, s + 1) for s in p.q_shape)}
    if rng.random() < 0.3:
        params["return_lse"] = True
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
_add_pattern_backends(GRID, _grid_mask)
GRID.implementation("sdpa", accepts=_no_lse, priority=50)(_grid_sdpa)


def grid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    grid_size: Any,
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
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, H, *spatial).
        backend: ``sdpa`` (timm's grid partition + one SDPA), ``tiled`` (LSE) or ``reference``.

    Cost: O(N * prod(grid_size) * D). Paper: MaxViT, Sec. 3.1.

    Example::

        >>> x = torch.randn(2, 4, 56, 56, 32)
        >>> out = grid_attention(x, x, x, grid_size=7)  # 7x7 tokens per group, 8 apart
    """
    return GRID(q, k, v, backend=backend, grid_size=grid_size, scale=scale, return_lse=return_lse)


GRID.function = grid_attention


# ============================================================================================
# halo (L6): HaloNet's blocked local attention
# ============================================================================================
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


def _check_halo_size(value: Any, p: Problem) -> Optional[str]:
    n = len(p.q_shape)
    sizes = _per_axis(value, n, int)
    return None if sizes is not None and all(x >= 0 for x in sizes) else f"a non-negative int or a tuple of {n}"


HALO_PARAMS = (
    Param("block_size", None, "query block size per axis (int or tuple); the last block may be shorter", _check_window_size, (None, 0, "8", 2.5), "int | tuple"),
    Param("halo_size", None, "keys beyond the block on each side, per axis (HaloNet's h)", _check_halo_size, (None, -1, "3"), "int | tuple"),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _halo_mask(q: Tensor, k: Tensor, *, block_size: Any, halo_size: Any) -> HaloMask:
    shape = tuple(q.shape[2:-1])
    n = len(shape)
    return HaloMask(shape, _per_axis(block_size, n, int), _per_axis(halo_size, n, int))


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


def _halo_sdpa(q, k, v, *, block_size, halo_size, scale, return_lse):
    """HaloNet's recipe: blocked queries, each block's keys unfolded with the halo, one masked SDPA."""
    pattern = _halo_mask(q, k, block_size=block_size, halo_size=halo_size)
    splits = _window_splits(pattern.shape, pattern.block)
    qb = _split_groups(_pad_to(q, [o * i for o, i in splits]), splits, group_is_inner=False)
    kb, vb = _halo_windows(k, pattern), _halo_windows(v, pattern)
    real = _halo_windows(torch.ones(1, 1, *pattern.shape, 1, device=q.device), pattern)[:, 0, :, 0] > 0.5  # (n_blocks, W)
    mask = None if bool(real.all()) else real.repeat(q.shape[0], 1)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out = _merge_groups(out, splits, False, q.shape[0])
    return out[(slice(None), slice(None)) + tuple(slice(0, size) for size in pattern.shape)]


def _halo_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:  # plain: HaloNet's 8x8 blocks with a halo of 3
        return {"block_size": tuple(min(8, s) for s in p.q_shape), "halo_size": 3}
    params: dict[str, Any] = {
        "block_size": tuple(rng.randrange(1, s + 2) for s in p.q_shape),
        "halo_size": tuple(rng.randrange(0, 4) for _ in p.q_shape),
    }
    if rng.random() < 0.3:
        params["return_lse"] = True
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
_add_pattern_backends(HALO, _halo_mask)
HALO.implementation("sdpa", accepts=_no_lse, priority=50)(_halo_sdpa)


def halo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: Any,
    halo_size: Any,
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
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, H, *spatial).
        backend: ``sdpa`` (keys unfolded per block + one SDPA), ``tiled`` (LSE) or ``reference``.

    Cost: O(N * prod(block_size + 2 * halo_size) * D). Paper: HaloNet, Sec. 2.2.

    Example::

        >>> x = torch.randn(2, 4, 32, 32, 32)
        >>> out = halo_attention(x, x, x, block_size=8, halo_size=3)
    """
    return HALO(q, k, v, backend=backend, block_size=block_size, halo_size=halo_size, scale=scale, return_lse=return_lse)


HALO.function = halo_attention


# ============================================================================================
# per_head_patterns (L7): a different sparse pattern for each head
# ============================================================================================
@dataclass(frozen=True)
class HeadPattern:
    """One head's keys: the union of the parts given (query position ``i' = i + offset``).

    - ``window=(left, right)``: keys ``i' - left <= j <= i' + right`` (None: unbounded side);
    - ``sinks=S``: the first S keys;
    - ``stride=(period, phase)``: every key with ``j % period == phase`` (a strided shard);
    - ``block=(size, shift)``: keys in the query's block of ``size`` after shifting positions by
      ``shift`` (``(i' + shift) // size == (j + shift) // size``: LongLoRA/SinkLoRA groups).
    """

    window: Optional[tuple[Optional[int], Optional[int]]] = None
    sinks: int = 0
    stride: Optional[tuple[int, int]] = None
    block: Optional[tuple[int, int]] = None

    def problem(self) -> Optional[str]:
        """What is wrong with the spec, or None."""
        if self.window is None and not self.sinks and self.stride is None and self.block is None:
            return "at least one of window, sinks, stride, block"
        if self.window is not None and not (len(self.window) == 2 and all(_is_extent(x) for x in self.window)):
            return "window as (left, right), each a non-negative int or None"
        if not (isinstance(self.sinks, int) and self.sinks >= 0):
            return "sinks as a non-negative int"
        if self.stride is not None and not (len(self.stride) == 2 and self.stride[0] >= 1 and 0 <= self.stride[1] < self.stride[0]):
            return "stride as (period >= 1, 0 <= phase < period)"
        if self.block is not None and not (len(self.block) == 2 and self.block[0] >= 1 and 0 <= self.block[1] < self.block[0]):
            return "block as (size >= 1, 0 <= shift < size)"
        return None

    def allows(self, qp: Tensor, kv: Tensor) -> Tensor:
        parts = []
        if self.window is not None:
            left, right = self.window
            ok = torch.ones_like(kv, dtype=torch.bool) if right is None else kv <= qp + right
            parts.append(ok if left is None else ok & (kv >= qp - left))
        if self.sinks:
            parts.append(kv < self.sinks)
        if self.stride is not None:
            parts.append(kv % self.stride[0] == self.stride[1])
        if self.block is not None:
            size, shift = self.block
            parts.append((qp + shift).div(size, rounding_mode="floor") == (kv + shift).div(size, rounding_mode="floor"))
        out = parts[0]
        for part in parts[1:]:
            out = out | part
        return out


@dataclass(frozen=True)
class PerHeadMask(masks.MaskMod):
    """Head h uses ``patterns[h]`` (or the single pattern for every head), causal if asked."""

    patterns: tuple[HeadPattern, ...]
    offset: int
    causal: bool
    cacheable = True
    head_dependent_only = True

    @property
    def batch_head_dependent(self) -> bool:  # type: ignore[override]
        return len(self.patterns) > 1

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qp = q_idx + self.offset
        result = None
        for head, pattern in enumerate(self.patterns):
            ok = pattern.allows(qp, kv_idx)
            if self.causal:
                ok = ok & (kv_idx <= qp)
            result = ok if result is None else torch.where(h == head, ok, result)
        return result


def _as_head_patterns(value: Any) -> Optional[tuple[HeadPattern, ...]]:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    out = []
    for spec in value:
        if isinstance(spec, dict):
            try:
                spec = HeadPattern(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()})
            except TypeError:
                return None
        if not isinstance(spec, HeadPattern):
            return None
        out.append(spec)
    return tuple(out)


def _check_head_patterns(value: Any, p: Problem) -> Optional[str]:
    patterns = _as_head_patterns(value)
    expected = f"a list of 1 or {p.q_heads} HeadPattern (or dicts of window/sinks/stride/block), one per query head"
    if patterns is None or len(patterns) not in (1, p.q_heads):
        return expected
    for head, pattern in enumerate(patterns):
        issue = pattern.problem()
        if issue is not None:
            return f"{expected}; head {head} needs {issue}"
    return None


PER_HEAD_PARAMS = (
    Param("head_patterns", None, "per query head: a HeadPattern (window, sinks, stride shard, shifted block), or one for all", _check_head_patterns, (None, [], [{}], [{"window": (-1, 0)}], "window"), "list[HeadPattern]"),
    flag("causal", False, "no key after the query"),
    choice("causal_alignment", ("bottom_right", "top_left"), "bottom_right", "when Nq != Nk, where query i sits among the keys: i + Nk - Nq (bottom_right) or i (top_left)"),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


def _per_head_mask(q: Tensor, k: Tensor, *, head_patterns: Any, causal: bool, causal_alignment: str) -> PerHeadMask:
    offset = k.shape[2] - q.shape[2] if causal_alignment == "bottom_right" else 0
    return PerHeadMask(_as_head_patterns(head_patterns), offset, causal)


def _per_head_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    causal = pattern.startswith("causal")
    if rng is None:  # plain: S2-Attention-like, a local window plus a strided shard per head
        w = max(1, min(128, p.kv_len // 8))
        heads = [HeadPattern(window=(w, 0 if causal else w), stride=(p.q_heads, h % p.q_heads)) for h in range(p.q_heads)]
        return {"head_patterns": heads, "causal": causal}

    def one() -> HeadPattern:
        spec: dict[str, Any] = {}
        if rng.random() < 0.6:
            spec["window"] = (rng.choice((None, 0, rng.randrange(0, 20))), rng.choice((None, 0, rng.randrange(0, 20))))
        if rng.random() < 0.4:
            spec["sinks"] = rng.randrange(1, 5)
        if rng.random() < 0.4:
            period = rng.randrange(1, 6)
            spec["stride"] = (period, rng.randrange(0, period))
        if rng.random() < 0.4 or not spec:
            size = rng.randrange(1, 12)
            spec["block"] = (size, rng.randrange(0, size))
        return HeadPattern(**spec)

    count = 1 if rng.random() < 0.2 else p.q_heads
    params: dict[str, Any] = {"head_patterns": [one() for _ in range(count)], "causal": causal}
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    if rng.random() < 0.3:
        params["return_lse"] = True
    return params


PER_HEAD = register(
    Mechanism(
        name="per_head_patterns",
        family="local",
        catalog=("L7",),
        paper="S2-Attention (hardware-aware context sharding); MoA (mixture of sparse attention); LongGen; SinkLoRA (SF-Attn)",
        formula="out_i^h = sum_{j in P_h(i)} softmax_j(scale q_i^h.k_j^h) v_j^h, P_h = window U sinks U stride shard U shifted block",
        cost="O(N * (visited keys per query) * D) on tiled; the tile plan is the union over heads",
        summary="a different sparse pattern per head: windows, sinks, strided shards, shifted groups (S2-Attn, MoA, LongGen, SinkLoRA)",
        patterns=frozenset(PATTERNS),
        params=PER_HEAD_PARAMS,
        gqa=True,
        sample_params=_per_head_sample_params,
    )
)
_add_pattern_backends(PER_HEAD, _per_head_mask, flex=True)


def per_head_patterns_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    head_patterns: Any,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Heterogeneous per-head sparse attention (catalog L7): head h attends the keys of ``head_patterns[h]``.

    Each :class:`HeadPattern` is a union of a local ``window``, ``sinks``, a strided shard
    (``stride=(period, phase)``) and a shifted ``block``; ``causal`` then removes later keys. The
    papers' patterns, expressed with it:

    - S2-Attention: head h reads shard h of the context plus a local window:
      ``HeadPattern(window=(w, 0), stride=(H, h % H))``.
    - MoA: per-head (per-layer) spans: ``HeadPattern(window=(span_h, 0))``.
    - LongGen: window + attention sinks + strided blocks:
      ``HeadPattern(window=(w, 0), sinks=4, stride=(period, 0))``.
    - SinkLoRA's SF-Attn (LongLoRA's shifted groups, plus sinks): half the heads
      ``HeadPattern(block=(G, 0), sinks=4)``, the other half ``HeadPattern(block=(G, G // 2), sinks=4)``.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D|Dv) (GQA allowed).
        head_patterns: one pattern per query head (or a single one for all), HeadPattern or dict.
        causal, causal_alignment: as in ``softmax_attention`` (bottom_right by default).
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, Hq, Nq).
        backend: ``tiled`` (the union of the heads' tiles, per-head element masks), ``flex``
            or ``reference``.

    Cost: O(N * keys per query * D) plus the tiles the heads' union touches.

    Example::

        >>> H = 8
        >>> heads = [HeadPattern(window=(128, 0), stride=(H, h)) for h in range(H)]  # S2-Attention
        >>> out = per_head_patterns_attention(q, k, v, head_patterns=heads, causal=True)
    """
    return PER_HEAD(
        q, k, v, backend=backend, head_patterns=head_patterns, causal=causal, causal_alignment=causal_alignment, scale=scale, return_lse=return_lse
    )


PER_HEAD.function = per_head_patterns_attention
