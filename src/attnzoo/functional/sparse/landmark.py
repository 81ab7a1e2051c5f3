"""Landmark Attention (catalog S6; Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite
Context Length for Transformers", NeurIPS 2023, Sec. 3; epfml/landmark-attention).

The sequence is cut into blocks of ``block_size`` ordinary tokens, each followed by one **landmark
token**: blocks of P = block_size + 1 positions whose last position (block_size, 2 block_size + 1,
...) is the landmark. **The input already contains the landmark tokens** (q, k, v at those
positions are the landmarks' projections), as in the paper's training, where a landmark is
inserted after every ``mem_freq`` (= block_size) tokens; this function does not insert them.

**Grouped softmax** (Sec. 3.1, Eq. 2; ``LandmarkGroupedSoftmaxFunction`` / ``landmark_grouped_softmax``
in ``llama/llama_mem.py``). Query i in block c (causal, s_ij = scale q_i . k_j):

* its own block up to i (landmark of block c excluded: it is masked for its own block's queries)
  and the landmark L_b of every earlier block b share one softmax;
* landmark L_b's weight is spread over block b's ordinary tokens by the softmax within the block;
  landmarks carry no value of their own:

    Z_i    = sum_{j in c, j <= i, j != L_c} e^{s_ij} + sum_{b < c} e^{s_{i L_b}}
    out_i  = [ sum_{j in c, j <= i, j != L_c} e^{s_ij} v_j + sum_{b < c} e^{s_{i L_b}} o_ib ] / Z_i
    o_ib   = sum_{j in b, j != L_b} softmax_{j in b}(s_ij) v_j

**Retrieval** (Sec. 3.2, inference; ``cache_top_k`` in the code): with ``top_k`` set, query i keeps
only the ``top_k`` earlier blocks with the highest landmark scores s_{i L_b} (per query and head,
the code's ``aggregate=None``; ties to the lowest block index) and the sums over b run over them;
``top_k=None`` keeps every earlier block (the training form). Selection scores in float64 in every
backend. The code's re-indexing of positions for the retrieved blocks (rotary positions) is the
model's business: here k is taken as given.

Key padding: right padding only (blocks are placed from position 0); a padded key is left out, a
block whose landmark or every ordinary token is a pad is never attended. A real query never
reaches a pad under right padding, so a padded batch equals each sequence alone.

Cost: the training form is dense in compute, O(N^2 D), with O(256 N + N P) memory (chunks of 256 queries); with
``top_k``: O(N (N / P + top_k P) D).

Backends: ``reference`` (the grouped softmax as the paper's code writes it: the N x N scores, a
softmax over own-block keys and landmarks, each landmark's weight multiplied into its block's
softmax); ``blockwise`` (the own block as P x P tiles; every earlier block reduced to its
landmark score and its own softmax output o_ib, weighed in one softmax over [own block's
log-sum-exp; landmark scores]: the training form in query chunks against all earlier blocks, the
retrieval as each block against the queries that selected it, merged by LSE; no N x N tensor).
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, stable_softmax_lse
from ...registry import Backend, Mechanism, Param, Problem, positive_number, register
from .._padding import real_keys, refuse_unless_right_padded
from ._params import PADDING_PARAM, positive_int, sample_options
from ._select import merge_partials, sorted_top_k_mask, top_k_mask
from .._prefix_decoder import PrefixDecoder

__all__ = ["landmark_attention", "LANDMARK"]

_PADDING_WHY = "landmark blocks start at position 0, so pads before a sequence would move its blocks and landmarks"
NEG_INF = float("-inf")
CHUNK_ROWS = 256  # queries per chunk of the blockwise path (rounded to whole blocks)


def _check_top_k(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "None (every earlier block) or a positive int (blocks retrieved per query)"
    return None


LANDMARK_PARAMS = (
    Param("block_size", 50, "ordinary tokens per block; the landmark is the block's next position (the paper's mem_freq, 50)", positive_int("tokens per block"), (0, -50, 1.5, "50"), "int"),
    Param("top_k", None, "None: every earlier block (training form); k: the k earlier blocks with the best landmark scores (retrieval)", _check_top_k, (0, -1, 2.0, "5", True), "int | None"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
)


def is_landmark(positions: Tensor, block_size: int) -> Tensor:
    """Whether each position holds a landmark (the last of each block of block_size + 1)."""
    return positions % (block_size + 1) == block_size


def _available_gates(q: Tensor, k: Tensor, block_size: int, real: Tensor) -> Tensor:
    """(B, H, N, n_blocks) float64 landmark scores q_i . k_{L_b} where block b is complete, before
    query i's block and has a real landmark and a real ordinary token; -inf elsewhere."""
    b, hq, n, _ = q.shape
    p_len = block_size + 1
    nb = n // p_len  # complete blocks (landmark present)
    group = hq // k.shape[1]
    k_l = k[:, :, block_size : nb * p_len : p_len].detach().double().repeat_interleave(group, dim=1)
    gates = torch.matmul(q.detach().double(), k_l.transpose(-1, -2))
    ok = real[:, block_size : nb * p_len : p_len] & real[:, : nb * p_len].view(b, nb, p_len)[..., :block_size].any(-1)  # (B, nb)
    before = torch.arange(nb, device=q.device)[None, :] < (torch.arange(n, device=q.device) // p_len)[:, None]  # (N, nb)
    return gates.masked_fill(~(before[None, None] & ok[:, None, None, :]), NEG_INF)


def _selected(gates: Tensor, top_k: Optional[int], rule) -> Tensor:
    return gates > NEG_INF if top_k is None else rule(gates, top_k)


# --------------------------------------------------------------------------------------------
# reference: the grouped softmax over N x N scores
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, block_size, top_k, key_padding_mask, scale):
    """The paper's grouped softmax written densely: one softmax over the own block's keys and the
    (selected) earlier landmarks, each landmark's probability multiplied into the softmax of its block."""
    refuse_unless_right_padded("landmark", key_padding_mask, _PADDING_WHY)
    b, hq, n, _ = q.shape
    p_len = block_size + 1
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = hq // k.shape[1]
    kk, vv = k.to(cdt).repeat_interleave(group, dim=1), v.to(cdt).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(cdt), kk.transpose(-1, -2)) * default_scale(q, scale)  # (B, H, N, N)
    real = real_keys(key_padding_mask, b, n, q.device)
    pos = torch.arange(n, device=q.device)
    blk_q, blk_k = (pos // p_len)[:, None], (pos // p_len)[None, :]
    mem = is_landmark(pos, block_size)[None, :]
    causal = pos[None, :] <= pos[:, None]
    own = (blk_k == blk_q) & causal & ~mem  # the last section, its landmark masked
    selected = _selected(_available_gates(q, k, block_size, real), top_k, sorted_top_k_mask)  # (B, H, N, nb)
    nb = selected.shape[-1]
    # landmark column j of block b is in the top-level group when b is selected for the query
    landmark_cols = torch.zeros(b, hq, n, n, dtype=torch.bool, device=q.device)
    landmark_cols[..., block_size : nb * p_len : p_len] = selected
    top_group = (own[None, None] & real[:, None, None, :]) | landmark_cols
    p_top, _ = stable_softmax_lse(s.masked_fill(~top_group, NEG_INF))
    # within-block softmax of every earlier block's ordinary real tokens (the other groups)
    inner_ok = (blk_k < blk_q) & ~mem & (pos[None, :] < nb * p_len)
    inner_ok = inner_ok[None, None] & real[:, None, None, :]
    w = torch.zeros_like(s)
    for blk in range(nb):
        cols = slice(blk * p_len, blk * p_len + block_size)
        p_in, _ = stable_softmax_lse(s[..., cols].masked_fill(~inner_ok[..., cols], NEG_INF))
        w[..., cols] = p_in * p_top[..., blk * p_len + block_size, None]  # times the landmark's probability
    w = torch.where(own[None, None], p_top, w)  # own-block keys keep their top-level probability
    out = torch.matmul(w, vv)
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------
# blockwise fast path
# --------------------------------------------------------------------------------------------
def _blockwise(q, k, v, *, block_size, top_k, key_padding_mask, scale):
    """The own block as P x P tiles; every earlier block reduced to (landmark score s_iL_b, the
    block's own softmax output o_ib); one softmax over [log-sum-exp of the own block; the landmark
    scores] weighs them. Training form: query chunks against all earlier blocks at once;
    retrieval: each block against the queries that selected it (work = the selected pairs)."""
    refuse_unless_right_padded("landmark", key_padding_mask, _PADDING_WHY)
    b, hq, n, d = q.shape
    p_len = block_size + 1
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    sc = default_scale(q, scale)
    group = hq // k.shape[1]
    real = real_keys(key_padding_mask, b, n, q.device)
    gates = _available_gates(q, k, block_size, real)
    nb, n_blk = gates.shape[-1], -(-n // p_len)
    pad = torch.nn.functional.pad
    pad_n = n_blk * p_len - n
    qb = pad(q.to(cdt), (0, 0, 0, pad_n)).view(b, hq, n_blk, p_len, d)
    kb = pad(k.to(cdt), (0, 0, 0, pad_n)).view(b, k.shape[1], n_blk, p_len, d).repeat_interleave(group, dim=1)
    vb = pad(v.to(cdt), (0, 0, 0, pad_n)).view(b, v.shape[1], n_blk, p_len, -1).repeat_interleave(group, dim=1)
    ordinary = torch.arange(p_len, device=q.device) < block_size
    key_ok = ordinary & pad(real, (0, pad_n)).view(b, 1, n_blk, 1, p_len)  # (B, 1, n_blk, 1, P)
    # own block: causal inside, its landmark left out
    s_own = torch.matmul(qb, kb.transpose(-1, -2)) * sc  # (B, H, n_blk, P, P)
    tri = torch.ones(p_len, p_len, dtype=torch.bool, device=q.device).tril()
    p_own, lse_own = stable_softmax_lse(s_own.masked_fill(~(tri & key_ok), NEG_INF))
    out_own = torch.matmul(p_own, vb).flatten(2, 3)[:, :, :n]  # (B, H, N, Dv)
    lse_own = lse_own.flatten(2, 3)[:, :, :n]
    if nb == 0:
        return out_own.to(q.dtype)
    if top_k is not None and top_k < nb:
        return _retrieved(qb.flatten(2, 3)[:, :, :n], kb, vb, key_ok, out_own, lse_own, top_k_mask(gates, top_k), sc).to(q.dtype)
    # training form: query chunks against every earlier block
    k_land = kb[:, :, :nb, block_size]  # (B, H, nb, D)
    qq = qb.flatten(2, 3)
    per_chunk = max(1, CHUNK_ROWS // p_len)
    outs = []
    for c0 in range(0, n_blk, per_chunk):
        c1 = min(n_blk, c0 + per_chunk)
        rows = slice(c0 * p_len, min(n, c1 * p_len))
        width = min(nb, c1)  # earlier blocks of some row of the chunk
        qc = qq[:, :, rows]
        s_in = torch.matmul(qc[:, :, None], kb[:, :, :width].transpose(-1, -2)) * sc  # (B, H, S, r, P)
        p_in, _ = stable_softmax_lse(s_in.masked_fill(~key_ok[:, :, :width], NEG_INF))
        o_in = torch.matmul(p_in, vb[:, :, :width])  # (B, H, S, r, Dv)
        s_land = torch.matmul(qc, k_land[:, :, :width].transpose(-1, -2)) * sc  # (B, H, r, S)
        s_land = s_land.masked_fill(gates[:, :, rows, :width] == NEG_INF, NEG_INF)
        w, _ = stable_softmax_lse(torch.cat([lse_own[:, :, rows, None], s_land], dim=-1))
        out = w[..., :1] * out_own[:, :, rows] + torch.matmul(w[..., None, 1:], o_in.transpose(2, 3)).squeeze(-2)
        outs.append(out)
    return torch.cat(outs, dim=2).to(q.dtype)


def _retrieved(q, kb, vb, key_ok, out_own, lse_own, selected, scale) -> Tensor:
    """Each block against the queries that selected it: per pair (i, b) the block's own softmax
    output and the landmark score as its log-weight, merged with the own block by
    :func:`._select.merge_partials` (exactly the grouped softmax: weights e^{s_iL_b} and e^{lse_own})."""
    b, h, n, _ = q.shape
    n_blocks = selected.shape[-1]
    block_size = kb.shape[3] - 1
    e = selected.nonzero()  # (E, 4): (b, h, i, block)
    key = (e[:, 0] * h + e[:, 1]) * n_blocks + e[:, 3]
    order = torch.sort(key, stable=True).indices
    e, key = e[order], key[order]
    counts = torch.bincount(key, minlength=b * h * n_blocks).tolist()
    q_e = q[e[:, 0], e[:, 1], e[:, 2]]  # (E, D)
    outs, lses, start = [], [], 0
    for gid, count in enumerate(counts):
        if count == 0:
            continue
        bi, rest = divmod(gid, h * n_blocks)
        hi, blk = divmod(rest, n_blocks)
        qg = q_e[start : start + count]
        s = torch.matmul(qg, kb[bi, hi, blk].T) * scale  # (count, P)
        p, _ = stable_softmax_lse(s.masked_fill(~key_ok[bi, 0, blk], NEG_INF))
        outs.append(torch.matmul(p, vb[bi, hi, blk]))
        lses.append(s[:, block_size])  # the landmark's score: the block's log-weight
        start += count
    rows = torch.cat([torch.arange(b * h * n, device=q.device), (e[:, 0] * h + e[:, 1]) * n + e[:, 2]])
    out, _ = merge_partials(torch.cat([out_own.reshape(b * h * n, -1), *outs]), torch.cat([lse_own.reshape(-1), *lses]), rows, b * h * n)
    return out.view(b, h, n, -1)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {"block_size": 50 if p.kv_len >= 1024 else max(1, p.kv_len // 16), "top_k": None}
    params: dict[str, Any] = {"block_size": rng.randint(1, 12), "top_k": rng.choice((None, None, 1, 2, 3))}
    params = sample_options(params, p, rng, right_only=True)
    params.pop("return_lse", None)  # a grouped softmax has no single log-sum-exp: no return_lse here
    return params


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    """Retrieval of about ``share`` of the earlier blocks (of 16 blocks); share 1: every block (the
    training form, still a grouped softmax, not plain softmax: landmarks route the weight)."""
    block = max(1, -(-p.kv_len // 16) - 1)
    return {"block_size": block, "top_k": None if share >= 1 else max(1, round(share * 16))}


LANDMARK = register(
    Mechanism(
        name="landmark",
        family="sparse",
        catalog=("S6",),
        paper="Landmark Attention: Random-Access Infinite Context Length for Transformers (Mohtashami & Jaggi, NeurIPS 2023), Sec. 3.1-3.2",
        formula="out_i = [sum_{j in own block, j<=i} e^{s_ij} v_j + sum_{b<c, b in top_k} e^{s_{i,L_b}} softmax_{j in b}(s_ij) v_j] / Z_i",
        cost="O(N^2 D) training form, O(N (N / P + top_k P) D) with top_k; O(256 N + N P) memory (blockwise)",
        summary="Landmark Attention: a landmark token per block routes each query's weight to whole blocks (grouped softmax), top-k blocks retrieved by landmark score",
        patterns=frozenset({"causal_self"}),
        params=LANDMARK_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        sparsity_params=_sparsity_params,
    )
)
LANDMARK.add_backend(Backend("reference", _reference, doc="the grouped softmax over N x N scores, as the paper's code writes it: the spec", priority=-100, materializes_scores=True))
LANDMARK.add_backend(Backend("blockwise", _blockwise, doc="own-block tiles + earlier blocks reduced to (landmark score, within-block output), one softmax / LSE merge; no N x N tensor", priority=10))


def landmark_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 50,
    top_k: Optional[int] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Any:
    """Landmark Attention (catalog S6): grouped softmax through one landmark token per block.

    The inputs already hold a landmark after every ``block_size`` tokens (positions block_size,
    2 block_size + 1, ...). Query i attends its own block's tokens and the landmarks of earlier
    blocks in one softmax; a landmark's weight is spread over its block by the softmax within
    the block. ``top_k`` keeps only the k earlier blocks with the best landmark scores (the
    paper's retrieval at inference); None keeps all (the training form).

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        block_size: ordinary tokens per block (the paper's mem_freq 50). top_k: None or blocks per query.
        key_padding_mask: (B, N) bool, True = pad; right padding only. scale: defaults to ``D ** -0.5``.

    Cost: O(N^2 D) (training form) or O(N (N / (block_size + 1) + top_k block_size) D).
    Paper: Mohtashami & Jaggi, NeurIPS 2023, Sec. 3.

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = landmark_attention(q, k, v, block_size=63, top_k=4)
    """
    return LANDMARK(q, k, v, backend=backend, block_size=block_size, top_k=top_k, key_padding_mask=key_padding_mask, scale=scale)


LANDMARK.function = landmark_attention
LANDMARK.decoder = PrefixDecoder("landmark", "all")
