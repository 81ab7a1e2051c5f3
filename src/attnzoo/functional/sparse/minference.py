"""MInference's vertical-slash pattern (catalog S2; Jiang et al., NeurIPS 2024, arXiv 2407.02490, Sec. 3.2, Alg. 2).

For causal prefill, each head's attention is approximated by a few *vertical* lines (keys every
query attends) and *slash* lines (fixed offsets i - j, diagonals), estimated online from the last
``last_q`` queries (Alg. 2: ``A = softmax(Q[-last_q:] K^T / sqrt(d) + causal mask)``):

    vertical score of key j:      v_j = sum_i A_ij
    slash score of offset d >= 0: s_d = sum_i A_{i, pos(i) - d}

The top ``vertical_size`` keys by ``v`` and top ``slash_size`` offsets by ``s`` are kept (ties to the
lowest index), with the first ``sink_columns`` keys and the ``local_slashes`` offsets nearest the
diagonal always kept (the official kernel forces the first 30 columns and the 100 nearest
diagonals; both are parameters here). Query i then attends, causally, the keys

    { j <= i : j in V  or  i - j in S }

with exact softmax over them. Selection in float64 in every backend. The selection reads the last
queries, so no output is independent of later tokens (prefill, as the paper;
``Mechanism.causal_block`` is the whole sequence). Padding: right padding is exact (the estimate
reads each sequence's own last queries); left padding refused.

Backends: ``reference`` (A materialized, diagonals summed with ``torch.diagonal``, stable-sort top-k,
dense mask); ``fused`` (slash sums by scatter-add, the pattern's 64 x 64 tiles built from per-tile
vertical words and per-tile-diagonal slash words, the C++ block-sparse kernel); ``tiled``.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels import block_sparse
from ...kernels.block_sparse import BLOCK, SparsePlan
from ...kernels.reference import default_scale, materialized_attention
from ...kernels.tiled import tiled_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import refuse_unless_right_padded
from ._params import WHOLE_SEQUENCE, int_at_least, PADDING_PARAM, native_backend, positive_int, sample_options
from ._select import NEG_INF, low_bits, masked_softmax, sorted_top_k_mask, top_k_mask
from .._prefix_decoder import READS_AHEAD

__all__ = ["vertical_slash_attention", "VERTICAL_SLASH"]

_PADDING_WHY = "the estimate reads the last queries of the padded length, which pads before a sequence would move"


VS_PARAMS = (
    Param("vertical_size", 1000, "keys kept as vertical lines per head (MInference's shipped configs: 1000)", positive_int("vertical lines"), (0, -1, 1.5, "1000"), "int"),
    Param("slash_size", 6096, "diagonal offsets kept per head (shipped configs: 6096)", positive_int("slash lines"), (0, -1, 1.5, "6096"), "int"),
    Param("last_q", 64, "queries at the end whose attention estimates the lines (Alg. 2: 64)", positive_int("estimating queries"), (0, -1, 1.5, "64"), "int"),
    Param("sink_columns", 30, "first keys always kept as vertical lines (the official kernel: 30)", int_at_least(0, "forced columns"), (-1, 1.5, "30"), "int"),
    Param("local_slashes", 100, "offsets nearest the diagonal always kept (the official kernel: 100)", int_at_least(0, "forced diagonals"), (-1, 1.5, "100"), "int"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, N)"),
)


# --------------------------------------------------------------------------------------------
# estimate and selection
# --------------------------------------------------------------------------------------------
def _last_rows(key_padding_mask: Optional[Tensor], batch: int, n: int, last_q: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions (B, L) of each sequence's last ``L = min(last_q, N)`` real queries (right padding),
    and (B, L) "the row exists" (a sequence shorter than L has fewer; those rows are dropped)."""
    lengths = torch.full((batch,), n, device=device) if key_padding_mask is None else (~key_padding_mask).sum(-1)
    count = min(last_q, n)
    rows = lengths[:, None] - count + torch.arange(count, device=device)[None, :]
    return rows.clamp(min=0), rows >= 0


def _estimate(q: Tensor, k: Tensor, scale: float, rows: Tensor, exists: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """A (B, H, L, N) float64: the last queries' causal softmax over the real keys (0 for a missing row)."""
    group = q.shape[1] // k.shape[1]
    q_last = q.detach().gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])).double()  # gather, then widen
    s = q_last @ k.detach().double().repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    ok = torch.arange(k.shape[2], device=q.device)[None, None, None, :] <= rows[:, None, :, None]
    if key_padding_mask is not None:
        ok = ok & ~key_padding_mask[:, None, None, :]
    a = masked_softmax(s, ok)
    return a * exists[:, None, :, None]


def _forced(scores: Tensor, count: int) -> Tensor:
    """+inf on the first ``count`` entries (always kept)."""
    if count:
        scores = scores.clone()
        scores[..., :count] = torch.where(scores[..., :count] == NEG_INF, NEG_INF, float("inf"))  # (a NaN is forced too)
    return scores


def _line_scores(a: Tensor, rows: Tensor, n: int, *, by_diagonal_loop: bool) -> tuple[Tensor, Tensor]:
    """Vertical (B, H, N) and slash (B, H, N: offset 0..N-1) scores of the estimate ``a``."""
    vertical = a.sum(2)
    b, h, length, _ = a.shape
    if by_diagonal_loop:  # the reference: one diagonal at a time, per sequence
        slash = torch.zeros(b, h, n, dtype=a.dtype, device=a.device)
        for bi in range(b):
            for li in range(length):
                pos = int(rows[bi, li])
                slash[bi, :, : pos + 1] += a[bi, :, li, : pos + 1].flip(-1)  # offset d = pos - j
        return vertical, slash
    offsets = (rows[:, :, None] - torch.arange(n, device=a.device)[None, None, :]).clamp(min=0)  # (B, L, N)
    valid = torch.arange(n, device=a.device)[None, None, :] <= rows[:, :, None]
    weights = (a * valid[:, None]).flatten(2)
    slash = torch.zeros(b, h, n, dtype=a.dtype, device=a.device).scatter_add_(2, offsets.flatten(1)[:, None, :].expand(-1, h, -1), weights)
    return vertical, slash


def vs_selection(q, k, *, vertical_size, slash_size, last_q, sink_columns, local_slashes, scale, key_padding_mask, reference=False):
    """(vertical (B, H, N) bool, slash (B, H, N) bool): the kept keys and diagonal offsets."""
    b, _, n, _ = q.shape
    rows, exists = _last_rows(key_padding_mask, b, n, last_q, q.device)
    a = _estimate(q, k, scale, rows, exists, key_padding_mask)
    vertical, slash = _line_scores(a, rows, n, by_diagonal_loop=reference)
    lengths = rows[:, -1] + 1  # (B,) real length
    beyond = torch.arange(n, device=q.device)[None, :] >= lengths[:, None]  # keys / offsets past the sequence
    real = beyond if key_padding_mask is None else beyond | key_padding_mask
    vertical = _forced(vertical.masked_fill(real[:, None], NEG_INF), sink_columns)
    slash = _forced(slash.masked_fill(beyond[:, None], NEG_INF), local_slashes)
    pick = sorted_top_k_mask if reference else top_k_mask
    return pick(vertical, vertical_size), pick(slash, slash_size)


class VerticalSlashMask(masks.MaskMod):
    """``j <= i and (vertical[b, h, j] or slash[b, h, i - j])`` as a predicate."""

    batch_head_dependent = True
    cacheable = False

    def __init__(self, vertical: Tensor, slash: Tensor):
        self.vertical, self.slash = vertical, slash

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        offset = q_idx - kv_idx
        return (offset >= 0) & (self.vertical[b, h, kv_idx] | self.slash[b, h, offset.clamp(min=0)])


def causal_tile_words(n: int) -> tuple[Tensor, Tensor]:
    """(nb, nb, 64) int64 words of every 64 x 64 tile of causal self-attention over N tokens:
    ``limit`` (keys <= row, inside N) and ``in_bounds`` (every key inside N; rows past N: 0)."""
    nb = -(-n // BLOCK)
    bit = torch.arange(BLOCK)
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    rows = qb[:, :, None] * BLOCK + bit  # (nb, 1, 64)
    limit = low_bits((rows.clamp(max=n - 1) - kb[:, :, None] * BLOCK + 1).clamp(0, BLOCK))
    in_bounds = low_bits((n - kb * BLOCK).clamp(0, BLOCK)[:, :, None].expand_as(limit))
    live = rows < n
    return torch.where(live, limit, torch.zeros_like(limit)), torch.where(live, in_bounds, torch.zeros_like(in_bounds))


def vs_tile_words(vertical: Tensor, slash: Tensor, n: int) -> Tensor:
    """(B, H, nb, nb, 64) int64: each tile's row words, its vertical word OR the slash words of its
    tile diagonal (qb - kb), before the causal cut."""
    vertical, slash = vertical.cpu(), slash.cpu()
    b, h, _ = vertical.shape
    nb = -(-n // BLOCK)
    bit = torch.arange(BLOCK)
    v_tiles = torch.nn.functional.pad(vertical, (0, nb * BLOCK - n)).view(b, h, nb, BLOCK)
    v_words = (v_tiles.long() << bit).sum(-1)  # (B, H, nb): one word per key tile, every row alike
    # slash words by tile diagonal delta: row r of tile (kb + delta, kb) sees key c at offset delta*64 + r - c
    offsets = torch.arange(nb)[:, None, None] * BLOCK + bit[None, :, None] - bit[None, None, :]  # (nb, 64 rows, 64 cols)
    inside = (offsets >= 0) & (offsets < n)
    s_words = ((slash[:, :, offsets.clamp(0, n - 1)] & inside).long() << bit).sum(-1)  # (B, H, nb deltas, 64 rows)
    delta = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).clamp(min=0)
    return v_words[:, :, None, :, None] | s_words[:, :, delta]


def causal_plan_from_words(words: Tensor, n: int) -> SparsePlan:
    """A causal self-attention plan from per-tile row words (B, H, nb, nb, 64): cut causally,
    tiles with no bit dropped, tiles whose every in-bounds pair is set marked whole (the kernel
    masks nothing in a whole tile, so whole means inside N, not inside the causal cut)."""
    limit, in_bounds = causal_tile_words(n)
    nb = limit.shape[0]
    words = words & limit
    visit = (words != 0).any(-1) & (torch.arange(nb)[None, :] <= torch.arange(nb)[:, None])
    full = (words == in_bounds).all(-1) & visit
    return SparsePlan._from_grids(visit, full, n, n, None, bits=words[visit & ~full])


def vs_plan(vertical: Tensor, slash: Tensor, n: int) -> SparsePlan:
    """The fused kernel's plan of a vertical-slash selection: O(tiles * 64) words, no N x N mask."""
    return causal_plan_from_words(vs_tile_words(vertical, slash, n), n)


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _selection(q, k, params: dict, scale, key_padding_mask, reference: bool):
    return vs_selection(q, k, scale=default_scale(q, scale), key_padding_mask=key_padding_mask, reference=reference, **params)


def _reference(q, k, v, *, key_padding_mask, scale, return_lse, **params):
    """A materialized, diagonals summed one at a time, stable-sort top-k, dense masked softmax: the spec."""
    refuse_unless_right_padded("vertical_slash", key_padding_mask, _PADDING_WHY)
    vertical, slash = _selection(q, k, params, scale, key_padding_mask, reference=True)
    n = q.shape[2]
    i, j = torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None, :]
    allowed = (j <= i) & (vertical[:, :, None, :] | slash[:, :, (i - j).clamp(min=0)])
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=allowed)
    return (out, lse) if return_lse else out


def _fused(q, k, v, *, key_padding_mask, scale, return_lse, **params):
    refuse_unless_right_padded("vertical_slash", key_padding_mask, _PADDING_WHY)
    vertical, slash = _selection(q, k, params, scale, key_padding_mask, reference=False)
    plan = vs_plan(vertical, slash, q.shape[2])
    out, lse = block_sparse.block_sparse_attention(q, k, v, plan, scale=scale, key_padding_mask=key_padding_mask)
    return (out, lse) if return_lse else out


def _tiled(q, k, v, *, key_padding_mask, scale, return_lse, **params):
    refuse_unless_right_padded("vertical_slash", key_padding_mask, _PADDING_WHY)
    vertical, slash = _selection(q, k, params, scale, key_padding_mask, reference=False)
    pattern = VerticalSlashMask(vertical, slash)
    plan = masks.plan_for(pattern, q.shape[2], k.shape[2], batch=q.shape[0], heads=q.shape[1])
    out, lse = tiled_attention(q, k, v, plan=plan, scale=scale, mask_mod=pattern, key_padding_mask=key_padding_mask)
    return (out, lse) if return_lse else out


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    n = p.kv_len
    if rng is None:
        # at least the first column and the diagonal: every query sees a key
        return {"vertical_size": max(1, n // 8), "slash_size": max(1, n // 8), "last_q": min(64, n), "sink_columns": max(1, min(30, n // 16)), "local_slashes": max(1, min(100, n // 16))}
    params = {
        "vertical_size": rng.randint(1, n), "slash_size": rng.randint(1, n), "last_q": rng.randint(1, n),
        "sink_columns": rng.randint(0, 3), "local_slashes": rng.randint(0, 3),
    }
    return sample_options(params, p, rng, right_only=True)


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    """Half the budget to vertical lines, half to slashes (each a share of N; all columns at share 1), last 64 queries."""
    lines = p.kv_len if share >= 1 else max(1, round(share * p.kv_len / 2))
    return {"vertical_size": lines, "slash_size": lines, "last_q": min(64, p.kv_len), "sink_columns": 0, "local_slashes": 0}


VERTICAL_SLASH = register(
    Mechanism(
        name="vertical_slash",
        family="sparse",
        catalog=("S2",),
        paper="MInference 1.0 (Jiang et al., NeurIPS 2024), Sec. 3.2, Alg. 2 (vertical-slash head)",
        formula="out_i = sum_{j <= i: j in V or i-j in S} softmax(scale q_i.k_j) v_j; V, S = top lines of the last queries' causal attention",
        cost="O(last_q * N * D) estimate + O(N * (|V| + |S|) * D) attention (fused: the tiles the lines cross)",
        summary="MInference vertical-slash: columns and diagonals estimated from the last queries, exact attention on them",
        patterns=frozenset({"causal_self"}),
        params=VS_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        causal_block=lambda bound: WHOLE_SEQUENCE,  # the estimate reads the last queries: no prefix is independent of the rest
        sparsity_params=_sparsity_params,
    )
)
VERTICAL_SLASH.add_backend(Backend("reference", _reference, doc="diagonals summed one by one, stable-sort top-k, dense mask: the spec", priority=-100, materializes_scores=True))
VERTICAL_SLASH.add_backend(native_backend("fused", _fused, "tile words from vertical and per-diagonal slash words, C++ block-sparse kernel"))
VERTICAL_SLASH.add_backend(Backend("tiled", _tiled, doc="the PyTorch FA2 engine with the lines as its predicate", priority=20, traceable=False))


def vertical_slash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    vertical_size: int = 1000,
    slash_size: int = 6096,
    last_q: int = 64,
    sink_columns: int = 30,
    local_slashes: int = 100,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """MInference's vertical-slash attention (catalog S2) for causal prefill.

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        vertical_size, slash_size: lines kept per head (clamped to N).
        last_q: estimating queries. sink_columns, local_slashes: lines always kept.
        key_padding_mask: (B, N) bool, right padding only. scale, return_lse: as softmax.

    Cost: O(last_q N D) + attention over the tiles the lines cross.
    Paper: Jiang et al., "MInference 1.0" (NeurIPS 2024), Alg. 2.

    Example::

        >>> q = k = v = torch.randn(1, 8, 8192, 64)
        >>> out = vertical_slash_attention(q, k, v, vertical_size=512, slash_size=1024)
    """
    return VERTICAL_SLASH(
        q, k, v, backend=backend, vertical_size=vertical_size, slash_size=slash_size, last_q=last_q, sink_columns=sink_columns,
        local_slashes=local_slashes, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


VERTICAL_SLASH.function = vertical_slash_attention
VERTICAL_SLASH.decoder_refusal = READS_AHEAD
