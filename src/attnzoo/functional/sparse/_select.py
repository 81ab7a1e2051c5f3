"""The selection engine of the content-dependent sparse family (catalog S1-S3).

Every method here is: (1) *estimate* cheap scores (per query key, per query block or per key
block), (2) *select* with one of two rules, (3) *attend* to what was selected.

* :func:`top_k_mask`: exactly ``k`` entries per row (fewer only where fewer are available),
  ties broken towards the lowest index. ``torch.topk`` leaves ties unspecified, so the rule is
  a threshold at the k-th value plus a running count of the entries equal to it.
* :func:`mass_mask`: the smallest prefix of the row sorted by decreasing score (ties: lowest
  index first) whose sum reaches ``tau`` times the row's total (XAttention's, FlexPrefill's and
  PBS-Attn's "cumulative mass" rule).
* :func:`selection_plan`: a row-level block selection (each query row keeps some key blocks of
  ``block`` keys) as the fused kernel's 64 x 64 block plan, built from the selection in
  O(selected entries) for blocks that are multiples of 64, never from an Nq x Nk mask;
  :func:`attend_selected` runs it on the fused CPU kernel, or on the tiled engine elsewhere.

The references of the mechanisms select with :func:`sorted_top_k_mask` / :func:`sorted_mass_mask`
(a stable sort: the rule written out) so that the fast paths' selection is checked against an
independent implementation, not against itself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels import block_sparse
from ...kernels.block_sparse import BLOCK, SparsePlan
from ...kernels.reference import materialized_attention
from ...kernels.tiled import tiled_attention

__all__ = [
    "top_k_mask",
    "sorted_top_k_mask",
    "mass_mask",
    "sorted_mass_mask",
    "SelectionMask",
    "selection_plan",
    "block_selection_plan",
    "attend_selected",
    "dense_selection",
    "softmax_lse",
    "masked_softmax",
    "attend_row_blocks",
    "attend_blocks",
    "block_rows",
    "merge_partials",
    "low_bits",
]

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# selection rules
# --------------------------------------------------------------------------------------------
def top_k_mask(scores: Tensor, k: int, kth: Optional[Tensor] = None) -> Tensor:
    """Bool mask of the ``k`` largest entries of each row (last dim); -inf entries are never kept.

    Exactly ``min(k, finite entries)`` per row; among entries equal to the k-th largest, the
    lowest indices are kept. NaN ranks above everything (as in ``torch.sort``), so a NaN input
    reaches the output instead of vanishing. O(n log k) per row (``torch.topk``) plus O(n).
    ``kth``: each row's k-th largest value (..., 1) when the caller has it (ignored under NaN).
    """
    if bool(torch.isnan(scores).any()):  # (a read pass; the rewrite only when needed)
        scores, kth = scores.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=NEG_INF), None
    finite = scores > NEG_INF
    if k >= scores.shape[-1]:
        return finite
    if kth is None:
        kth = scores.topk(k, dim=-1).values[..., -1:]
    above = scores > kth
    tied = (scores == kth) & finite  # a k-th of -inf ties no key: fewer than k candidates, all kept
    room = k - above.sum(-1, keepdim=True)
    if bool((tied.sum(-1, keepdim=True) <= room).all()):  # no row has more ties than room: keep them all
        return above | tied
    return above | (tied & (tied.cumsum(-1) <= room))


def gate_top_k_mask(q: Tensor, keys: Tensor, k: int, bias: Tensor) -> Tensor:
    """``top_k_mask(q @ keys^T + bias, k)`` with the products in float64: the float64 selection,
    computed in float32.

    ``q`` (B, H, Nq, D), ``keys`` (B, H, n, D) float64 (block summaries), ``bias`` broadcastable
    to (B, H, Nq, n), the rule's 0 / -inf / +inf. The gates are float32 products; a row is
    recomputed in float64 only where its k-th and (k+1)-th gates are closer than twice the float32
    error bound of a D-term dot product (``(D + 2) u |q_i| max_b |key_b|``, u = 2^-24, any
    summation order): past that margin the float32 order of every kept and dropped gate is
    float64's, so the selection is the same. Random inputs send a handful of rows to float64.
    """
    if q.dtype == torch.float64 or k >= keys.shape[-2]:
        return top_k_mask(q.double() @ keys.transpose(-1, -2) + bias, k)
    q32 = q.float()
    gates = q32 @ keys.float().transpose(-1, -2) + bias.float()
    top = gates.topk(k + 1, dim=-1).values
    kept = top_k_mask(gates, k, kth=top[..., k - 1 : k])
    margin = top[..., k - 1] - top[..., k]  # inf - x and x - (-inf) are sure; NaN (-inf - -inf, NaN inputs) is not
    bound = (q.shape[-1] + 2) * 2.0**-24 * 1.01 * q32.norm(dim=-1) * keys.norm(dim=-1).amax(-1, keepdim=True).float()
    # fewer than k candidates (the k-th is -inf): every finite gate is kept in both precisions
    unsure = ~((margin > 2 * bound) | ((top[..., k - 1] == NEG_INF) & torch.isfinite(bound)))
    if bool(unsure.any()):
        b, h, i = unsure.nonzero(as_tuple=True)
        exact = torch.einsum("ed,end->en", q[b, h, i].double(), keys[b, h]) + bias.expand(*unsure.shape, -1)[b, h, i]
        kept[b, h, i] = top_k_mask(exact, k)
    return kept


def sorted_top_k_mask(scores: Tensor, k: int) -> Tensor:
    """:func:`top_k_mask` written as its rule: a stable descending sort keeps equal entries in
    index order, and the first ``k`` finite ones are kept (the references' selection)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    return keep & (scores > NEG_INF)


def mass_mask(weights: Tensor, tau: float) -> Tensor:
    """Bool mask of the smallest set of entries, taken by decreasing weight (ties: lowest index
    first), whose sum reaches ``tau`` x the row total. ``weights`` >= 0; an all-zero row keeps nothing."""
    values, order = torch.sort(weights, dim=-1, descending=True, stable=True)
    before = values.cumsum(-1) - values  # mass of the entries ranked above each one
    total = values.sum(-1, keepdim=True)
    keep_sorted = ((before < tau * total) & (values > 0)) | total.isnan()  # a NaN row keeps all: the NaN reaches the output
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def sorted_mass_mask(weights: Tensor, tau: float) -> Tensor:
    """:func:`mass_mask` row by row, as the papers write it (the references' selection)."""
    flat = weights.reshape(-1, weights.shape[-1])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    for r in range(flat.shape[0]):
        row = flat[r].tolist()
        if any(x != x for x in row):  # NaN: keep all (as mass_mask)
            keep[r] = True
            continue
        target, taken = tau * sum(row), 0.0
        for j in sorted(range(len(row)), key=lambda j: (-row[j], j)):
            if taken >= target or row[j] <= 0:
                break
            keep[r, j] = True
            taken += row[j]
    return keep.view(weights.shape)


# --------------------------------------------------------------------------------------------
# a row-level block selection as a predicate, a dense mask, or a fused-kernel plan
# --------------------------------------------------------------------------------------------
class SelectionMask(masks.MaskMod):
    """``selected[b, h, q, kv // block]`` (and ``kv <= q + offset`` when causal) as a predicate.

    ``selected`` (Pb, Ph, Nq, n_blocks) bool with Pb in {1, B}, Ph in {1, H}: which key blocks
    of ``block`` keys each query row attends.
    """

    batch_head_dependent = True
    cacheable = False

    def __init__(self, selected: Tensor, block: int, causal_offset: Optional[int]):
        self.selected, self.block, self.offset = selected, block, causal_offset

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pb, ph = self.selected.shape[:2]
        b = b if pb > 1 else torch.zeros_like(torch.as_tensor(b))
        h = h if ph > 1 else torch.zeros_like(torch.as_tensor(h))
        keep = self.selected[b, h, q_idx, kv_idx // self.block]
        if self.offset is not None:
            keep = keep & (kv_idx <= q_idx + self.offset)
        return keep


def dense_selection(selected: Tensor, block: int, kv_len: int, causal_offset: Optional[int]) -> Tensor:
    """The (Pb, Ph, Nq, Nk) bool mask of a row-level block selection (the references')."""
    keep = selected.repeat_interleave(block, dim=-1)[..., :kv_len]
    if causal_offset is not None:
        nq = selected.shape[2]
        keep = keep & masks.causal(causal_offset)(None, None, torch.arange(nq)[:, None], torch.arange(kv_len)[None, :]).to(keep.device)
    return keep


def selection_plan(selected: Tensor, block: int, q_len: int, kv_len: int, causal_offset: Optional[int]) -> SparsePlan:
    """The fused kernel's plan of a row-level selection ``selected`` (Pb, Ph, Nq, ceil(Nk / block)).

    Blocks that are a multiple of 64 keys put each 64-key tile inside one selected block: a
    row's word for a tile is all ones or zero, cut by the causal diagonal and the last key, so
    the plan costs O(Nq * n_tiles / 64) words, never an Nq x Nk mask. Other block sizes fall back
    to evaluating the predicate on the visited tiles only.
    """
    selected = selected.cpu()
    pb, ph, nq, _ = selected.shape
    nqb, nkb = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    if block % BLOCK != 0:
        return _plan_by_tiles(selected, block, q_len, kv_len, causal_offset)
    per_tile = block // BLOCK
    rows = selected.repeat_interleave(per_tile, dim=-1)[..., :nkb]  # (Pb, Ph, Nq, nkb): the row keeps the whole tile
    key_first = torch.arange(nkb) * BLOCK
    if causal_offset is not None:  # a tile wholly after the row's last key is not visited
        rows = rows & (key_first[None, :] <= torch.arange(nq)[:, None] + causal_offset)
    rows = torch.nn.functional.pad(rows, (0, 0, 0, nqb * BLOCK - nq))  # rows past Nq keep nothing
    tiles = rows.view(pb, ph, nqb, BLOCK, nkb)
    visit = tiles.any(3)
    entries = visit.nonzero()  # (E, 4): (b, h, qb, kb), the CSR order
    row_idx = entries[:, 2:3] * BLOCK + torch.arange(BLOCK)  # (E, 64)
    keeps = tiles[entries[:, 0], entries[:, 1], entries[:, 2], :, entries[:, 3]]  # (E, 64): which rows keep the tile
    words = _tile_words(entries[:, 3], row_idx, kv_len, causal_offset)  # the tile's columns each row may see
    words = torch.where(keeps, words, torch.zeros_like(words))
    inside = row_idx < q_len
    full_word = _tile_words(entries[:, 3], row_idx, kv_len, None)
    full = ((words == full_word) | ~inside).all(-1)
    full_grid = torch.zeros_like(visit)
    full_grid[tuple(entries[full].T)] = True
    return SparsePlan._from_grids(visit, full_grid, q_len, kv_len, None, bits=words[~full])


def block_selection_plan(selected: Tensor, block: int, q_len: int, kv_len: int, causal: bool) -> SparsePlan:
    """The plan of a block-level selection ``selected`` (Pb, Ph, ceil(Nq / block), ceil(Nk / block))
    whose ``block`` is a multiple of 64: every query of a block keeps the same key blocks, so the
    kernel's tiles come from the block grid alone (causal: only the diagonal tiles get element
    masks, self-attention alignment). O(tiles), no per-row work."""
    if block % BLOCK != 0:
        raise ValueError(f"block_selection_plan: block: a multiple of {BLOCK}, got {block}")
    per = block // BLOCK
    nqb, nkb = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    visit = selected.cpu().repeat_interleave(per, dim=2).repeat_interleave(per, dim=3)[:, :, :nqb, :nkb]
    if not causal:
        return SparsePlan._from_grids(visit, visit, q_len, kv_len, None)
    qb, kb = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
    visit = visit & (kb <= qb)
    return SparsePlan._from_grids(visit, visit & (kb < qb), q_len, kv_len, masks.causal(0))


def _tile_words(kv_block: Tensor, row_idx: Tensor, kv_len: int, causal_offset: Optional[int]) -> Tensor:
    """(E, 64) int64: bit c set where key ``64 kv_block + c`` exists and (causal) is <= row + offset."""
    last = torch.full_like(row_idx, kv_len - 1)
    if causal_offset is not None:
        last = torch.minimum(last, row_idx + causal_offset)
    return low_bits((last - kv_block[:, None] * BLOCK + 1).clamp(0, BLOCK))  # keys 0 .. count-1 of the tile


def low_bits(count: Tensor) -> Tensor:
    """int64 words with bits 0 .. count-1 set, count in [0, 64] (64: all ones, the word -1;
    1 << 64 is not defined, so that case is written out)."""
    return torch.where(count >= BLOCK, torch.full_like(count, -1), (torch.ones_like(count) << count.clamp(max=BLOCK - 1)) - 1)


def _plan_by_tiles(selected: Tensor, block: int, q_len: int, kv_len: int, causal_offset: Optional[int]) -> SparsePlan:
    """Blocks that do not align with 64-key tiles: the predicate evaluated tile by tile."""
    pb, ph = selected.shape[:2]
    batch_head = SelectionMask(selected, block, causal_offset)
    return block_sparse._plan_by_evaluation(batch_head, q_len, kv_len, pb, ph)


# --------------------------------------------------------------------------------------------
# attending to a selection
# --------------------------------------------------------------------------------------------
def attend_selected(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selected: Tensor,
    block: int,
    *,
    causal_offset: Optional[int],
    key_padding_mask: Optional[Tensor],
    scale: Optional[float],
    engine: str,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of softmax attention over a row-level block selection.

    ``engine``: ``"fused"`` (the C++ block-sparse kernel over :func:`selection_plan`),
    ``"tiled"`` (the PyTorch FA2 engine with the selection as its predicate) or
    ``"reference"`` (the dense mask over materialized scores)."""
    nq, nk = q.shape[2], k.shape[2]
    if engine == "fused":
        plan = selection_plan(selected, block, nq, nk, causal_offset)
        return block_sparse.block_sparse_attention(q, k, v, plan, scale=scale, key_padding_mask=key_padding_mask)
    if engine == "tiled":
        pattern = SelectionMask(selected.to(q.device), block, causal_offset)
        plan = masks.plan_for(pattern, nq, nk, batch=q.shape[0], heads=q.shape[1])
        return tiled_attention(q, k, v, plan=plan, scale=scale, mask_mod=pattern, key_padding_mask=key_padding_mask)
    allowed = dense_selection(selected.to(q.device), block, nk, causal_offset)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(q.shape[0], 1, 1, nk)
    return materialized_attention(q, k, v, scale=scale, allowed=allowed)


def block_rows(selected: Tensor, block: int, n: int) -> Tensor:
    """A block-level selection (.., n_q_blocks, n_k_blocks) as a row-level one (.., n, n_k_blocks)."""
    return selected.repeat_interleave(block, dim=-2)[..., :n, :]


def attend_blocks(
    q: Tensor, k: Tensor, v: Tensor, selected: Tensor, block: int, *, causal: bool, key_padding_mask: Optional[Tensor], scale: Optional[float], engine: str
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` over a block-level selection (B, H, n_q_blocks, n_k_blocks) of self-attention:
    on ``fused`` with blocks of a multiple of 64 the plan comes from the block grid alone (O(tiles)),
    else through the row-level :func:`attend_selected`."""
    if engine == "fused" and block % BLOCK == 0 and q.shape[2] == k.shape[2]:
        plan = block_selection_plan(selected, block, q.shape[2], k.shape[2], causal)
        return block_sparse.block_sparse_attention(q, k, v, plan, scale=scale, key_padding_mask=key_padding_mask)
    rows = block_rows(selected, block, q.shape[2])
    return attend_selected(q, k, v, rows, block, causal_offset=0 if causal else None, key_padding_mask=key_padding_mask, scale=scale, engine=engine)


def attend_row_blocks(
    q: Tensor, k: Tensor, v: Tensor, selected: Tensor, block: int, *, causal_offset: Optional[int], key_padding_mask: Optional[Tensor], scale: Optional[float]
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` over a row-level block selection on the C++ gathered-rows kernel: every
    selected (row, block) pair once, grouped by block (work = the selected pairs, whatever their
    layout over 64-row tiles), the pairs of a row merged by their log-sum-exps."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    e = selected.nonzero()  # (E, 4): b, h, i, block
    group_key = (e[:, 0] * h + e[:, 1]) * selected.shape[-1] + e[:, 3]
    order = torch.sort(group_key, stable=True).indices
    e, group_key = e[order].cpu(), group_key[order].cpu()
    _, counts = torch.unique_consecutive(group_key, return_counts=True)
    gptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    first = e[gptr[:-1]]
    key0 = first[:, 3] * block
    meta = torch.stack([first[:, 0], first[:, 1], key0, (nk - key0).clamp(max=block)], dim=1).contiguous()
    rows = ((e[:, 0] * h + e[:, 1]) * nq + e[:, 2]).contiguous()
    limit = (e[:, 2] + causal_offset if causal_offset is not None else torch.full_like(e[:, 2], nk)).contiguous()
    out_e, lse_e = block_sparse.gathered_rows_attention(q, k, v, rows, limit, gptr, meta, scale=scale, key_padding_mask=key_padding_mask)
    out, lse = merge_partials(out_e, lse_e, rows, b * h * nq)
    return out.view(b, h, nq, -1).to(q.dtype), lse.view(b, h, nq)


def merge_partials(out_e: Tensor, lse_e: Tensor, row: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """Softmax over a union from partial softmaxes of disjoint key sets: ``out_r = sum_e
    e^(lse_e - lse_r) out_e`` with ``lse_r = log sum_e e^(lse_e)``; a row with no entry (or
    only empty ones) gives 0 and -inf. NaN stays NaN. Differentiable; without autograd ``out_e``
    (a temporary in every caller) is scaled in place."""
    row = row.to(out_e.device)
    with torch.no_grad():  # a stabilizer only: it cancels in the result
        top = torch.full((n_rows,), NEG_INF, dtype=lse_e.dtype, device=lse_e.device).scatter_reduce_(0, row, lse_e.detach(), reduce="amax")
        top = top.masked_fill(top == NEG_INF, 0.0)
    w = torch.exp(lse_e - top[row])
    denom = torch.zeros(n_rows, dtype=w.dtype, device=w.device).index_add(0, row, w)
    # without autograd the partial outputs are scaled in place (no (E, Dv) temporary)
    weighted = out_e.mul_(w[:, None].to(out_e.dtype)) if not torch.is_grad_enabled() or not out_e.requires_grad else w[:, None].to(out_e.dtype) * out_e
    total = torch.zeros(n_rows, out_e.shape[-1], dtype=out_e.dtype, device=out_e.device).index_add(0, row, weighted)
    seen = denom != 0  # NaN != 0: kept, so it reaches the output
    safe = torch.where(seen, denom, torch.ones_like(denom))
    out = torch.where(seen[:, None], total / safe[:, None].to(total.dtype), torch.zeros_like(total))
    lse = torch.where(seen, top + torch.log(safe), torch.full_like(denom, NEG_INF))
    return out, lse


def masked_softmax(scores: Tensor, visible: Tensor) -> Tensor:
    """softmax over the visible entries; a row with none gives zeros. Unlike ``nan_to_num`` after
    the softmax, a NaN or inf carried by the inputs stays NaN (so the finite check names it)."""
    p = torch.softmax(scores.masked_fill(~visible, NEG_INF), dim=-1)
    return p.masked_fill(~visible.any(-1, keepdim=True), 0.0)


def softmax_lse(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(softmax(scores), logsumexp(scores))`` along the last dim in one exponential pass (the
    fused softmax), with ``lse = max - log(max p)``; a row of -inf gives p = 0 and lse = -inf.
    Differentiable in both (d lse / d s = p, as logsumexp's)."""
    top = scores.amax(-1, keepdim=True)
    p = torch.softmax(scores, dim=-1)
    empty = top == NEG_INF
    if bool(empty.any()):  # one host sync; rows with no key
        p = p.masked_fill(empty, 0.0)
    lse = (top - torch.log(p.amax(-1, keepdim=True))).squeeze(-1)
    return p, lse.masked_fill(empty.squeeze(-1), NEG_INF)


def block_means(x: Tensor, block: int, key_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Mean of each block of ``block`` tokens over the real ones: ((B, H, n_blocks, D) float64,
    (B, 1, n_blocks) bool "the block has a real token"). The last block may be short."""
    b, h, n, d = x.shape
    blocks = math.ceil(n / block)
    real = torch.ones(b, n, dtype=torch.float64, device=x.device) if key_padding_mask is None else (~key_padding_mask).double()
    pad = blocks * block - n
    xd = x if key_padding_mask is None else x.double() * real[:, None, :, None]
    xd = torch.nn.functional.pad(xd, (0, 0, 0, pad)) if pad else xd
    xs = xd.reshape(b, h, blocks, block, d).sum(3, dtype=torch.float64)  # accumulated in float64, no widened copy
    counts = torch.nn.functional.pad(real, (0, pad)).view(b, blocks, block).sum(-1)[:, None, :]
    return xs / counts.clamp(min=1)[..., None], counts > 0
