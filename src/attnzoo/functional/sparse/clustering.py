"""Clustering / grouping attention (catalog S4): a query attends only the keys of its own group.

Four mechanisms; three share one engine (a query attends the keys that carry its label):

* ``region_attention`` -- Region Attention Transformer (RAT; Yang et al., 2024, R-MSA, Sec. 3.2):
  every token carries a region label (RAT: the Segment-Anything region of its pixel) and a query
  attends the keys with its own label only:

      out_i = sum_{j : l_j = l_i} softmax_j(scale q_i . k_j) v_j

  RAT's code (``Model_RAT.py``: ``correlation_mask_batch``) adds ``-1000`` to the scores of pairs in
  different regions; that equals the hard mask used here to float32 rounding (e^-1000 = 0). RAT has
  no global or shared part inside R-MSA (its block follows it with a separate window attention).
* ``kmeans_routing`` -- Routing Transformer (Roy, Saffar, Vaswani, Grangier, TACL 2021, Sec. 4):
  queries and keys are L2-normalised and routed to shared centroids (the functional form takes the
  centroids, (H, C, D); :class:`attnzoo.nn.RoutingAttention` learns them by the paper's online
  k-means). Two routings:

  - ``balanced=True`` (default; the paper's implementation and lucidrains' ``distribution``):
    cluster c takes its ``window`` queries and, separately, its ``window`` keys nearest to mu_c
    (largest cosine; ties to the lowest position), so every cluster is the same size and a token
    may sit in several clusters or in none. Attention runs inside each cluster. A query in several
    clusters gets the MEAN of its per-cluster outputs (lucidrains' ``scatter_mean``); a query in
    none, or whose clusters hold no key it may see, gets 0.
  - ``balanced=False`` (the paper's Eq. for routing attention): each token goes to its nearest
    centroid and a query attends the keys of its cluster -- ``region_attention`` with labels
    ``argmax_c cos(x, mu_c)``.

  ``causal``: a query attends only keys at positions <= its own (bottom-right aligned when
  Nq != Nk), inside its cluster, as the paper's ``j < i`` (lucidrains masks the upper triangle of
  each position-sorted cluster: the same when queries and keys share the routing). Balanced
  selection reads the whole sequence (a past token's cluster slots depend on future tokens), as in
  the paper's and lucidrains' code; the conformance suite is told so (``causal_block``). The
  nearest-centroid routing is strictly causal.

* ``token_centres`` -- CATANet (Liu et al., CVPR 2025): tokens sorted by their nearest shared
  token centre, chunked attention over the sorted sequence plus attention to the centres (its own
  engine; see the section below).
* ``histogram_bins`` -- Histoformer (Sun et al., ECCV 2024): tokens sorted by intensity and cut
  into equal bins (BHR) or strided bins (FHR); labels = bins (see the section below).

Routing is computed in float64 on detached inputs in every backend (the same clusters
everywhere) and carries no gradient; the centroids are normalised too (nearest in angle = nearest
in distance on the unit sphere). Key padding: pads are never attended; with ``balanced=True`` it
is refused (pads would take cluster slots of real tokens).

Backends: ``reference`` (dense N x N masks, cluster by cluster: the spec); ``grouped`` (tokens
sorted by group, one GEMM per group / the clusters gathered into (C, w, w) batches: O(sum of group
products) or O(C w^2 D), any device); ``gathered`` (label groups on the C++ gathered-rows kernel,
each group's keys a contiguous span of the label-sorted keys; CPU).

Cost: labels (region, nearest-centroid routing, histogram bins): O(sum_g |Q_g| |K_g| D) (O(N^2 D / G) for G equal groups); balanced routing:
O(N C D) routing + O(C w^2 D) attention (O(N^1.5 D) at the paper's C = w = sqrt(N)).
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...kernels import block_sparse
from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from ._params import PADDING_PARAM, WHOLE_SEQUENCE, native_backend, positive_int, sample_options
from ._select import NEG_INF, merge_partials, softmax_lse, top_k_mask
from .._prefix_decoder import READS_AHEAD

__all__ = [
    "region_attention", "kmeans_routing_attention", "token_centres_attention", "histogram_attention", "histogram_labels", "route_scores",
    "REGION", "KMEANS_ROUTING", "TOKEN_CENTRES", "HISTOGRAM",
]


# --------------------------------------------------------------------------------------------
# parameter checks
# --------------------------------------------------------------------------------------------
def _int_labels(value: Any, shape: tuple[int, ...], device: torch.device) -> bool:
    return (
        isinstance(value, Tensor) and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        and tuple(value.shape) == shape and value.device == device
    )


def _check_labels(value: Any, p: Problem) -> Optional[str]:
    if not _int_labels(value, (p.batch, p.kv_len), p.device):
        return f"an integer tensor of shape (B, Nk) = {(p.batch, p.kv_len)} on {p.device} (each key's region label; required)"
    return None


def _check_query_labels(value: Any, p: Problem) -> Optional[str]:
    if value is not None and not _int_labels(value, (p.batch, p.q_len), p.device):
        return f"None or an integer tensor of shape (B, Nq) = {(p.batch, p.q_len)} on {p.device} (each query's region label)"
    return None


def _check_centroids(value: Any, p: Problem) -> Optional[str]:
    if not (isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 3 and value.shape[0] == p.q_heads
            and value.shape[1] >= 1 and value.shape[2] == p.head_dim and value.device == p.device):
        return f"a floating tensor (H={p.q_heads}, C >= 1, D={p.head_dim}) on {p.device} (the shared cluster centroids; required)"
    return None


def _check_window(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "None or a positive int (queries and keys per cluster)"
    return None


# --------------------------------------------------------------------------------------------
# the label engine: a query attends the keys that carry its label
# --------------------------------------------------------------------------------------------
def _causal_offset(nq: int, nk: int, causal: bool) -> Optional[int]:
    return nk - nq if causal else None


def _label_reference(q, k, v, q_lab: Tensor, k_lab: Tensor, offset: Optional[int], key_padding_mask: Optional[Tensor], scale) -> tuple[Tensor, Tensor]:
    """Dense (B, H, Nq, Nk) mask ``l_i == l_j`` (and causal, and not padded) over materialized scores."""
    nq, nk = q.shape[2], k.shape[2]
    allowed = q_lab[..., :, None] == k_lab[..., None, :]
    if offset is not None:
        allowed = allowed & (torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + offset)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(q.shape[0], 1, 1, nk)
    return materialized_attention(q, k, v, scale=scale, allowed=allowed)


def _compact(q_lab: Tensor, k_lab: Tensor, key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, int]:
    """Labels as dense ids 0 .. n-1 (padded keys: id n, which no query has); returns (q_ids, k_ids, n + 1)."""
    both = torch.cat([q_lab.reshape(-1), k_lab.reshape(-1)])
    _, inv = torch.unique(both, return_inverse=True)
    n_ids = int(inv.max()) + 1 if inv.numel() else 1
    q_ids, k_ids = inv[: q_lab.numel()].view(q_lab.shape), inv[q_lab.numel() :].view(k_lab.shape)
    if key_padding_mask is not None:
        k_ids = k_ids.masked_fill(key_padding_mask[:, None, :], n_ids)
    return q_ids, k_ids, n_ids + 1


def _label_gathered(q, k, v, q_lab: Tensor, k_lab: Tensor, offset: Optional[int], key_padding_mask: Optional[Tensor], scale) -> tuple[Tensor, Tensor]:
    """The keys of each (b, h) sorted by (label, position): a label's keys are one contiguous span
    and a causal query's keys a prefix of it. Each query row is one entry of the C++ gathered-rows
    kernel (group = its label's span, limit = the end of its causal prefix)."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    q_ids, k_ids, _ = _compact(q_lab.expand(b, h, nq), k_lab.expand(b, h, nk), key_padding_mask)
    stride = nk + 1
    comb = k_ids * stride + torch.arange(nk, device=k.device)
    comb_sorted, order = torch.sort(comb, dim=-1)
    ks = k.gather(2, order[..., None].expand(-1, -1, -1, k.shape[-1]))
    vs = v.gather(2, order[..., None].expand(-1, -1, -1, v.shape[-1]))
    base = q_ids * stride
    lo = torch.searchsorted(comb_sorted, base)
    seg_end = torch.searchsorted(comb_sorted, base + nk)
    if offset is None:
        hi = seg_end
    else:
        last = (torch.arange(nq, device=q.device) + offset).clamp(-1, nk - 1)
        hi = torch.searchsorted(comb_sorted, base + last, right=True)
    valid = hi > lo
    e = valid.nonzero().cpu()  # (E, 3): b, h, i
    lo_e, end_e, hi_e = lo[valid].cpu(), seg_end[valid].cpu(), hi[valid].cpu()
    gkey = (e[:, 0] * h + e[:, 1]) * stride + lo_e
    gorder = torch.sort(gkey, stable=True).indices
    e, lo_e, end_e, hi_e, gkey = e[gorder], lo_e[gorder], end_e[gorder], hi_e[gorder], gkey[gorder]
    _, counts = torch.unique_consecutive(gkey, return_counts=True)
    gptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    first = gptr[:-1]
    meta = torch.stack([e[first, 0], e[first, 1], lo_e[first], end_e[first] - lo_e[first]], dim=1).contiguous()
    rows = ((e[:, 0] * h + e[:, 1]) * nq + e[:, 2]).contiguous()
    limit = (hi_e - 1).contiguous()
    out_e, lse_e = block_sparse.gathered_rows_attention(q, ks, vs, rows, limit, gptr, meta, scale=scale)
    out, lse = merge_partials(out_e, lse_e, rows, b * h * nq)
    tie = _empty_tie(q, ks, vs).to(out.dtype)
    return (out + tie).view(b, h, nq, -1).to(q.dtype), (lse + tie).view(b, h, nq)


def _empty_tie(*tensors: Tensor) -> Tensor:
    """A 0 that depends on every tensor (a sum over none of its elements): keeps the outputs in the
    autograd graph of q, k, v (zero gradients, as the reference's) when no query sees a key."""
    return sum(t.reshape(-1)[:0].sum() for t in tensors)


def _label_grouped(q, k, v, q_lab: Tensor, k_lab: Tensor, offset: Optional[int], key_padding_mask: Optional[Tensor], scale) -> tuple[Tensor, Tensor]:
    """Queries and keys sorted by (batch, head, label); one GEMM per group holding both (PyTorch, any device)."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_ids, k_ids, n_ids = _compact(q_lab.expand(b, h, nq), k_lab.expand(b, h, nk), key_padding_mask)
    bh = torch.arange(b * h, device=q.device).view(b, h, 1)
    qkey = (bh * n_ids + q_ids).reshape(-1)
    kkey = (bh * n_ids + k_ids).reshape(-1)
    qperm = torch.sort(qkey, stable=True).indices
    kperm = torch.sort(kkey, stable=True).indices
    qcount = torch.bincount(qkey, minlength=b * h * n_ids)
    kcount = torch.bincount(kkey, minlength=b * h * n_ids)
    qstart, kstart = qcount.cumsum(0) - qcount, kcount.cumsum(0) - kcount
    gids = torch.arange(b * h * n_ids, device=q.device)
    active = (qcount > 0) & (kcount > 0) & (gids % n_ids != n_ids - 1)  # the last id holds the padded keys only
    spans = torch.stack([qstart, qcount, kstart, kcount], 1)[active].tolist()
    qs = (q.reshape(-1, d)[qperm]).to(cdt) * default_scale(q, scale)
    ks, vs = k.reshape(-1, d)[kperm].to(cdt), v.reshape(-1, dv)[kperm].to(cdt)
    qpos, kpos = qperm % nq, kperm % nk
    outs, lses, rows = [], [], []
    for q0, cq, k0, ck in spans:
        sq, sk = slice(q0, q0 + cq), slice(k0, k0 + ck)
        scores = qs[sq] @ ks[sk].T
        if offset is not None:
            scores = scores.masked_fill(kpos[sk][None, :] > qpos[sq][:, None] + offset, NEG_INF)
        p, lse = softmax_lse(scores)
        outs.append(p @ vs[sk])
        lses.append(lse)
        rows.append(qperm[sq])
    tie = _empty_tie(qs, ks, vs)
    out = torch.zeros(b * h * nq, dv, dtype=cdt, device=q.device) + tie
    lse = torch.full((b * h * nq,), NEG_INF, dtype=cdt, device=q.device) + tie
    if outs:
        idx = torch.cat(rows)
        out = out.index_copy(0, idx, torch.cat(outs))
        lse = lse.index_copy(0, idx, torch.cat(lses))
    return out.view(b, h, nq, dv).to(q.dtype), lse.view(b, h, nq)


_LABEL_ENGINES = {"reference": _label_reference, "gathered": _label_gathered, "grouped": _label_grouped}


# ============================================================================================
# region_attention
# ============================================================================================
def _region_check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound.get("query_labels") is None and p.q_len != p.kv_len:
        return "query_labels", f"required when Nq ({p.q_len}) != Nk ({p.kv_len}): labels names the keys' regions only"
    return None


REGION_PARAMS = (
    Param("labels", None, "required: (B, Nk) integer region label of each key (and of each query when query_labels is None)", _check_labels,
          (None, "regions", torch.zeros(1, dtype=torch.long), torch.zeros(2, 9)), "Tensor"),
    Param("query_labels", None, "(B, Nq) integer region label of each query; None: labels (self-attention)", _check_query_labels,
          ("regions", torch.zeros(1, dtype=torch.long), torch.zeros(2, 9)), "Tensor | None"),
    flag("causal", False, "attend only keys at positions <= the query's (bottom-right aligned)"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5 (RAT's code: num_heads ** -0.5)"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq); -inf where no key shares the label"),
)


def _region_labels(q, k, labels: Tensor, query_labels: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    ql = labels if query_labels is None else query_labels
    return ql.to(torch.int64)[:, None, :], labels.to(torch.int64)[:, None, :]


def _region_engine(name: str):
    engine = _LABEL_ENGINES[name]

    def run(q, k, v, *, labels, query_labels, causal, key_padding_mask, scale, return_lse):
        ql, kl = _region_labels(q, k, labels, query_labels)
        out, lse = engine(q, k, v, ql, kl, _causal_offset(q.shape[2], k.shape[2], causal), key_padding_mask, scale)
        return (out, lse) if return_lse else out

    run.__name__ = f"_region_{name}"
    return run


def _region_sample(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0 if rng is None else rng.randrange(2**31))
    n_regions = 4 if rng is None else rng.randint(1, 5)
    params: dict[str, Any] = {
        "labels": torch.randint(0, n_regions, (p.batch, p.kv_len), generator=gen).to(p.device),
        "causal": pattern.startswith("causal"),
    }
    if pattern.endswith("cross") or (rng is not None and rng.random() < 0.3):
        params["query_labels"] = torch.randint(0, n_regions + (0 if rng is None else rng.randint(0, 1)), (p.batch, p.q_len), generator=gen).to(p.device)
    return params if rng is None else sample_options(params, p, rng)


REGION = register(
    Mechanism(
        name="region_attention",
        family="sparse",
        catalog=("S4",),
        paper="Region Attention Transformer for Medical Image Restoration (Yang et al., MICCAI 2024), R-MSA (Sec. 3.2)",
        formula="out_i = sum_{j: l_j = l_i} softmax_j(scale q_i.k_j) v_j",
        cost="O(sum over regions of |Q_r| |K_r| D) (O(N^2 D / R) for R equal regions); O(N) memory on the fast backends",
        summary="region attention: each query attends only the keys that carry its region label (RAT's R-MSA)",
        patterns=frozenset({"noncausal_self", "causal_self", "noncausal_cross", "causal_cross"}),
        params=REGION_PARAMS,
        sample_params=_region_sample,
        check_params=_region_check_params,
    )
)
REGION.add_backend(Backend("reference", _region_engine("reference"), doc="dense label-equality mask over materialized scores: the spec", priority=-100, materializes_scores=True))
REGION.add_backend(native_backend("gathered", _region_engine("gathered"), "keys sorted by (label, position), each query one row over its label's span on the C++ gathered-rows kernel", priority=40))
REGION.add_backend(Backend("grouped", _region_engine("grouped"), doc="queries and keys sorted by label, one GEMM per region (PyTorch, any device)", priority=30))


def region_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    labels: Tensor,
    query_labels: Optional[Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Region attention (catalog S4; RAT's R-MSA): a query attends only the keys of its own region.

    ``out_i = sum_{j: l_j = l_i} softmax_j(scale q_i . k_j) v_j``; a query whose label no key
    carries gets 0 (LSE -inf). Equal to softmax attention under the boolean mask ``l_i == l_j``.

    Args:
        q: (B, H, Nq, D). k: (B, H, Nk, D). v: (B, H, Nk, Dv).
        labels: (B, Nk) integer region of each key (RAT: the SAM segment of the pixel, flattened).
        query_labels: (B, Nq) region of each query; None: ``labels`` (needs Nq == Nk).
        causal: also j <= i (bottom-right aligned). key_padding_mask: (B, Nk) bool, True = ignore.
        scale: defaults to ``D ** -0.5``. return_lse: also return the LSE (B, H, Nq).

    Cost: O(sum_r |Q_r| |K_r| D); the fast backends sort by label and never hold an Nq x Nk tensor.
    Paper: Yang et al., "Region Attention Transformer for Medical Image Restoration" (2024), R-MSA.

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> labels = torch.randint(0, 16, (1, 4096))
        >>> out = region_attention(q, k, v, labels=labels)
    """
    return REGION(q, k, v, backend=backend, labels=labels, query_labels=query_labels, causal=causal, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


REGION.function = region_attention


# ============================================================================================
# kmeans_routing
# ============================================================================================
def route_scores(x: Tensor, centroids: Tensor) -> Tensor:
    """(B, H, N, C) float64 cosine of each token with each centroid (no gradient): the routing."""
    xn = F.normalize(x.detach().double(), dim=-1)
    mu = F.normalize(centroids.detach().double(), dim=-1)
    return torch.einsum("bhnd,hcd->bhnc", xn, mu)


def _kmeans_check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound.get("balanced") and bound.get("key_padding_mask") is not None:
        return "key_padding_mask", (
            "not exact with balanced=True: each cluster takes its window nearest tokens over the whole sequence, so pads would "
            "take cluster slots of real tokens (pass balanced=False, nearest-centroid routing, where padding is exact)"
        )
    return None


KMEANS_PARAMS = (
    Param("centroids", None, "required: (H, C, D) cluster centroids shared by queries and keys (normalised here); nn.RoutingAttention learns them",
          _check_centroids, (None, "c", torch.zeros(3), torch.zeros(4, 0, 16), torch.zeros(3, 2, 16)), "Tensor"),
    Param("window", None, "balanced: queries and keys per cluster (lucidrains' window_size); None: ceil(N / C)", _check_window, (0, -1, 1.5, "4"), "int | None"),
    flag("balanced", True, "True: each cluster takes its window nearest queries and keys (the paper's code); False: each token to its nearest centroid"),
    flag("causal", False, "attend only keys at positions <= the query's, inside the cluster (bottom-right aligned)"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
)


def _windows(nq: int, nk: int, n_clusters: int, window: Optional[int]) -> tuple[int, int]:
    wq = min(window if window is not None else math.ceil(nq / n_clusters), nq)
    wk = min(window if window is not None else math.ceil(nk / n_clusters), nk)
    return wq, wk


def _nearest_labels(q, k, centroids) -> tuple[Tensor, Tensor]:
    return route_scores(q, centroids).argmax(-1), route_scores(k, centroids).argmax(-1)


def _kmeans_reference(q, k, v, *, centroids, window, balanced, causal, key_padding_mask, scale):
    """Cluster by cluster: stable-sort the cosines, take the window nearest queries and keys, a dense
    masked softmax per cluster, the mean over the clusters a query sits in (the spec)."""
    nq, nk = q.shape[2], k.shape[2]
    offset = _causal_offset(nq, nk, causal)
    if not balanced:
        ql, kl = _nearest_labels(q, k, centroids)
        return _label_reference(q, k, v, ql, kl, offset, key_padding_mask, scale)[0]
    sq, sk = route_scores(q, centroids), route_scores(k, centroids)
    wq, wk = _windows(nq, nk, centroids.shape[1], window)
    acc = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    count = torch.zeros(q.shape[:3], dtype=acc.dtype, device=q.device)
    for c in range(centroids.shape[1]):
        qi = torch.sort(sq[..., c], dim=-1, descending=True, stable=True).indices[..., :wq]
        ki = torch.sort(sk[..., c], dim=-1, descending=True, stable=True).indices[..., :wk]
        in_q = torch.zeros(sq.shape[:3], dtype=torch.bool, device=q.device).scatter(-1, qi, True)
        in_k = torch.zeros(sk.shape[:3], dtype=torch.bool, device=q.device).scatter(-1, ki, True)
        allowed = in_q[..., :, None] & in_k[..., None, :]
        if offset is not None:
            allowed = allowed & (torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + offset)
        out_c, lse_c = materialized_attention(q, k, v, scale=scale, allowed=allowed)
        seen = in_q & (lse_c != NEG_INF)  # a NaN LSE counts: the NaN reaches the output
        acc = acc + torch.where(seen[..., None], out_c.to(acc.dtype), torch.zeros_like(acc))
        count = count + seen.to(acc.dtype)
    return (acc / count.clamp(min=1)[..., None]).to(q.dtype)


def _nearest_slots(scores: Tensor, w: int) -> Tensor:
    """(B, H, C, w) positions of the w largest scores of each cluster's row (ties: lowest position),
    in position order: a threshold top-k (:func:`._select.top_k_mask`), not a full sort of N."""
    keep = top_k_mask(scores, w)  # exactly w per row: the cosines are finite (NaN ranks first)
    return keep.nonzero()[:, -1].view(*scores.shape[:-1], w)


def _balanced_grouped(q, k, v, centroids, window, offset, scale) -> Tensor:
    """The clusters gathered into (B, H, C, w, D) batches (lucidrains' KmeansAttention), one batched
    softmax, outputs averaged back over the clusters of each query by scatter_add: O(C w^2 D)."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    n_clusters = centroids.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    wq, wk = _windows(nq, nk, n_clusters, window)
    qi = _nearest_slots(route_scores(q, centroids).transpose(-1, -2), wq)  # (B, H, C, wq)
    ki = _nearest_slots(route_scores(k, centroids).transpose(-1, -2), wk)
    qf, kf = qi.reshape(b, h, -1), ki.reshape(b, h, -1)
    qg = q.to(cdt).gather(2, qf[..., None].expand(-1, -1, -1, d)).view(b, h, n_clusters, wq, d)
    kg = k.to(cdt).gather(2, kf[..., None].expand(-1, -1, -1, d)).view(b, h, n_clusters, wk, d)
    vg = v.to(cdt).gather(2, kf[..., None].expand(-1, -1, -1, dv)).view(b, h, n_clusters, wk, dv)
    scores = (qg * default_scale(q, scale)) @ kg.transpose(-1, -2)
    if offset is not None:
        scores = scores.masked_fill(ki[..., None, :] > qi[..., :, None] + offset, NEG_INF)
    p, lse = softmax_lse(scores)
    o = p @ vg  # (B, H, C, wq, Dv)
    seen = (lse != NEG_INF).to(cdt).reshape(b, h, -1)
    acc = torch.zeros(b, h, nq, dv, dtype=cdt, device=q.device).scatter_add(2, qf[..., None].expand(-1, -1, -1, dv), o.reshape(b, h, -1, dv))
    count = torch.zeros(b, h, nq, dtype=cdt, device=q.device).scatter_add(2, qf, seen)
    return (acc / count.clamp(min=1)[..., None]).to(q.dtype)


def _kmeans_engine(name: str):
    engine = _LABEL_ENGINES[name]

    def run(q, k, v, *, centroids, window, balanced, causal, key_padding_mask, scale):
        offset = _causal_offset(q.shape[2], k.shape[2], causal)
        if balanced:
            return _balanced_grouped(q, k, v, centroids, window, offset, scale)
        ql, kl = _nearest_labels(q, k, centroids)
        return engine(q, k, v, ql, kl, offset, key_padding_mask, scale)[0]

    run.__name__ = f"_kmeans_{name}"
    return run


def _plain_centroids(p: Problem, n_clusters: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p.q_heads, n_clusters, p.head_dim, generator=gen).to(device=p.device, dtype=p.dtype)


def _kmeans_sample(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    causal = pattern.startswith("causal")
    if rng is None:  # clusters of 64 tokens (N <= 64: one cluster, i.e. dense attention)
        n_clusters = max(1, p.kv_len // 64)
        return {"centroids": _plain_centroids(p, n_clusters), "window": math.ceil(p.kv_len / n_clusters), "causal": causal}
    n_clusters = rng.randint(1, 5)
    params: dict[str, Any] = {"centroids": _plain_centroids(p, n_clusters, rng.randrange(2**31)), "causal": causal, "balanced": rng.random() < 0.6}
    if rng.random() < 0.7:
        params["window"] = rng.randint(1, max(p.q_len, p.kv_len) + 2)
    if params["balanced"]:
        if rng.random() < 0.2:
            params["scale"] = rng.choice((0.05, 0.5, 1.0))
        return params
    params = sample_options(params, p, rng)
    params.pop("return_lse", None)
    return params


def _kmeans_sparsity(p: Problem, share: float) -> dict[str, Any]:
    """C = 1 / share clusters of share * N queries and keys each (share = 1: one cluster, all keys)."""
    n_clusters = max(1, round(1 / share))
    return {"centroids": _plain_centroids(p, n_clusters), "window": max(1, math.ceil(share * p.kv_len))}


KMEANS_ROUTING = register(
    Mechanism(
        name="kmeans_routing",
        family="sparse",
        catalog=("S4",),
        paper="Efficient Content-Based Sparse Attention with Routing Transformers (Roy et al., TACL 2021), Sec. 4 (routing attention, online k-means)",
        formula="out_i = mean_{c: i in Q_c} sum_{j in K_c} softmax_j(scale q_i.k_j) v_j; Q_c, K_c = the window tokens nearest mu_c (balanced) or those whose nearest centroid is mu_c",
        cost="O(N C D) routing + O(C w^2 D) attention (O(N^1.5 D) at C = w = sqrt(N)); O(N w) memory",
        summary="Routing Transformer: queries and keys routed to shared k-means centroids, attention inside each cluster",
        patterns=frozenset({"noncausal_self", "causal_self", "noncausal_cross", "causal_cross"}),
        params=KMEANS_PARAMS,
        sample_params=_kmeans_sample,
        check_params=_kmeans_check_params,
        causal_block=lambda bound: WHOLE_SEQUENCE if bound["balanced"] else 1,  # balanced slots read the whole sequence
        sparsity_params=_kmeans_sparsity,
    )
)
KMEANS_ROUTING.add_backend(Backend("reference", _kmeans_reference, doc="cluster by cluster: stable-sort routing, dense masked softmax, mean over clusters: the spec", priority=-100, materializes_scores=True))
KMEANS_ROUTING.add_backend(
    native_backend("gathered", _kmeans_engine("gathered"), "balanced: clusters gathered into (C, w, w) batches; nearest-centroid: the C++ gathered-rows kernel over label spans", priority=40)
)
KMEANS_ROUTING.add_backend(Backend("grouped", _kmeans_engine("grouped"), doc="clusters gathered into (C, w, w) batches / sorted by cluster, one GEMM each (PyTorch, any device)", priority=30))


def kmeans_routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    centroids: Tensor,
    window: Optional[int] = None,
    balanced: bool = True,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Routing Transformer attention (catalog S4): attention inside shared k-means clusters.

    Queries and keys are L2-normalised and compared with the (normalised) ``centroids`` mu_c.
    ``balanced=True``: cluster c holds its ``window`` nearest queries Q_c and keys K_c;
    ``out_i = mean over {c : i in Q_c} of sum_{j in K_c} softmax_j(scale q_i . k_j) v_j`` (0 for a
    query in no cluster). ``balanced=False``: a token's cluster is its nearest centroid, and a
    query attends the keys of its cluster. ``causal`` keeps keys j <= i inside the cluster.

    Args:
        q: (B, H, Nq, D). k: (B, H, Nk, D). v: (B, H, Nk, Dv).
        centroids: (H, C, D), shared by queries and keys; :class:`attnzoo.nn.RoutingAttention`
            learns them by online k-means. window: tokens per cluster (None: ceil(N / C)).
        balanced, causal: see above. key_padding_mask: (B, Nk) bool, True = ignore (balanced=False only).
        scale: defaults to ``D ** -0.5``.

    Cost: O(N C D) routing + O(C w^2 D); with the paper's C = w = sqrt(N), O(N^1.5 D).
    Paper: Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers" (2021), Sec. 4.

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = kmeans_routing_attention(q, k, v, centroids=torch.randn(4, 64, 64), window=64)
    """
    return KMEANS_ROUTING(q, k, v, backend=backend, centroids=centroids, window=window, balanced=balanced, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


KMEANS_ROUTING.function = kmeans_routing_attention


# ============================================================================================
# token_centres (CATANet)
# ============================================================================================
# CATANet (Liu et al., CVPR 2025), Sec. 3.2, its Token-Aggregation Block: the tokens are grouped to
# their nearest shared token centre, sorted by group, and the sorted sequence is cut into chunks of
# ``group_size``; intra-group self-attention (IASA): the queries of chunk g attend the keys of
# chunks g and g + 1 of the sorted sequence (CATANet's code: ``unfold(2 gs, gs)``); inter-group
# cross-attention (IRCA): every query also attends the M centres (keys: the centres, values: their
# value projection) in a softmax of its own, and the two outputs are added.
def _check_optional_groups(value: Any, p: Problem) -> Optional[str]:
    if value is not None and not _int_labels(value, (p.batch, p.kv_len), p.device):
        return f"None or an integer tensor of shape (B, N) = {(p.batch, p.kv_len)} on {p.device} (each token's group, shared by the heads)"
    return None


def _check_centre_values(value: Any, p: Problem) -> Optional[str]:
    if value is not None and not (isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 3 and value.shape[0] == p.q_heads
                                  and value.shape[2] == p.value_dim and value.device == p.device):
        return f"None or a floating tensor (H={p.q_heads}, M, Dv={p.value_dim}) on {p.device} (the centres' values of the inter-group branch)"
    return None


def _centres_check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound.get("key_padding_mask") is not None:
        return "key_padding_mask", "not exact: the chunks are cut from the whole group-sorted sequence, so pads would shift every later chunk"
    values = bound.get("centre_values")
    if values is not None and values.shape[1] != bound["centres"].shape[1]:
        return "centre_values", f"expected M={bound['centres'].shape[1]} centres (as centres), got {values.shape[1]}"
    return None


CENTRES_PARAMS = (
    Param("centres", None, "required: (H, M, D) token centres: the keys of the inter-group branch and (without groups) the routing of each key",
          _check_centroids, (None, "c", torch.zeros(3), torch.zeros(4, 0, 16), torch.zeros(3, 2, 16)), "Tensor"),
    Param("group_size", None, "required: chunk length of the group-sorted sequence (CATANet's group_size: 32..256)", positive_int("tokens per chunk"), (None, 0, -1, 1.5, "64"), "int"),
    Param("groups", None, "(B, N) integer group of each token, shared by the heads (CATANet: the nearest centre of the block input); None: nearest centre of each key",
          _check_optional_groups, ("g", torch.zeros(1, dtype=torch.long), torch.zeros(2, 9)), "Tensor | None"),
    Param("centre_values", None, "(H, M, Dv) values of the centres: each query also attends the centres (the inter-group branch), added; None: intra-group only",
          _check_centre_values, ("v", torch.zeros(3), torch.zeros(4, 2, 3)), "Tensor | None"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k in both branches; default head_dim ** -0.5 (CATANet's SDPA default)"),
)


def _centre_order(k: Tensor, centres: Tensor, groups: Optional[Tensor]) -> Tensor:
    """(B, H, N) int64: the token at each place of the group-sorted sequence (ties: position order)."""
    b, h, n = k.shape[:3]
    gid = groups.to(torch.int64)[:, None, :].expand(b, h, n) if groups is not None else route_scores(k, centres).argmax(-1)
    return torch.sort(gid, dim=-1, stable=True).indices


def _inter_branch(q, centres, centre_values, scale) -> Tensor:
    b = q.shape[0]
    kc = centres.to(q.dtype)[None].expand(b, -1, -1, -1)
    vc = centre_values.to(q.dtype)[None].expand(b, -1, -1, -1)
    return materialized_attention(q, kc, vc, scale=scale)[0]


def _centres_reference(q, k, v, *, centres, group_size, groups, centre_values, key_padding_mask, scale):
    """Rank of every token in the group-sorted sequence, the dense (N x N) mask "key in the query's
    chunk or the next", a masked softmax; plus the centre softmax: the spec."""
    n = q.shape[2]
    gs = min(group_size, n)
    order = _centre_order(k, centres, groups)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=q.device).expand_as(order))
    start = (rank // gs) * gs  # first place of the query's chunk
    allowed = (rank[..., None, :] >= start[..., :, None]) & (rank[..., None, :] < start[..., :, None] + 2 * gs)
    out = materialized_attention(q, k, v, scale=scale, allowed=allowed)[0]
    if centre_values is not None:
        out = out + _inter_branch(q, centres, centre_values, scale)
    return out


def _centres_grouped(q, k, v, *, centres, group_size, groups, centre_values, key_padding_mask, scale):
    """Sort by group, chunks of group_size as a (B, H, n_chunks, gs, D) batch against the (B, H,
    n_chunks, 2 gs, D) keys of the chunk and the next (CATANet's IASA), scatter back: O(N gs D)."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    gs = min(group_size, n)
    ng = -(-n // gs)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    order = _centre_order(k, centres, groups)
    pad = (ng + 1) * gs - n  # room for a last, empty "next chunk"

    def sorted_chunks(x: Tensor) -> Tensor:
        xs = x.to(cdt).gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))
        return F.pad(xs, (0, 0, 0, pad)).view(b, h, ng + 1, gs, x.shape[-1])

    qc, kc, vc = sorted_chunks(q)[:, :, :ng], sorted_chunks(k), sorted_chunks(v)
    real = F.pad(torch.ones(n, dtype=torch.bool, device=q.device), (0, pad)).view(ng + 1, gs)
    keys = torch.cat([kc[:, :, :-1], kc[:, :, 1:]], dim=3)  # (B, H, ng, 2 gs, D)
    values = torch.cat([vc[:, :, :-1], vc[:, :, 1:]], dim=3)
    visible = torch.cat([real[:-1], real[1:]], dim=1)  # (ng, 2 gs)
    scores = (qc * default_scale(q, scale)) @ keys.transpose(-1, -2)
    p, _ = softmax_lse(scores.masked_fill(~visible[:, None, :], NEG_INF))
    out_sorted = (p @ values).reshape(b, h, ng * gs, dv)[:, :, :n]
    out = torch.zeros(b, h, n, dv, dtype=cdt, device=q.device).scatter(2, order[..., None].expand(-1, -1, -1, dv), out_sorted)
    out = out.to(q.dtype)
    if centre_values is not None:
        out = out + _inter_branch(q, centres, centre_values, scale)
    return out


def _centres_sample(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        gen = torch.Generator().manual_seed(1)
        values = torch.randn(p.q_heads, 8, p.value_dim, generator=gen).to(device=p.device, dtype=p.dtype)
        return {"centres": _plain_centroids(p, 8), "group_size": min(64, p.kv_len), "centre_values": values}
    m = rng.randint(1, 4)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    params: dict[str, Any] = {"centres": torch.randn(p.q_heads, m, p.head_dim, generator=gen).to(device=p.device, dtype=p.dtype),
                              "group_size": rng.randint(1, p.kv_len + 2)}
    if rng.random() < 0.4:
        params["groups"] = torch.randint(0, m + 1, (p.batch, p.kv_len), generator=gen).to(p.device)
    if rng.random() < 0.5:
        params["centre_values"] = torch.randn(p.q_heads, m, p.value_dim, generator=gen).to(device=p.device, dtype=p.dtype)
    if rng.random() < 0.2:
        params["scale"] = rng.choice((0.05, 0.5, 1.0))
    return params


def _centres_sparsity(p: Problem, share: float) -> dict[str, Any]:
    """Chunks of share * N / 2 sorted tokens (a query sees 2 chunks); share = 1: one chunk, all keys."""
    size = p.kv_len if share >= 1 else max(1, math.ceil(share * p.kv_len / 2))
    return {"centres": _plain_centroids(p, 8), "group_size": size}


TOKEN_CENTRES = register(
    Mechanism(
        name="token_centres",
        family="sparse",
        catalog=("S4",),
        paper="CATANet: Efficient Content-Aware Token Aggregation for Lightweight Image Super-Resolution (Liu et al., CVPR 2025), Sec. 3.2 (TAB: CATA, IASA, IRCA)",
        formula="out_i = sum_{j: r(j) in [g(i) s, g(i) s + 2 s)} softmax_j(scale q_i.k_j) v_j + sum_m softmax_m(scale q_i.c_m) u_m; r = place in the group-sorted order, g(i) = r(i) // s",
        cost="O(N M D) grouping + O(N * 2 group_size * D) intra-group + O(N M D) inter-group; O(N group_size) memory",
        summary="CATANet token aggregation: tokens sorted by nearest shared centre, chunked attention over the sorted sequence, plus attention to the centres",
        patterns=frozenset({"noncausal_self"}),
        params=CENTRES_PARAMS,
        sample_params=_centres_sample,
        check_params=_centres_check_params,
        sparsity_params=_centres_sparsity,
    )
)
TOKEN_CENTRES.add_backend(Backend("reference", _centres_reference, doc="ranks in the group-sorted order, dense chunk mask, masked softmax + centre softmax: the spec", priority=-100, materializes_scores=True))
TOKEN_CENTRES.add_backend(Backend("grouped", _centres_grouped, doc="sorted chunks against their own and the next chunk as one batched softmax (CATANet's IASA), scattered back", priority=30))


def token_centres_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    centres: Tensor,
    group_size: int,
    groups: Optional[Tensor] = None,
    centre_values: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """CATANet token aggregation (catalog S4): attention over the group-sorted sequence, plus the centres.

    Tokens are grouped to their nearest centre (``groups``, or the cosine of each key with
    ``centres``), stably sorted by group and cut into chunks of ``s = group_size``; a query attends
    the keys of its chunk and of the next one in that order (intra-group self-attention). With
    ``centre_values``, every query also attends the M centres (keys ``centres``, values
    ``centre_values``) in a second softmax, added (inter-group cross-attention):

        out_i = sum_{j: r(j) in [s g(i), s g(i) + 2 s)} softmax_j(scale q_i.k_j) v_j + sum_m softmax_m(scale q_i.c_m) u_m

    CATANet pads the sorted sequence to a multiple of s by mirroring its last tokens (copies that
    then appear twice among the last chunks' keys); here the chunks simply end at N.

    Args:
        q, k: (B, H, N, D). v: (B, H, N, Dv). centres: (H, M, D). group_size: s.
        groups: (B, N) integer group per token (shared by the heads), or None.
        centre_values: (H, M, Dv) or None (no inter-group branch). scale: default ``D ** -0.5``.

    Cost: O(N M D + N s D). :class:`attnzoo.nn.TokenCentreAttention` learns the centres (k-means
    iterations and an EMA, decay 0.999, in training) and groups the tokens by its input.
    Paper: Liu et al., "CATANet" (CVPR 2025), Sec. 3.2.
    """
    return TOKEN_CENTRES(q, k, v, backend=backend, centres=centres, group_size=group_size, groups=groups, centre_values=centre_values,
                         key_padding_mask=key_padding_mask, scale=scale)


TOKEN_CENTRES.function = token_centres_attention


# ============================================================================================
# histogram_bins (Histoformer)
# ============================================================================================
# Histoformer (Sun et al., ECCV 2024), Sec. 3.2, dynamic-range histogram self-attention (DHSA):
# the features are sorted by intensity and split into bins; bin-wise histogram reshaping (BHR)
# makes each bin a run of consecutive sorted values, frequency-wise reshaping (FHR) takes every
# bins-th sorted value into one bin (each bin spans the whole range); attention is computed per
# bin arrangement and the outputs are put back in the original order.
def _check_intensity(value: Any, p: Problem) -> Optional[str]:
    if value is not None and not (isinstance(value, Tensor) and value.is_floating_point() and tuple(value.shape) == (p.batch, p.kv_len)
                                  and value.device == p.device):
        return f"None or a floating tensor of shape (B, N) = {(p.batch, p.kv_len)} on {p.device} (each token's intensity)"
    return None


HISTOGRAM_PARAMS = (
    Param("bins", None, "required: number of bins (Histoformer: the layer's heads, 1..8)", positive_int("bins"), (None, 0, -1, 1.5, "4"), "int"),
    choice("mode", ("bin", "frequency"), "bin", "'bin': a bin is a run of N / bins consecutive sorted tokens (BHR); 'frequency': every bins-th sorted token (FHR)"),
    Param("intensity", None, "(B, N) intensity of each token (the sort key, shared by the heads); None: the mean of each head's value vector",
          _check_intensity, ("i", torch.zeros(1), torch.zeros(2, 9, dtype=torch.long)), "Tensor | None"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, N)"),
)


def histogram_labels(v: Tensor, bins: int, mode: str, intensity: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Tensor:
    """(B, H, N) int64 bin of each token: its place r among the real tokens sorted by intensity
    (stable: ties by position; pads after every real token) gives ``r // ceil(n / bins)`` ('bin') or
    ``r % bins`` ('frequency'), n the real tokens of the sequence; pads get -1."""
    b, h, n = v.shape[:3]
    key = intensity.detach().double()[:, None, :].expand(b, h, n) if intensity is not None else v.detach().double().mean(-1)
    order = torch.sort(key, dim=-1, stable=True).indices
    if key_padding_mask is not None:  # pads last, real tokens in their intensity order
        pads = key_padding_mask[:, None, :].expand(b, h, n).gather(-1, order)
        order = order.gather(-1, torch.sort(pads.to(torch.int8), dim=-1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=v.device).expand_as(order))
    real = torch.full((b, 1, 1), n, device=v.device) if key_padding_mask is None else (~key_padding_mask).sum(-1).view(b, 1, 1)
    size = ((real + bins - 1) // bins).clamp(min=1)
    label = rank // size if mode == "bin" else rank % bins
    return label if key_padding_mask is None else label.masked_fill(key_padding_mask[:, None, :], -1)


def _histogram_engine(name: str):
    engine = _LABEL_ENGINES[name]

    def run(q, k, v, *, bins, mode, intensity, key_padding_mask, scale, return_lse):
        labels = histogram_labels(v, bins, mode, intensity, key_padding_mask)
        out, lse = engine(q, k, v, labels, labels, None, key_padding_mask, scale)
        return (out, lse) if return_lse else out

    run.__name__ = f"_histogram_{name}"
    run.__doc__ = "bins from the intensity sort, then " + (engine.__doc__ or "").split("\n")[0]
    return run


def _histogram_sample(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {"bins": 4}
    params: dict[str, Any] = {"bins": rng.randint(1, 6), "mode": rng.choice(("bin", "frequency"))}
    if rng.random() < 0.3:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        params["intensity"] = torch.rand(p.batch, p.kv_len, generator=gen).to(device=p.device, dtype=p.dtype)
    return sample_options(params, p, rng)


HISTOGRAM = register(
    Mechanism(
        name="histogram_bins",
        family="sparse",
        catalog=("S4",),
        paper="Restoring Images in Adverse Weather Conditions via Histogram Transformer (Sun et al., ECCV 2024), Sec. 3.2 (DHSA: BHR and FHR)",
        formula="out_i = sum_{j: bin(j) = bin(i)} softmax_j(scale q_i.k_j) v_j; bin = r // ceil(N / bins) (bin) or r % bins (frequency), r = place in the intensity order",
        cost="O(N log N) sort + O(N^2 D / bins) attention; O(N) memory on the fast backends",
        summary="Histoformer's histogram attention: tokens sorted by intensity, attention within intensity bins (BHR) or strided bins (FHR)",
        patterns=frozenset({"noncausal_self"}),
        params=HISTOGRAM_PARAMS,
        sample_params=_histogram_sample,
        sparsity_params=lambda p, share: {"bins": max(1, round(1 / share))},
    )
)
HISTOGRAM.add_backend(Backend("reference", _histogram_engine("reference"), doc="bins from the intensity sort, dense bin-equality mask over materialized scores: the spec", priority=-100, materializes_scores=True))
HISTOGRAM.add_backend(native_backend("gathered", _histogram_engine("gathered"), "bins from the intensity sort; keys sorted by bin, each query one row over its bin's span on the C++ gathered-rows kernel", priority=40))
HISTOGRAM.add_backend(Backend("grouped", _histogram_engine("grouped"), doc="bins from the intensity sort; one GEMM per bin (PyTorch, any device)", priority=30))


def histogram_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bins: int,
    mode: str = "bin",
    intensity: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Histogram attention (catalog S4; Histoformer's DHSA in token form): attention within intensity bins.

    The tokens are sorted by ``intensity`` (default: the mean of each head's value vector); place r
    in that order puts a token in bin ``r // ceil(N / bins)`` (``mode='bin'``, Histoformer's BHR:
    bins of similar intensity) or ``r % bins`` (``mode='frequency'``, FHR: every bin samples the
    whole range). A query attends the keys of its bin; the output is in the original order.

    Histoformer itself sorts every channel of its value map separately and attends between the
    (channel, bin) rows of the reshaped map (a transposed, Restormer-style attention whose
    "features" are the pixels of a bin, with a learned temperature and exp / (1 + sum exp)); that
    form needs q, k and v of one width and mixes channels, so it does not fit the (B, H, N, D)
    token attention of this library. This mechanism keeps the paper's rule (sort by intensity,
    equal bins, the two bin arrangements, outputs returned in the original order) and applies it to
    tokens: exactly softmax attention under the mask ``bin(i) == bin(j)``.

    Args:
        q, k: (B, H, N, D). v: (B, H, N, Dv). bins: number of bins. mode: 'bin' or 'frequency'.
        intensity: (B, N) sort key shared by the heads, or None. key_padding_mask: (B, N) bool,
        True = pad (exact: bins are cut over the real tokens). scale: default ``D ** -0.5``.

    Cost: O(N log N + N^2 D / bins); the fast backends hold no N x N tensor.
    Paper: Sun et al., "Restoring Images in Adverse Weather Conditions via Histogram Transformer" (2024).
    """
    return HISTOGRAM(q, k, v, backend=backend, bins=bins, mode=mode, intensity=intensity, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


HISTOGRAM.function = histogram_attention
REGION.decoder_refusal = "labels are sized by the sequence, which decoding grows"
KMEANS_ROUTING.decoder_refusal = READS_AHEAD
for _grouped in (REGION, KMEANS_ROUTING, TOKEN_CENTRES, HISTOGRAM):
    _grouped.check_inputs = True  # a key is seen by its group alone: an inf one could vanish
