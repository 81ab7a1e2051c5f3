"""Exact top-k attention per query (catalog S1): Explicit Sparse Transformer; memory-efficient top-k.

    s_ij = scale * q_i . k_j,   K_i = the k largest s_ij over the keys i may see,
    out_i = sum_{j in K_i} softmax_{j in K_i}(s_ij) v_j

Zhao et al., "Explicit Sparse Transformer" (arXiv 1912.11637), Sec. 2 (Eq. 3-5: scores below the
k-th largest are set to -inf before the softmax); Gupta et al., "Memory-efficient Transformers
via Top-k Attention" (arXiv 2106.06899), Sec. 2, for the chunked form that never holds the
Nq x Nk scores. Tie rule (fixed here; implementations differ): exactly ``min(k, visible keys)``
keys per query, and among keys whose score equals the k-th largest, the lowest indices.
Selection scores are computed in float64 by every backend so that all select the same keys.
Gradients flow through the kept scores (the selection itself is piecewise constant).

Backends: ``reference`` (materialized scores, stable-sort selection, dense mask); ``gathered``
(queries in chunks: float64 scores of the chunk, ``torch.topk`` with the tie rule applied where a
tie crosses the cut, then the k kept keys gathered and attended: O(Nq * Nk * D) to select,
O(Nq * k * D) to attend, O(chunk * Nk) memory; from k >= Nk / 8 the chunk's masked score matrix
instead, which costs less than the gather).
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from ._params import PADDING_PARAM, sample_options
from ._select import NEG_INF, softmax_lse, sorted_top_k_mask, top_k_mask
from .._prefix_decoder import PrefixDecoder

__all__ = ["topk_attention", "TOPK"]

#: Queries per chunk of the gathered backend: the chunk's float64 scores stay near 32 MiB.
CHUNK_SCORES = 1 << 22
#: Gathering k key rows per query costs about what a GEMM over 8k keys does here (measured at
#: N = 1024, k = 64: the gather was 46% of the call): from k >= Nk / 8 the chunk attends through a
#: masked score matrix instead.
DENSE_SHARE = 8


def _check_k(value: Any, p: Problem) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "a positive int (keys kept per query)"
    if value > p.kv_len:
        return f"at most the number of keys Nk={p.kv_len}, got {value}"
    return None


TOPK_PARAMS = (
    Param("top_k", None, "required: keys kept per query (<= Nk); rows that see fewer keep them all", _check_k, (None, 0, -1, 1.5, "8", True), "int"),
    flag("causal", False, "no key after the query (alignment: causal_alignment)"),
    choice("causal_alignment", ("bottom_right", "top_left"), "bottom_right", "when Nq != Nk: bottom_right (the last query sees every key) or top_left"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row over its kept keys, (B, H, Nq)"),
)


def _visible(q_len: int, k_len: int, rows: Tensor, causal: bool, alignment: str, pad: Optional[Tensor], batch: int, device: torch.device) -> Optional[Tensor]:
    """(B|1, 1, len(rows), Nk) bool of the keys each listed query row may see, or None (all)."""
    keep = None
    if causal:
        keep = (torch.arange(k_len, device=device)[None, :] <= rows[:, None] + masks.causal_offset(q_len, k_len, alignment))[None, None]
    if pad is not None:
        real = ~pad.view(batch, 1, 1, k_len)
        keep = real if keep is None else keep & real
    return keep


def _selection_scores(q: Tensor, k: Tensor, scale: float, visible: Optional[Tensor]) -> Tensor:
    """float64 ``scale * q . k`` with -inf where a key is not visible; k already repeated to q's heads."""
    s = torch.matmul(q.detach().double(), k.detach().double().transpose(-1, -2)) * scale
    return s if visible is None else s.masked_fill(~visible, NEG_INF)


def _reference(q, k, v, *, top_k, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """Every score materialized; the k kept by a stable descending sort; a dense masked softmax."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    group = h // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)
    visible = _visible(nq, nk, torch.arange(nq, device=q.device), causal, causal_alignment, key_padding_mask, b, q.device)
    kept = sorted_top_k_mask(_selection_scores(q, kk, default_scale(q, scale), visible), top_k)
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=kept)
    return (out, lse) if return_lse else out


def _kept_indices(scores: Tensor, take: int) -> tuple[Tensor, Tensor]:
    """(B, H, c, take) indices of each row's kept keys and "kept" (False past a row's visible keys).

    ``torch.topk`` gives them directly unless a row has more entries equal to its k-th value than
    places left (a tie across the cut, rare on real data): those rows take :func:`top_k_mask`'s
    lowest-index rule."""
    values, idx = scores.topk(take, dim=-1)
    kth = values[..., -1:]
    crowded = ((scores >= kth).sum(-1) > take) & (kth[..., 0] > NEG_INF)
    if bool(crowded.any()):
        rows = crowded.nonzero(as_tuple=True)
        kept = top_k_mask(scores[rows], take)
        idx[rows] = kept.to(torch.int8).topk(take, dim=-1).indices
    kept = scores.gather(-1, idx)
    return idx, (kept > NEG_INF) | kept.isnan()  # a NaN score is kept (it reaches the output)


def _gathered(q, k, v, *, top_k, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """Chunks of queries: select in float64, gather the kept keys, softmax over k entries."""
    b, h, nq, d = q.shape
    nk, hkv = k.shape[2], k.shape[1]
    group = h // hkv
    sc = default_scale(q, scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.repeat_interleave(group, dim=1)
    vv = v.repeat_interleave(group, dim=1)
    chunk = max(1, CHUNK_SCORES // max(1, b * h * nk))
    outs, lses = [], []
    for start in range(0, nq, chunk):
        rows = torch.arange(start, min(nq, start + chunk), device=q.device)
        qc = q[:, :, start : start + chunk]
        visible = _visible(nq, nk, rows, causal, causal_alignment, key_padding_mask, b, q.device)
        with torch.no_grad():
            idx, valid = _kept_indices(_selection_scores(qc, kk, sc, visible), min(top_k, nk))
        take = idx.shape[-1]
        if take * DENSE_SHARE >= nk:  # many keys kept: two GEMMs over the chunk beat gathering k rows per query
            kept = torch.zeros(b, h, qc.shape[2], nk, dtype=torch.bool, device=q.device).scatter_(-1, idx, valid)
            p, lse = softmax_lse(((qc.to(cdt) * sc) @ kk.to(cdt).transpose(-1, -2)).masked_fill(~kept, NEG_INF))
            outs.append((p @ vv.to(cdt)).to(q.dtype))
            lses.append(lse)
            continue
        k_sel = kk.gather(2, idx.flatten(2, 3)[..., None].expand(-1, -1, -1, d)).view(b, h, -1, take, d)
        v_sel = vv.gather(2, idx.flatten(2, 3)[..., None].expand(-1, -1, -1, v.shape[-1])).view(b, h, -1, take, v.shape[-1])
        s = torch.einsum("bhqd,bhqtd->bhqt", qc.to(cdt), k_sel.to(cdt)) * sc
        s = s.masked_fill(~valid, NEG_INF)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.masked_fill(lse == NEG_INF, 0.0)[..., None])  # a row with no key: all zeros
        outs.append(torch.einsum("bhqt,bhqtd->bhqd", p, v_sel.to(cdt)).to(q.dtype))
        lses.append(lse)  # float32 (float64 for float64 inputs), as the reference
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    return (out, lse) if return_lse else out


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"top_k": min(8, p.kv_len), "causal": pattern.startswith("causal")}
    if rng is None:
        return params
    params["top_k"] = rng.randint(1, p.kv_len)
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    return sample_options(params, p, rng)


def _allowed_pairs(problem: Problem, bound: dict) -> int:
    """k per query row (fewer where a causal row sees fewer keys; key padding not counted)."""
    offset = masks.causal_offset(problem.q_len, problem.kv_len, bound["causal_alignment"])
    rows = torch.arange(problem.q_len)
    seen = (rows + offset + 1).clamp(0, problem.kv_len) if bound["causal"] else torch.full_like(rows, problem.kv_len)
    return int(seen.clamp(max=bound["top_k"]).sum()) * problem.batch * problem.q_heads


TOPK = register(
    Mechanism(
        name="topk",
        family="sparse",
        catalog=("S1",),
        paper="Explicit Sparse Transformer (Zhao et al., 2019), Eq. 3-5; Memory-efficient Transformers via Top-k Attention (Gupta et al., 2021), Sec. 2",
        formula="out_i = sum_{j in topk_k(s_i.)} softmax(s_ij) v_j,  s_ij = scale q_i.k_j  (ties: lowest index)",
        cost="O(Nq * Nk * D) to select (float64), O(Nq * k * D) to attend; O(chunk * Nk) memory (gathered)",
        summary="exact per-query top-k attention: each query keeps its k highest-scoring keys (exactly k, lowest index on ties)",
        patterns=frozenset({"noncausal_self", "causal_self", "noncausal_cross", "causal_cross"}),
        params=TOPK_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        allowed_pairs=_allowed_pairs,
        sparsity_params=lambda p, share: {"top_k": max(1, round(share * p.kv_len))},
    )
)
TOPK.add_backend(
    Backend("reference", _reference, doc="materialized scores, stable-sort top-k, dense masked softmax: the spec", priority=-100, materializes_scores=True)
)
TOPK.add_backend(
    Backend(
        "gathered",
        _gathered,
        doc="queries in chunks: float64 threshold top-k, then softmax over the k gathered keys (no Nq x Nk tensor)",
        priority=30,
    )
)


def topk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    top_k: int,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Exact top-k attention (catalog S1): each query attends to its ``top_k`` highest-scoring keys.

    ``out_i = sum_{j in K_i} softmax_{j in K_i}(s_ij) v_j`` with ``s_ij = scale * q_i . k_j`` and
    ``K_i`` the ``top_k`` largest scores among the keys query i may see (``causal``,
    ``key_padding_mask``): exactly ``min(top_k, visible)`` keys, ties to the lowest index.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D) with Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        top_k: keys kept per query, 1 <= top_k <= Nk.
        causal, causal_alignment: as :func:`attnzoo.softmax_attention`.
        key_padding_mask: (B, Nk) bool, True = the key is never selected.
        scale: defaults to ``D ** -0.5``. return_lse: also return the LSE over the kept keys.

    Cost: O(Nq * Nk * D) to select, O(Nq * top_k * D) to attend; the ``gathered`` backend holds
    O(chunk * Nk) scores at a time. Paper: Zhao et al. 2019 (Explicit Sparse Transformer).

    Example::

        >>> q = k = v = torch.randn(1, 4, 512, 64)
        >>> out = topk_attention(q, k, v, top_k=32, causal=True)
    """
    return TOPK(q, k, v, backend=backend, top_k=top_k, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


TOPK.function = topk_attention
TOPK.decoder = PrefixDecoder("topk", "new", fit=lambda params, keys: {**params, "top_k": min(params["top_k"], keys)})
