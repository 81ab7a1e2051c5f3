"""Attention patterns as predicates, and score modifications.

A *mask mod* is ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: True where query ``q_idx``
may attend key ``kv_idx`` (FlexAttention's convention; note that ``key_padding_mask`` follows
``nn.MultiheadAttention`` instead, True marking a key to ignore). Arguments are integer tensors
that broadcast against each other, so a mask mod is ordinary elementwise torch code, and the
same object drives all three converters:

* :func:`dense_mask`: a boolean ``(B|1, H|1, Nq, Nk)`` mask, for reference implementations;
* :func:`block_plan`: the tile lists of the tiled engine (:mod:`attnzoo.kernels.tiled`);
* :func:`flex_block_mask`: a FlexAttention ``BlockMask``.

The built-in masks know their tile structure in closed form, so building their plan costs
O(number of tiles); any other predicate is evaluated on the element grid in chunks of query
tiles (O(Nq * Nk) time, O(chunk * Nk) memory). A *score mod* is
``score_mod(score, b, h, q_idx, kv_idx) -> score``.

Positions follow the ``offset`` convention of causal attention: query ``i`` sits at key
position ``i + offset``; ``offset = Nk - Nq`` is bottom-right alignment (FlashAttention's,
the default of :func:`attnzoo.functional.softmax_attention`), ``offset = 0`` top-left.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .kernels.reference import index_grids
from .kernels.tiled import BlockPlan, _fit_block

__all__ = [
    "MaskMod",
    "ScoreMod",
    "causal",
    "causal_offset",
    "sliding_window",
    "prefix_lm",
    "sinks",
    "document",
    "and_masks",
    "or_masks",
    "alibi",
    "alibi_slopes",
    "softcap",
    "dense_mask",
    "block_plan",
    "plan_for",
    "flex_block_mask",
]

TileGrid = tuple[Tensor, Tensor]  # (visit, full), each (n_q_blocks, n_kv_blocks) bool


def _tile_bounds(length: int, block: int) -> tuple[Tensor, Tensor]:
    """First and last index of each tile (the last tile clipped to the length)."""
    first = torch.arange(0, length, block)
    return first, torch.clamp(first + block - 1, max=length - 1)


class MaskMod:
    """Base class of the built-in patterns: a predicate with a known tile structure.

    Subclasses implement ``__call__`` and, when they can, ``_tile_grid(q_first, q_last,
    kv_first, kv_last)`` returning ``(visit, full)``; ``visit`` may over-report and ``full``
    under-report, never the reverse.
    """

    batch_head_dependent = False
    #: a pure function of the indices (no tensors that could change): its tile plan may be cached
    cacheable = False

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> Optional[TileGrid]:
        return None

    def __and__(self, other: "MaskMod") -> "MaskMod":
        return and_masks(self, other)

    def __or__(self, other: "MaskMod") -> "MaskMod":
        return or_masks(self, other)


@dataclass(frozen=True)
class _Causal(MaskMod):
    offset: int = 0
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx + self.offset

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> TileGrid:
        visit = kf[None, :] <= ql[:, None] + self.offset
        full = kl[None, :] <= qf[:, None] + self.offset
        return visit, full


@dataclass(frozen=True)
class _SlidingWindow(MaskMod):
    left: Optional[int]
    right: Optional[int]
    offset: int = 0
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        centre = q_idx + self.offset
        ok = torch.ones_like(kv_idx, dtype=torch.bool) if self.right is None else kv_idx <= centre + self.right
        if self.left is not None:
            ok = ok & (kv_idx >= centre - self.left)
        return ok

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> TileGrid:
        big = 1 << 62
        right = big if self.right is None else self.right
        left = big if self.left is None else self.left
        lo_f, hi_l = qf[:, None] + self.offset - left, ql[:, None] + self.offset + right
        visit = (kf[None, :] <= hi_l) & (kl[None, :] >= lo_f)
        full = (kl[None, :] <= qf[:, None] + self.offset + right) & (kf[None, :] >= ql[:, None] + self.offset - left)
        return visit, full


@dataclass(frozen=True)
class _Combined(MaskMod):
    parts: tuple[MaskMod | Callable, ...]
    conjunction: bool

    @property
    def batch_head_dependent(self) -> bool:  # type: ignore[override]
        return any(getattr(p, "batch_head_dependent", True) for p in self.parts)

    @property
    def cacheable(self) -> bool:  # type: ignore[override]
        return all(getattr(p, "cacheable", False) for p in self.parts)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = self.parts[0](b, h, q_idx, kv_idx)
        for p in self.parts[1:]:
            other = p(b, h, q_idx, kv_idx)
            result = (result & other) if self.conjunction else (result | other)
        return result

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> Optional[TileGrid]:
        grids = [p._tile_grid(qf, ql, kf, kl) if isinstance(p, MaskMod) else None for p in self.parts]
        if any(g is None for g in grids):
            return None
        visit, full = grids[0]  # type: ignore[misc]
        for v, f in grids[1:]:  # type: ignore[misc]
            # AND: visit over-reports and full is exact; OR: visit exact and full under-reports
            visit, full = (visit & v, full & f) if self.conjunction else (visit | v, full | f)
        return visit, full


@dataclass(frozen=True, eq=False)
class _Document(MaskMod):
    q_segments: Tensor
    kv_segments: Tensor
    batch_head_dependent = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qs, ks = self.q_segments.to(q_idx.device), self.kv_segments.to(kv_idx.device)
        return qs[b, q_idx] == ks[b, kv_idx]


def causal_offset(q_len: int, kv_len: int, alignment: str) -> int:
    """The ``offset`` of :func:`causal` for an alignment: ``"bottom_right"`` (the last query sees
    every key: ``kv_len - q_len``, decoding's convention) or ``"top_left"`` (0)."""
    return kv_len - q_len if alignment == "bottom_right" else 0


def causal(offset: int = 0) -> MaskMod:
    """Key ``j`` visible from query ``i`` iff ``j <= i + offset`` (0: top-left, Nk - Nq: bottom-right)."""
    return _Causal(int(offset))


def sliding_window(left: Optional[int], right: Optional[int] = 0, offset: int = 0) -> MaskMod:
    """Keys ``i + offset - left <= j <= i + offset + right``; ``None`` leaves a side unbounded."""
    for name, val in (("left", left), ("right", right)):
        if val is not None and (not isinstance(val, int) or val < 0):
            raise ValueError(f"sliding_window: {name}: expected a non-negative int or None, got {val!r}")
    return _SlidingWindow(left, right, int(offset))


def prefix_lm(prefix_len: int, offset: int = 0) -> MaskMod:
    """Prefix-LM: every query sees the first ``prefix_len`` keys, the rest causally."""
    if not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_lm: prefix_len: expected a non-negative int, got {prefix_len!r}")
    return or_masks(_Prefix(prefix_len), _Causal(offset))


@dataclass(frozen=True)
class _Prefix(MaskMod):
    length: int
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # every query, whatever its index (a padded sequence may shift queries below 0): q_idx == q_idx only broadcasts
        return (kv_idx < self.length) & (q_idx == q_idx)

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> TileGrid:
        visit = (kf < self.length)[None, :].expand(len(qf), -1)
        full = (kl < self.length)[None, :].expand(len(qf), -1)
        return visit.clone(), full.clone()


def sinks(count: int) -> MaskMod:
    """Attention sinks (StreamingLLM): every query sees the first ``count`` keys."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"sinks: count: expected a non-negative int, got {count!r}")
    return _Prefix(count)


def document(segment_ids: Tensor, kv_segment_ids: Optional[Tensor] = None) -> MaskMod:
    """Queries attend keys of the same document: ``segment_ids`` (B, Nq) (or (Nq,)) of ints.

    ``kv_segment_ids`` (B, Nk) for cross attention; the same as ``segment_ids`` by default.
    Combine with :func:`causal` for packed causal training.
    """
    q = segment_ids if segment_ids.dim() == 2 else segment_ids.unsqueeze(0)
    kv = q if kv_segment_ids is None else (kv_segment_ids if kv_segment_ids.dim() == 2 else kv_segment_ids.unsqueeze(0))
    if q.dtype.is_floating_point or kv.dtype.is_floating_point:
        raise TypeError("document: segment ids must be integer tensors")
    return _Document(q, kv)


def and_masks(*masks: Union[MaskMod, Callable]) -> MaskMod:
    """A query sees a key when every mask allows it."""
    return _Combined(tuple(masks), True)


def or_masks(*masks: Union[MaskMod, Callable]) -> MaskMod:
    """A query sees a key when any mask allows it."""
    return _Combined(tuple(masks), False)


# --------------------------------------------------------------------------------------------
# score mods
# --------------------------------------------------------------------------------------------
class ScoreMod:
    """Base class of the built-in score modifications (functions of the score and positions)."""

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class _ALiBi(ScoreMod):
    slopes: Tensor
    offset: int

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        slope = self.slopes.to(device=score.device, dtype=score.dtype)[h]
        return score - slope * (q_idx + self.offset - kv_idx).abs().to(score.dtype)


@dataclass(frozen=True)
class _Softcap(ScoreMod):
    cap: float

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.cap * torch.tanh(score / self.cap)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's head slopes: the geometric sequence 2^(-8h/H), interleaved when H is not a power of 2."""
    def powers(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(powers(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = powers(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(powers(closest) + extra)


def alibi(slopes: Union[Tensor, int], offset: int = 0) -> ScoreMod:
    """ALiBi (Press et al., 2022): ``score - m_h * |i + offset - j|``; ``slopes`` (H,) or a head count."""
    if isinstance(slopes, int):
        slopes = alibi_slopes(slopes)
    return _ALiBi(slopes.detach(), int(offset))


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2): ``cap * tanh(score / cap)``."""
    if not cap > 0:
        raise ValueError(f"softcap: cap: expected a positive number, got {cap!r}")
    return _Softcap(float(cap))


# --------------------------------------------------------------------------------------------
# converters
# --------------------------------------------------------------------------------------------
def dense_mask(
    mask_mod: Callable, q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1, device: Optional[torch.device] = None
) -> Tensor:
    """The pattern as a boolean tensor broadcastable to (B, H, Nq, Nk); True = attend."""
    out = torch.as_tensor(mask_mod(*index_grids(batch, heads, q_len, kv_len, device)), device=device).bool()
    shape = torch.broadcast_shapes(out.shape, (1, 1, q_len, kv_len))
    return out.expand(shape)


def _grid_by_evaluation(
    mask_mod: Callable, q_len: int, kv_len: int, block_q: int, block_k: int, batch: int, heads: int
) -> TileGrid:
    n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_k)
    b, h = index_grids(batch, heads, 0, 0, None)[:2]
    kv = torch.arange(n_kv * block_k).clamp(max=kv_len - 1).view(1, 1, 1, -1)
    inside_kv = (torch.arange(n_kv * block_k) < kv_len).view(1, 1, 1, n_kv, block_k)
    # evaluate a few query tiles at a time so memory stays O(chunk * Nk)
    tiles_per_chunk = max(1, (1 << 22) // max(1, block_q * n_kv * block_k * batch * heads))
    visit = torch.zeros(n_q, n_kv, dtype=torch.bool)
    full = torch.zeros(n_q, n_kv, dtype=torch.bool)
    for start in range(0, n_q, tiles_per_chunk):
        stop = min(n_q, start + tiles_per_chunk)
        q = torch.arange(start * block_q, stop * block_q).clamp(max=q_len - 1).view(1, 1, -1, 1)
        m = torch.as_tensor(mask_mod(b, h, q, kv)).bool()
        m = m.expand(*m.shape[:2], q.shape[2], kv.shape[3]).reshape(*m.shape[:2], stop - start, block_q, n_kv, block_k)
        m_in = m & inside_kv.unsqueeze(2)
        visit[start:stop] = m_in.any(dim=(0, 1, 3, 5))
        full[start:stop] = (m | ~inside_kv.unsqueeze(2)).all(dim=(0, 1, 3, 5))
    return visit, full


def tile_grid(
    mask_mod: Callable, q_len: int, kv_len: int, block_q: int, block_k: int, *, batch: int = 1, heads: int = 1
) -> TileGrid:
    """``(visit, full)`` tile grids of a pattern: in closed form for the built-ins, else evaluated."""
    if isinstance(mask_mod, MaskMod):
        qf, ql = _tile_bounds(q_len, block_q)
        kf, kl = _tile_bounds(kv_len, block_k)
        grid = mask_mod._tile_grid(qf, ql, kf, kl)
        if grid is not None:
            return grid
    return _grid_by_evaluation(mask_mod, q_len, kv_len, block_q, block_k, batch, heads)


def block_plan(
    mask_mod: Optional[Callable],
    q_len: int,
    kv_len: int,
    *,
    block_q: int = 128,
    block_k: int = 128,
    batch: int = 1,
    heads: int = 1,
) -> BlockPlan:
    """The tiled engine's plan for a pattern (all tiles when ``mask_mod`` is None)."""
    if mask_mod is None:
        return BlockPlan.dense(q_len, kv_len, block_q, block_k)
    visit, full = tile_grid(mask_mod, q_len, kv_len, block_q, block_k, batch=batch, heads=heads)
    return BlockPlan.from_grid(visit, full, q_len, kv_len, block_q, block_k)


#: The tile size of the engine's plans (shrunk for short inputs by ``_fit_block``).
TILE = 128


@functools.lru_cache(maxsize=256)
def _cached_block_plan(mask_mod: Any, q_len: int, kv_len: int, block_q: int, block_k: int, batch: int, heads: int) -> BlockPlan:
    return block_plan(mask_mod, q_len, kv_len, block_q=block_q, block_k=block_k, batch=batch, heads=heads)


def plan_for(mask_mod: Optional[Callable], q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1) -> BlockPlan:
    """The tiled engine's plan for one call: tiles of :data:`TILE` (smaller for short inputs).

    A pattern that depends on the batch or head is planned over all of them (the union of their
    tiles). Plans of ``cacheable`` patterns (the built-ins: pure functions of the indices) are
    cached; any other predicate may read tensors that change between calls and is planned anew.
    """
    if mask_mod is None or not getattr(mask_mod, "batch_head_dependent", True):
        batch = heads = 1
    elif getattr(mask_mod, "head_dependent_only", False):
        batch = 1
    block_q, block_k = _fit_block(TILE, q_len), _fit_block(TILE, kv_len)
    if mask_mod is None or getattr(mask_mod, "cacheable", False):
        return _cached_block_plan(mask_mod, q_len, kv_len, block_q, block_k, batch, heads)
    return block_plan(mask_mod, q_len, kv_len, block_q=block_q, block_k=block_k, batch=batch, heads=heads)


def flex_block_mask(
    mask_mod: Callable,
    q_len: int,
    kv_len: int,
    *,
    batch: Optional[int] = None,
    heads: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    block_size: int = 128,
):  # -> torch.nn.attention.flex_attention.BlockMask
    """A FlexAttention ``BlockMask`` for the pattern (batch/heads None: shared across them).

    Building one evaluates the predicate on the whole Nq x Nk grid (on ``device``), which at long
    lengths costs more than the attention it drives; masks of ``cacheable`` patterns (the
    built-ins: pure functions of the indices) are therefore built once per shape and device
    and reused, as the tiled engine's plans are (:func:`plan_for`).
    """
    if not getattr(mask_mod, "batch_head_dependent", True):
        batch = heads = None
    elif getattr(mask_mod, "head_dependent_only", False):
        batch = None
    if getattr(mask_mod, "cacheable", False):
        return _cached_flex_block_mask(mask_mod, q_len, kv_len, batch, heads, torch.device(device), block_size)
    return _create_flex_block_mask(mask_mod, q_len, kv_len, batch, heads, device, block_size)


def _create_flex_block_mask(mask_mod: Callable, q_len: int, kv_len: int, batch: Optional[int], heads: Optional[int], device: Any, block_size: int):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device, BLOCK_SIZE=block_size)


#: BlockMasks of cacheable patterns; a few MB each at 128k tokens (four int32 block tables).
@functools.lru_cache(maxsize=32)
def _cached_flex_block_mask(mask_mod: Any, q_len: int, kv_len: int, batch: Optional[int], heads: Optional[int], device: torch.device, block_size: int):
    return _create_flex_block_mask(mask_mod, q_len, kv_len, batch, heads, device, block_size)
