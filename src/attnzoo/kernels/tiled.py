"""Tiled online-softmax attention: the FlashAttention-2 algorithm in plain PyTorch.

FlashAttention-2 (Dao, 2023), Algorithm 1 (forward) and Algorithm 2 (backward): queries and
keys are cut into tiles; for each query tile the visited key tiles are folded in one at a time
with the online softmax (running max ``m``, running sum ``l``, rescaled accumulator), so no
``Nq x Nk`` matrix exists; the forward returns the log-sum-exp ``lse = m + log l`` and the
backward recomputes ``P = exp(S - lse)`` tile by tile (``dS = P * (dP - rowsum(dO * O))``).

What makes this the engine of every tiled pattern is the :class:`BlockPlan`: which key tiles
each query tile visits, and which visited tiles are only partly inside the pattern (those get
an element mask from ``mask_mod``). The plan is a list of *slots*; one slot is one batched step
of the online softmax in which every active query tile meets exactly one key tile:

* key-outer slots: one key tile met by all the query tiles that visit it (dense and causal
  attention: each slot is a single large GEMM per head);
* query-outer slots: the s-th visited key tile of every query tile (sliding windows: a few
  slots, each covering every query tile).

Contiguous selections stay views (no gather); other selections are gathered with
``index_select`` and written back with ``index_copy_``/``index_add_``. Memory is
O(N * tile) for any pattern: the largest temporary is one slot's score tiles.

Cost: O(visited pairs * D) time, O((Nq + Nk) * D + Nq * tile) memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .reference import default_scale

__all__ = ["Slot", "BlockPlan", "tiled_attention", "MaskFn", "ScoreFn", "score_mod_grad_captures"]

#: ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: True where the query may attend the key.
MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
#: ``score_mod(score, b, h, q_idx, kv_idx) -> tensor``: a modified score (FlexAttention style).
ScoreFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

Selection = Union[slice, Tensor]

#: Query tiles one slot takes at most. It bounds a slot's score tiles (the engine's largest
#: temporary) to B * H * 16 * 128 * tile floats whatever N is; measured on a 2-core CPU at
#: N = 4096, 8-16 tiles ran as fast as or slightly faster than no bound, 2-4 tiles slower.
MAX_Q_TILES_PER_SLOT = 16


@dataclass(frozen=True)
class Slot:
    """One step of the online softmax: query tiles ``q_blocks`` each meet one key tile.

    ``kv_blocks`` is an int (the same key tile for all), a slice or an index tensor (one key
    tile per active query tile). ``masked`` is the slot-local range of query tiles whose
    tile pair is only partly inside the pattern (``None``: all pairs fully inside).
    """

    q_blocks: Selection
    kv_blocks: Union[int, Selection]
    masked: Optional[slice]

    @property
    def n_active(self) -> int:
        return _sel_len(self.q_blocks)


def _sel_len(sel: Selection) -> int:
    if isinstance(sel, slice):
        return sel.stop - sel.start
    return int(sel.numel())


def _as_selection(idx: Tensor) -> Selection:
    """A sorted index tensor as a slice when it is a contiguous run (so tiles stay views)."""
    n = idx.numel()
    first, last = int(idx[0]), int(idx[-1])
    return slice(first, first + n) if last - first + 1 == n else idx


def _kv_selection(idx: Tensor) -> Union[int, Selection]:
    first = int(idx[0])
    if bool((idx == first).all()):
        return first
    if idx.numel() > 1 and bool((idx[1:] - idx[:-1] == 1).all()):
        return slice(first, first + idx.numel())
    return idx


def _masked_range(partial: Tensor) -> Optional[slice]:
    hits = partial.nonzero().flatten()
    if hits.numel() == 0:
        return None
    return slice(int(hits[0]), int(hits[-1]) + 1)


@dataclass(frozen=True)
class BlockPlan:
    """Which key tiles each query tile visits, as slots for :func:`tiled_attention`.

    Build one with :meth:`dense` or :meth:`from_grid` (``attnzoo.masks.block_plan`` builds
    one from a mask predicate). ``pairs`` counts the visited tile pairs.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    slots: tuple[Slot, ...]
    pairs: int

    @property
    def n_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def n_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    @property
    def density(self) -> float:
        """Fraction of tile pairs visited."""
        return self.pairs / max(1, self.n_q_blocks * self.n_kv_blocks)

    @classmethod
    def dense(cls, q_len: int, kv_len: int, block_q: int, block_k: int) -> "BlockPlan":
        n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_k)
        visit = torch.ones(n_q, n_kv, dtype=torch.bool)
        return cls.from_grid(visit, visit.clone(), q_len, kv_len, block_q, block_k)

    @classmethod
    def from_grid(
        cls, visit: Tensor, full: Tensor, q_len: int, kv_len: int, block_q: int, block_k: int
    ) -> "BlockPlan":
        """A plan from tile grids ``visit`` (some pair inside) and ``full`` (all pairs inside).

        Both are ``(n_q_blocks, n_kv_blocks)`` bool tensors; ``visit`` may over-report and
        ``full`` under-report (that costs time, not correctness). Picks key-outer or
        query-outer slots, whichever needs fewer steps; a slot takes at most
        :data:`MAX_Q_TILES_PER_SLOT` query tiles, so memory stays O(N * tile) for any N.
        """
        n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_k)
        if tuple(visit.shape) != (n_q, n_kv) or tuple(full.shape) != (n_q, n_kv):
            raise ValueError(f"grids must be ({n_q}, {n_kv}), got {tuple(visit.shape)} and {tuple(full.shape)}")
        visit = visit.cpu().bool()
        full = full.cpu().bool() & visit
        if kv_len % block_k:  # the padded tail of the last key tile is always masked
            full[:, -1] = False
        partial = visit & ~full
        pairs = int(visit.sum())
        kv_used = visit.any(0).nonzero().flatten()
        per_q = visit.sum(1)
        n_query_outer = int(per_q.max()) if n_q else 0
        if kv_used.numel() <= n_query_outer:
            slots = cls._key_outer(visit, partial, kv_used)
        else:
            slots = cls._query_outer(visit, partial, per_q, n_query_outer)
        return cls(q_len, kv_len, block_q, block_k, tuple(slots), pairs)

    # Both layouts run chunk by chunk of MAX_Q_TILES_PER_SLOT query tiles: one chunk's
    # accumulator stays in cache while the key/value tiles stream past it.
    @staticmethod
    def _key_outer(visit: Tensor, partial: Tensor, kv_used: Tensor) -> list[Slot]:
        slots = []
        for first in range(0, visit.shape[0], MAX_Q_TILES_PER_SLOT):
            chunk = visit[first : first + MAX_Q_TILES_PER_SLOT]
            for kb in kv_used.tolist():
                q_idx = chunk[:, kb].nonzero().flatten() + first
                if q_idx.numel():
                    slots.append(Slot(_as_selection(q_idx), kb, _masked_range(partial[q_idx, kb])))
        return slots

    @staticmethod
    def _query_outer(visit: Tensor, partial: Tensor, per_q: Tensor, n_slots: int) -> list[Slot]:
        # Each query tile lists its key tiles nearest-last first (the diagonal for causal), so
        # the partly-masked tiles gather in the first slots and later slots need no mask.
        n_kv = visit.shape[1]
        keyed = torch.where(visit, torch.arange(n_kv) + 1, torch.zeros((), dtype=torch.long))
        order = keyed.sort(dim=1, descending=True).values - 1
        slots = []
        for first in range(0, visit.shape[0], MAX_Q_TILES_PER_SLOT):
            counts = per_q[first : first + MAX_Q_TILES_PER_SLOT]
            for s in range(n_slots):
                q_idx = (counts > s).nonzero().flatten() + first
                if q_idx.numel():
                    kv_idx = order[q_idx, s]
                    slots.append(Slot(_as_selection(q_idx), _kv_selection(kv_idx), _masked_range(partial[q_idx, kv_idx])))
        return slots


# --------------------------------------------------------------------------------------------
# layout helpers: (B, H, N, D) <-> tiles (B, Hkv, G, n_blocks, block, D)
# --------------------------------------------------------------------------------------------
def _pad_len(x: Tensor, n_blocks: int, block: int) -> Tensor:
    pad = n_blocks * block - x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def _q_tiles(x: Tensor, kv_heads: int, n_blocks: int, block: int, dtype: torch.dtype) -> Tensor:
    b, h, _, d = x.shape
    x = _pad_len(x.to(dtype), n_blocks, block)
    return x.reshape(b, kv_heads, h // kv_heads, n_blocks, block, d)


def _kv_tiles(x: Tensor, n_blocks: int, block: int, dtype: torch.dtype) -> Tensor:
    b, h, _, d = x.shape
    return _pad_len(x.to(dtype), n_blocks, block).reshape(b, h, 1, n_blocks, block, d)


def _untile(x: Tensor, length: int) -> Tensor:
    b, hkv, g, nb, blk = x.shape[:5]
    return x.reshape(b, hkv * g, nb * blk, *x.shape[5:])[:, :, :length]


def _take(x: Tensor, dim: int, sel: Union[int, Selection]) -> Tensor:
    """Tiles along ``dim``: a view for an int or a slice, a gathered copy for an index."""
    if isinstance(sel, int):
        return x.narrow(dim, sel, 1)
    if isinstance(sel, slice):
        return x.narrow(dim, sel.start, sel.stop - sel.start)
    return x.index_select(dim, sel.to(x.device))


def _put(x: Tensor, dim: int, sel: Selection, value: Tensor) -> None:
    """Write ``value`` back where :func:`_take` read it (a no-op for views updated in place)."""
    if not isinstance(sel, (int, slice)):
        x.index_copy_(dim, sel.to(x.device), value)


def _accumulate(x: Tensor, dim: int, sel: Union[int, Selection], value: Tensor) -> None:
    if isinstance(sel, (int, slice)):
        _take(x, dim, sel).add_(value)
    else:
        x.index_add_(dim, sel.to(x.device), value)


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    plan: BlockPlan
    scale: float
    mask_mod: Optional[MaskFn]
    score_mod: Optional[ScoreFn]
    kv_keep: Optional[Tensor]  # (B, 1, 1, n_kv_blocks, 1, block_k) bool, True = key kept


class _Tiles:
    """Index tensors and operand tiles of one slot (shared by forward and backward)."""

    def __init__(self, plan: BlockPlan, slot: Slot, batch: int, kv_heads: int, group: int, device: torch.device):
        bq, bk = plan.block_q, plan.block_k
        self.slot = slot
        q_first = self._first_rows(slot.q_blocks, bq, device)
        self.q_idx = (q_first[:, None] + torch.arange(bq, device=device)[None, :])[:, :, None]  # (nA, bq, 1)
        kv = slot.kv_blocks
        if isinstance(kv, int):
            self.kv_idx = (kv * bk + torch.arange(bk, device=device)).view(1, 1, bk)
        else:
            kv_first = self._first_rows(kv, bk, device)
            self.kv_idx = (kv_first[:, None] + torch.arange(bk, device=device)[None, :])[:, None, :]
        self.b_idx = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1, 1)
        self.h_idx = torch.arange(kv_heads * group, device=device).view(1, kv_heads, group, 1, 1, 1)
        self.const_kv = isinstance(kv, int)

    @staticmethod
    def _first_rows(sel: Selection, block: int, device: torch.device) -> Tensor:
        if isinstance(sel, slice):
            return torch.arange(sel.start, sel.stop, device=device) * block
        return sel.to(device) * block


def _scores(
    spec: _Spec, t: _Tiles, q: Tensor, k: Tensor, bias_tile: Optional[Tensor], *, want_raw: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    """Masked scores of one slot, (B, Hkv, G, nA, bq, bk); with ``want_raw`` also the leaf
    tensor that ``score_mod`` was applied to (for its gradient in the backward)."""
    plan = spec.plan
    if t.const_kv:  # one key tile for every row: a single GEMM per head
        b, hkv, g, na, bq, d = q.shape
        s = torch.matmul(q.reshape(b, hkv, g, na * bq, d), k.squeeze(3).transpose(-1, -2))
        s = s.view(b, hkv, g, na, bq, -1)
    else:
        s = torch.matmul(q, k.transpose(-1, -2))
    if bias_tile is not None:
        s = s + bias_tile
    raw = None
    if spec.score_mod is not None:
        if want_raw:
            raw = s.detach().requires_grad_(True)
            s = raw
        q_pos = t.q_idx.clamp(max=plan.q_len - 1)
        kv_pos = t.kv_idx.clamp(max=plan.kv_len - 1)
        with torch.set_grad_enabled(want_raw):  # the backward runs with grad mode off
            s = spec.score_mod(s, t.b_idx, t.h_idx, q_pos, kv_pos)
        if want_raw:
            s_mod = s
            s = s.detach().clone()
            return _apply_masks(spec, t, s), (raw, s_mod)  # type: ignore[return-value]
    return _apply_masks(spec, t, s), raw


def _apply_masks(spec: _Spec, t: _Tiles, s: Tensor) -> Tensor:
    plan = spec.plan
    if spec.kv_keep is not None:
        keep = _take(spec.kv_keep, 3, t.slot.kv_blocks)
        s = s.masked_fill(~keep, float("-inf"))
    rows = t.slot.masked
    if rows is not None:
        q_idx = t.q_idx[rows]
        kv_idx = t.kv_idx if t.const_kv else t.kv_idx[rows]
        inside = kv_idx < plan.kv_len
        if spec.mask_mod is not None:
            allowed = spec.mask_mod(
                t.b_idx, t.h_idx, q_idx.clamp(max=plan.q_len - 1), kv_idx.clamp(max=plan.kv_len - 1)
            )
            inside = inside & allowed
        s[:, :, :, rows].masked_fill_(~inside, float("-inf"))
    return s


def _bias_tiles(bias: Tensor, q_heads: int, kv_heads: int, plan: BlockPlan, dtype: torch.dtype) -> Tensor:
    """The bias as tiles (Bb, Hkv|1, G|1, n_q_blocks, bq, n_kv_blocks, bk), zero-padded."""
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    bb, hb = bias.shape[:2]
    full = bias.to(dtype).expand(bb, hb, plan.q_len, plan.kv_len)
    nq, nk = plan.n_q_blocks * plan.block_q, plan.n_kv_blocks * plan.block_k
    padded = full.new_zeros(bb, hb, nq, nk)
    padded[:, :, : plan.q_len, : plan.kv_len] = full
    hkv, g = (kv_heads, q_heads // kv_heads) if hb == q_heads else (1, 1)
    return padded.view(bb, hkv, g, plan.n_q_blocks, plan.block_q, plan.n_kv_blocks, plan.block_k)


def _bias_tile(tiles: Tensor, slot: Slot) -> Tensor:
    """The slot's (Bb, ., ., nA, bq, bk) bias tiles: a view unless the selection is an index."""
    q_sel, kv_sel = slot.q_blocks, slot.kv_blocks
    if isinstance(kv_sel, int):
        return _take(tiles, 3, q_sel).select(5, kv_sel)
    if isinstance(q_sel, slice) and isinstance(kv_sel, slice):
        # the pairs (q_sel.start + i, kv_sel.start + i) lie on one diagonal of the tile grid
        # (diagonal index j is the pair (j, j + offset) above the main diagonal, (j - offset, j) below)
        diag = tiles.diagonal(offset=kv_sel.start - q_sel.start, dim1=3, dim2=5)
        first = min(q_sel.start, kv_sel.start)
        return diag.narrow(-1, first, q_sel.stop - q_sel.start).movedim(-1, 3)
    q_i = torch.arange(q_sel.start, q_sel.stop) if isinstance(q_sel, slice) else q_sel
    kv_i = torch.arange(kv_sel.start, kv_sel.stop) if isinstance(kv_sel, slice) else kv_sel
    return tiles[:, :, :, q_i.to(tiles.device), :, kv_i.to(tiles.device), :].movedim(0, 3)


def _add_bias_grad(tiles: Tensor, slot: Slot, grad: Tensor) -> None:
    bb, hb, gb = tiles.shape[:3]
    grad = grad.sum_to_size(bb, hb, gb, *grad.shape[3:])
    q_sel, kv_sel = slot.q_blocks, slot.kv_blocks
    if isinstance(q_sel, slice) and isinstance(kv_sel, (int, slice)):
        _bias_tile(tiles, slot).add_(grad)  # a view into ``tiles``
        return
    if isinstance(kv_sel, int):
        tiles.select(5, kv_sel).index_add_(3, q_sel.to(tiles.device), grad)
        return
    q_i = torch.arange(q_sel.start, q_sel.stop) if isinstance(q_sel, slice) else q_sel
    kv_i = torch.arange(kv_sel.start, kv_sel.stop) if isinstance(kv_sel, slice) else kv_sel
    # each (q tile, kv tile) pair occurs once per slot, so a read-add-write accumulates exactly
    tiles[:, :, :, q_i.to(tiles.device), :, kv_i.to(tiles.device), :] += grad.movedim(3, 0)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # low precision inputs accumulate in float32, as FlashAttention does
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], spec: _Spec) -> tuple[Tensor, Tensor]:
    plan = spec.plan
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    cdt = _compute_dtype(q.dtype)
    qt = _q_tiles(q, kv_heads, plan.n_q_blocks, plan.block_q, cdt) * spec.scale
    kt = _kv_tiles(k, plan.n_kv_blocks, plan.block_k, cdt)
    vt = _kv_tiles(v, plan.n_kv_blocks, plan.block_k, cdt)
    bias_t = None if bias is None else _bias_tiles(bias, q_heads, kv_heads, plan, cdt)
    acc = qt.new_zeros(*qt.shape[:5], v.shape[-1])
    m = qt.new_full(qt.shape[:5], float("-inf"))
    rowsum = qt.new_zeros(qt.shape[:5])
    for slot in plan.slots:
        t = _Tiles(plan, slot, batch, kv_heads, group, q.device)
        q_a = _take(qt, 3, slot.q_blocks)
        s, _ = _scores(spec, t, q_a, _take(kt, 3, slot.kv_blocks), None if bias_t is None else _bias_tile(bias_t, slot))
        acc_a, m_a, rowsum_a = (_take(x, 3, slot.q_blocks) for x in (acc, m, rowsum))
        m_new = torch.maximum(m_a, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing seen yet
        p = s.sub_(m_safe.unsqueeze(-1)).exp_()
        alpha = (m_a - m_safe).exp_()
        rowsum_a.mul_(alpha).add_(p.sum(-1))
        acc_a.mul_(alpha.unsqueeze(-1)).add_(_pv(p, _take(vt, 3, slot.kv_blocks), t.const_kv))
        m_a.copy_(m_new)
        for full, part in ((acc, acc_a), (m, m_a), (rowsum, rowsum_a)):
            _put(full, 3, slot.q_blocks, part)
    empty = rowsum == 0  # rows whose keys are all masked: output 0, lse -inf
    out = acc / torch.where(empty, 1.0, rowsum).unsqueeze(-1)
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, rowsum)))
    return _untile(out, plan.q_len), _untile(lse, plan.q_len)  # out in the compute dtype


def _pv(p: Tensor, v: Tensor, const_kv: bool) -> Tensor:
    """P @ V for one slot; p (B, Hkv, G, nA, bq, bk), v tiles (B, Hkv, 1, nA|1, bk, Dv)."""
    if const_kv:
        b, hkv, g, na, bq, bk = p.shape
        return torch.matmul(p.view(b, hkv, g, na * bq, bk), v.squeeze(3)).view(b, hkv, g, na, bq, -1)
    return torch.matmul(p, v)


def _backward(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    spec: _Spec,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    plan = spec.plan
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    nq, nk, bq, bk = plan.n_q_blocks, plan.n_kv_blocks, plan.block_q, plan.block_k
    cdt = _compute_dtype(q.dtype)
    qt = _q_tiles(q, kv_heads, nq, bq, cdt) * spec.scale
    kt = _kv_tiles(k, nk, bk, cdt)
    vt = _kv_tiles(v, nk, bk, cdt)
    dot = _q_tiles(grad_out, kv_heads, nq, bq, cdt)
    ot = _q_tiles(out, kv_heads, nq, bq, cdt)
    delta = (dot * ot).sum(-1)  # rowsum(dO * O), FA2 eq. (D_i)
    if grad_lse is not None:
        # d lse_i / d s_ij = P_ij, so the LSE's gradient g_i adds g_i P_ij to dS_ij: the same
        # P * (dP - D) with D_i - g_i (merging partial results through their LSE needs this)
        glse = grad_lse.masked_fill(lse == float("-inf"), 0.0)
        delta = delta - _q_tiles(glse.unsqueeze(-1), kv_heads, nq, bq, cdt).squeeze(-1)
    lse_t = _q_tiles(lse.unsqueeze(-1), kv_heads, nq, bq, cdt).squeeze(-1)
    lse_t = lse_t.masked_fill(lse_t == float("-inf"), 0.0)  # empty rows: every s is -inf, p = 0
    bias_t = None if bias is None else _bias_tiles(bias, q_heads, kv_heads, plan, cdt)
    dbias_t = None if bias is None or not bias.requires_grad else torch.zeros_like(bias_t)
    dq = torch.zeros_like(qt)
    dk = torch.zeros(batch, kv_heads, nk, bk, k.shape[-1], dtype=cdt, device=q.device)
    dv = torch.zeros(batch, kv_heads, nk, bk, v.shape[-1], dtype=cdt, device=q.device)
    for slot in plan.slots:
        t = _Tiles(plan, slot, batch, kv_heads, group, q.device)
        q_a = _take(qt, 3, slot.q_blocks)
        k_a = _take(kt, 3, slot.kv_blocks)
        v_a = _take(vt, 3, slot.kv_blocks)
        s, raw = _scores(
            spec, t, q_a, k_a, None if bias_t is None else _bias_tile(bias_t, slot), want_raw=spec.score_mod is not None
        )
        p = s.sub_(_take(lse_t, 3, slot.q_blocks).unsqueeze(-1)).exp_()
        do_a = _take(dot, 3, slot.q_blocks)
        _kv_grad(dv, slot, p, do_a, t.const_kv)
        dp = _pv(do_a, v_a.transpose(-1, -2), t.const_kv)
        ds = p.mul_(dp.sub_(_take(delta, 3, slot.q_blocks).unsqueeze(-1)))
        if raw is not None:  # chain rule through score_mod, d(score_mod)/d(score)
            leaf, s_mod = raw
            ds = torch.autograd.grad(s_mod, leaf, ds)[0]
        if dbias_t is not None:
            _add_bias_grad(dbias_t, slot, ds)
        dq_a = _pv(ds, k_a, t.const_kv)
        _accumulate(dq, 3, slot.q_blocks, dq_a)
        _kv_grad(dk, slot, ds, q_a, t.const_kv)
    dq_out = _untile(dq * spec.scale, plan.q_len).to(q.dtype)
    dk_out = dk.reshape(batch, kv_heads, nk * bk, -1)[:, :, : plan.kv_len].to(k.dtype)
    dv_out = dv.reshape(batch, kv_heads, nk * bk, -1)[:, :, : plan.kv_len].to(v.dtype)
    dbias = None
    if dbias_t is not None:
        bb, hb = dbias_t.shape[0], dbias_t.shape[1] * dbias_t.shape[2]
        full = dbias_t.reshape(bb, hb, nq * bq, nk * bk)[:, :, : plan.q_len, : plan.kv_len]
        dbias = full.sum_to_size(*([1] * (4 - bias.dim())), *bias.shape).reshape(bias.shape).to(bias.dtype)
    return dq_out, dk_out, dv_out, dbias


def _kv_grad(dst: Tensor, slot: Slot, p: Tensor, rows: Tensor, const_kv: bool) -> None:
    """dst[kv tiles] += sum over query heads of the group and rows of p^T @ rows."""
    b, hkv, g, na, bq, bk = p.shape
    if const_kv:
        pt = p.reshape(b, hkv, g * na * bq, bk).transpose(-1, -2)
        grad = torch.matmul(pt, rows.reshape(b, hkv, g * na * bq, -1))  # (B, Hkv, bk, D)
        dst.select(2, slot.kv_blocks).add_(grad)
        return
    grad = torch.matmul(p.transpose(-1, -2), rows).sum(2)  # (B, Hkv, nA, bk, D)
    _accumulate(dst, 2, slot.kv_blocks, grad)


def score_mod_grad_captures(fn: Any) -> list[str]:
    """Names of tensors requiring grad that ``fn`` captures (closure cells, attributes, partial args).

    The engine differentiates a score_mod in the score only; a caller holding such captures
    must use a backend that differentiates everything (the reference).
    """
    found = []
    cells = getattr(fn, "__closure__", None) or ()
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    for name, cell in zip(names, cells):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, Tensor) and value.requires_grad:
            found.append(name)
    for name, value in list(getattr(fn, "__dict__", {}).items()) + list(enumerate(getattr(fn, "args", ()))):
        if isinstance(value, Tensor) and value.requires_grad:
            found.append(str(name))
    return found


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], spec: _Spec) -> tuple[Tensor, Tensor]:
        out, lse = _forward(q, k, v, bias, spec)
        # The backward's rowsum(dO * O) cancels against dP, so it takes O before rounding to a
        # low-precision dtype (FA2 uses the rounded O; this costs Nq * Dv floats and is exact).
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.spec = spec
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor) -> tuple[Any, ...]:
        q, k, v, bias, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias = _backward(grad_out, grad_lse, q, k, v, bias, out, lse, ctx.spec)
        return dq, dk, dv, dbias, None


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    plan: Optional[BlockPlan] = None,
    scale: Optional[float] = None,
    mask_mod: Optional[MaskFn] = None,
    score_mod: Optional[ScoreFn] = None,
    bias: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    block_q: int = 128,
    block_k: int = 128,
) -> tuple[Tensor, Tensor]:
    """Exact attention over the tile pairs of ``plan``; returns ``(out, lse)``.

    ``q`` (B, Hq, Nq, D), ``k`` (B, Hkv, Nk, D), ``v`` (B, Hkv, Nk, Dv) with Hq a multiple of Hkv.
    ``plan`` lists the visited tiles (default: all); ``mask_mod`` masks elements of the tiles
    the plan marks partial, and must agree with the plan (``attnzoo.masks.block_plan`` builds
    both from one predicate). Scores are ``s = score_mod(scale * q.k + bias)`` then masked.
    ``key_padding_mask`` (B, Nk) is True for keys to ignore. ``lse`` (B, Hq, Nq) is float32
    (float64 for float64 inputs) and ``-inf`` for a row with no key, whose output is 0.

    Differentiable in q, k, v and ``bias``; ``score_mod`` is differentiated with respect to the
    score only (tensors it captures get no gradient).
    """
    b, _, nq, d = q.shape
    nk = k.shape[2]
    if plan is None:
        plan = BlockPlan.dense(nq, nk, _fit_block(block_q, nq), _fit_block(block_k, nk))
    elif (plan.q_len, plan.kv_len) != (nq, nk):
        raise ValueError(f"plan is for Nq={plan.q_len}, Nk={plan.kv_len}; inputs have Nq={nq}, Nk={nk}")
    kv_keep = None
    if key_padding_mask is not None:
        keep = _pad_len((~key_padding_mask.bool()).view(b, 1, nk, 1), plan.n_kv_blocks, plan.block_k)
        kv_keep = keep.view(b, 1, 1, plan.n_kv_blocks, 1, plan.block_k)
    spec = _Spec(
        plan=plan,
        scale=default_scale(q, scale),
        mask_mod=mask_mod,
        score_mod=score_mod,
        kv_keep=kv_keep,
    )
    return _TiledAttention.apply(q, k, v, bias, spec)


def _fit_block(block: int, length: int) -> int:
    """The tile size, shrunk for short inputs so padding stays below 16 rows."""
    return min(block, max(16, -(-length // 16) * 16))
