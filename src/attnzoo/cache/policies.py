"""KV-cache eviction rules as pure tensor functions, and budgets per layer and head (K6).

Every rule takes the cached keys ``(B, Hkv, S, D)`` (and, where the rule needs them, queries or
accumulated attention) and returns the **kept indices** ``(B, Hkv, k)``: int64, sorted ascending
within each (batch, kv head), ``k = min(S, budget)``. The transformers caches of
:mod:`attnzoo.cache.transformers` gather keys, values and any per-token state with them
(:func:`gather_kept`); nothing here knows about transformers.

Budgets are a token count (``budget``) or kvpress's ``compression_ratio``: the **fraction
removed**, so ``int(S * (1 - compression_ratio))`` tokens are kept (:func:`resolve_budget`).

Queries are ``(B, Hq, Nq, D)`` with ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h`` reads kv
head ``h // (Hq // Hkv)``, as transformers' ``repeat_kv``). Attention probabilities are computed
in float32 (float64 inputs stay float64), queries aligned bottom-right on the keys (the last
query is the last key, as in a KV cache), scale ``D ** -0.5`` unless given.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ParameterError, ShapeError

__all__ = [
    "resolve_budget",
    "gather_kept",
    "attention_probs",
    "accumulate_attention",
    "streaming_llm",
    "h2o",
    "snapkv_scores",
    "snapkv",
    "tova_scores",
    "tova",
    "key_norm",
    "pyramid_budgets",
    "middle_full_layers",
    "moa_spans",
    "per_head_recent",
    "allocate_head_spans",
]


# --------------------------------------------------------------------------------------------
# budgets and shared helpers
# --------------------------------------------------------------------------------------------
def resolve_budget(length: int, *, budget: Optional[int] = None, compression_ratio: Optional[float] = None) -> int:
    """The number of tokens to keep out of ``length``: ``budget`` or ``int(length * (1 - compression_ratio))``.

    Exactly one of the two is given. ``budget`` is an int >= 1 (a budget >= ``length`` keeps
    everything); ``compression_ratio`` is the fraction removed, in ``[0, 1)`` (kvpress's
    convention), and keeps at least one token.
    """
    check_budget_args(budget, compression_ratio)
    if budget is not None:
        return int(budget)
    return max(1, int(length * (1.0 - compression_ratio)))


def check_budget_args(budget: Optional[int], compression_ratio: Optional[float]) -> None:
    """Raise ParameterError unless exactly one valid budget argument is given."""
    if (budget is None) == (compression_ratio is None):
        raise ParameterError(
            "give exactly one of budget (tokens kept) or compression_ratio (fraction removed, kvpress's convention)",
            argument="budget" if budget is not None else "compression_ratio",
        )
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ParameterError(f"budget: expected an int >= 1 (tokens kept), got {budget!r}", argument="budget")
    else:
        if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)):
            raise ParameterError(
                f"compression_ratio: expected a float in [0, 1) (the fraction removed), got {compression_ratio!r}",
                argument="compression_ratio",
            )
        if not 0.0 <= float(compression_ratio) < 1.0 or math.isnan(compression_ratio):
            raise ParameterError(
                f"compression_ratio: the fraction removed must be in [0, 1), got {compression_ratio!r}",
                argument="compression_ratio",
            )


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(f"{name}: expected an int >= {minimum}, got {value!r}", argument=name)
    return value


def _check_keys(keys: Tensor, name: str = "keys") -> None:
    if not isinstance(keys, Tensor) or keys.ndim != 4:
        raise ShapeError(f"{name}: expected a (B, Hkv, S, D) tensor, got {getattr(keys, 'shape', type(keys))}", argument=name)


def _check_queries(queries: Tensor, keys: Tensor) -> None:
    if not isinstance(queries, Tensor) or queries.ndim != 4:
        raise ShapeError(f"queries: expected a (B, Hq, Nq, D) tensor, got {getattr(queries, 'shape', type(queries))}", argument="queries")
    b, hq, _, d = queries.shape
    if b != keys.shape[0] or d != keys.shape[-1] or hq % keys.shape[1]:
        raise ShapeError(
            f"queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)}: same B and D, Hq a multiple of Hkv",
            argument="queries",
        )


def _all(keys: Tensor) -> Tensor:
    b, h, s, _ = keys.shape
    return torch.arange(s, device=keys.device).expand(b, h, s)


def _top(scores: Tensor, k: int, offset: int = 0) -> Tensor:
    """Indices (+ offset) of the k largest scores along the last axis, sorted ascending."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values + offset


def gather_kept(x: Tensor, kept: Tensor) -> Tensor:
    """``x[b, h, kept[b, h]]``: ``(B, H, S, ...)`` gathered on axis 2 by ``kept`` ``(B, H, k)``."""
    index = kept.view(*kept.shape, *([1] * (x.ndim - 3))).expand(*kept.shape, *x.shape[3:])
    return x.gather(2, index)


def attention_probs(queries: Tensor, keys: Tensor, *, scale: Optional[float] = None, chunk: int = 256):
    """Yield ``(start, probs)`` per block of queries: ``probs = softmax(q k^T * scale)``, ``(B, Hq, n, S)``.

    Causal, bottom-right aligned (query ``i`` of ``Nq`` sees keys ``j <= S - Nq + i``). Blocks of
    ``chunk`` queries bound the memory to O(B Hq chunk S). GQA: ``Hq = G * Hkv``.
    """
    _check_keys(keys)
    _check_queries(queries, keys)
    b, hq, nq, d = queries.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = hq // hkv
    dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if scale is None else scale
    k = keys.to(dtype)
    for start in range(0, nq, chunk):
        q = queries[:, :, start : start + chunk].to(dtype)
        n = q.shape[2]
        logits = torch.einsum("bkgnd,bksd->bkgns", q.view(b, hkv, g, n, d), k).reshape(b, hq, n, s) * scale
        rows = torch.arange(start, start + n, device=keys.device)[:, None] + (s - nq)
        logits = logits.masked_fill(torch.arange(s, device=keys.device)[None, :] > rows, float("-inf"))
        yield start, logits.softmax(dim=-1)


def _group_reduce(x: Tensor, hkv: int, how: str) -> Tensor:
    """(B, Hq, ...) -> (B, Hkv, ...) by summing or averaging each kv head's group of query heads."""
    b, hq = x.shape[:2]
    x = x.reshape(b, hkv, hq // hkv, *x.shape[2:])
    return x.sum(2) if how == "sum" else x.mean(2)


# --------------------------------------------------------------------------------------------
# K2 StreamingLLM
# --------------------------------------------------------------------------------------------
def streaming_llm(keys: Tensor, *, budget: int, n_sink: int = 4) -> Tensor:
    """StreamingLLM's attention sinks + recent window (Xiao et al., "Efficient Streaming Language
    Models with Attention Sinks", ICLR 2024, arXiv 2309.17453, Sec. 3.2 / Fig. 4).

    Keeps the first ``n_sink`` tokens and the last ``budget - n_sink``: ``{0..n_sink-1} ∪
    {S-(budget-n_sink)..S-1}``; everything is kept while ``S <= budget``. The keys' values are not
    read (the rule depends on positions only). ``n_sink < budget`` so that the newest token stays.
    Cost O(B Hkv budget).
    """
    _check_keys(keys)
    budget = _check_int("budget", budget, 1)
    n_sink = _check_int("n_sink", n_sink, 0)
    if n_sink >= budget:
        raise ParameterError(f"n_sink: must be < budget ({budget}) so that recent tokens fit, got {n_sink}", argument="n_sink")
    b, h, s, _ = keys.shape
    if s <= budget:
        return _all(keys)
    idx = torch.cat([torch.arange(n_sink), torch.arange(s - (budget - n_sink), s)]).to(keys.device)
    return idx.expand(b, h, budget)


# --------------------------------------------------------------------------------------------
# K3 H2O
# --------------------------------------------------------------------------------------------
def accumulate_attention(previous: Optional[Tensor], queries: Tensor, keys: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """H2O's accumulated attention: ``previous`` plus this step's column sums, ``(B, Hkv, S)``.

    The step's score of key ``j`` is ``sum_i softmax(q_i K^T)_j`` over the step's queries (causal,
    bottom-right) and over the query heads of its kv head (GQA); the previously cached keys (the
    first ``previous.shape[-1]`` of ``keys``) add it to their running sum, the step's new keys
    start from it (Zhang et al., "H2O: Heavy-Hitter Oracle", NeurIPS 2023, arXiv 2306.14048,
    Sec. 4 / Alg. 1: the accumulated attention score). Cost O(B Hq Nq S D).
    """
    hkv = keys.shape[1]
    total = None
    for _, p in attention_probs(queries, keys, scale=scale):
        part = _group_reduce(p.sum(2), hkv, "sum")
        total = part if total is None else total + part
    if previous is not None:
        total[..., : previous.shape[-1]] += previous.to(total.dtype)
    return total


def h2o(scores: Tensor, *, budget: int, recent: int) -> Tensor:
    """H2O's heavy hitters + recent window (Zhang et al., NeurIPS 2023, arXiv 2306.14048, Alg. 1).

    ``scores`` ``(B, Hkv, S)`` are the accumulated attention (:func:`accumulate_attention`).
    Keeps the last ``recent`` tokens and, among the older ``S - recent``, the ``budget - recent``
    with the largest accumulated score; everything while ``S <= budget``. The caller drops the
    evicted tokens' scores (gather them with the returned indices). Cost O(B Hkv S log S).
    """
    if not isinstance(scores, Tensor) or scores.ndim != 3:
        raise ShapeError(f"scores: expected (B, Hkv, S), got {getattr(scores, 'shape', type(scores))}", argument="scores")
    budget = _check_int("budget", budget, 1)
    recent = _check_int("recent", recent, 0)
    if recent > budget:
        raise ParameterError(f"recent: must be <= budget ({budget}), got {recent}", argument="recent")
    b, h, s = scores.shape
    if s <= budget:
        return torch.arange(s, device=scores.device).expand(b, h, s)
    older = s - recent
    heavy = _top(scores[..., :older], budget - recent)
    tail = torch.arange(older, s, device=scores.device).expand(b, h, recent)
    return torch.cat([heavy, tail], dim=-1)


# --------------------------------------------------------------------------------------------
# K4 SnapKV
# --------------------------------------------------------------------------------------------
def snapkv_scores(keys: Tensor, window_queries: Tensor, *, kernel_size: int = 5, scale: Optional[float] = None) -> Tensor:
    """SnapKV's pooled votes of the observation window for the prefix keys, ``(B, Hkv, S - w)``.

    ``window_queries`` ``(B, Hq, w, D)`` are the last ``w`` queries of the prompt (positions
    ``S-w..S-1``). Each votes with its causal softmax attention; the votes for the prefix keys
    are **summed** over the window, **average-pooled** along the sequence (kernel ``k``, stride 1,
    zero padding ``k // 2`` counted in the mean) and averaged over the query heads of each kv head
    (GQA) (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
    arXiv 2404.14469, Sec. 4.2 Eq. 1-2). Cost O(B Hq w S D).
    """
    _check_keys(keys)
    _check_queries(window_queries, keys)
    kernel_size = _check_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ParameterError(f"kernel_size: expected an odd int (same-length pooling), got {kernel_size}", argument="kernel_size")
    w, s = window_queries.shape[2], keys.shape[2]
    if w >= s:
        raise ShapeError(f"window_queries: the window ({w}) must be shorter than the keys ({s})", argument="window_queries")
    votes = sum(p.sum(2) for _, p in attention_probs(window_queries, keys, scale=scale))[..., : s - w]
    b, hq, n = votes.shape
    pooled = F.avg_pool1d(votes.reshape(b * hq, 1, n), kernel_size, stride=1, padding=kernel_size // 2).reshape(b, hq, n)
    return _group_reduce(pooled, keys.shape[1], "mean")


def snapkv(keys: Tensor, window_queries: Tensor, *, budget: int, kernel_size: int = 5, scale: Optional[float] = None) -> Tensor:
    """SnapKV's selection (arXiv 2404.14469, Alg. 1): the whole observation window plus, per kv
    head, the ``budget - w`` prefix keys with the largest :func:`snapkv_scores`.

    Run once, after the prompt's prefill; everything is kept while ``S <= budget``. ``budget``
    counts the window, so ``budget >= w``. Cost O(B Hq w S D).
    """
    _check_keys(keys)
    budget = _check_int("budget", budget, 1)
    w, s = window_queries.shape[2], keys.shape[2]
    if budget < w:
        raise ParameterError(f"budget: must be >= the observation window ({w}), which is always kept; got {budget}", argument="budget")
    if s <= budget:
        return _all(keys)
    scores = snapkv_scores(keys, window_queries, kernel_size=kernel_size, scale=scale)
    b, h = scores.shape[:2]
    window = torch.arange(s - w, s, device=keys.device).expand(b, h, w)
    return torch.cat([_top(scores, budget - w), window], dim=-1)


# --------------------------------------------------------------------------------------------
# TOVA
# --------------------------------------------------------------------------------------------
def tova_scores(keys: Tensor, last_query: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """TOVA's score: the last query's softmax attention averaged over **all** query heads, ``(B, S)``.

    (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104, Sec. 3.3: one score per
    token shared by every head of the layer.) ``last_query`` ``(B, Hq, 1, D)``. Cost O(B Hq S D).
    """
    _, p = next(attention_probs(last_query[:, :, -1:], keys, scale=scale))
    return p[:, :, 0].mean(1)


def tova(keys: Tensor, last_query: Tensor, *, budget: int, scale: Optional[float] = None) -> Tensor:
    """TOVA's rule (arXiv 2401.06104, Sec. 3.3): keep the ``budget`` tokens with the highest
    :func:`tova_scores`; the same tokens for every kv head. Applied at each step once the cache
    is over budget (one token in, the lowest-scored one out). Cost O(B Hq S D).
    """
    _check_keys(keys)
    budget = _check_int("budget", budget, 1)
    b, h, s, _ = keys.shape
    if s <= budget:
        return _all(keys)
    return _top(tova_scores(keys, last_query, scale=scale), budget)[:, None].expand(b, h, budget)


# --------------------------------------------------------------------------------------------
# key norm
# --------------------------------------------------------------------------------------------
def key_norm(keys: Tensor, *, budget: int) -> Tensor:
    """Keep the ``budget`` keys of lowest L2 norm per kv head (Devoto et al., "A Simple and
    Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024, arXiv 2406.11430:
    low ``||k||`` correlates with high attention). Cost O(B Hkv S D).
    """
    _check_keys(keys)
    budget = _check_int("budget", budget, 1)
    if keys.shape[2] <= budget:
        return _all(keys)
    return _top(-keys.float().norm(dim=-1), budget)


# --------------------------------------------------------------------------------------------
# K6 budgets per layer and per head
# --------------------------------------------------------------------------------------------
def pyramid_budgets(budget: int, num_layers: int, prompt_length: int, *, window: int, beta: int = 20) -> list[int]:
    """PyramidKV's per-layer budgets (Cai et al., arXiv 2406.02069, Sec. 3.2; the rule of its public
    ``pyramidkv_utils.py``): an arithmetic sequence, more keys in the lower layers, the same mean.

    With ``c = budget - window`` prefix keys on average: the top layer keeps ``c // beta``, the
    bottom ``2c - c // beta`` (capped at the ``prompt_length - window`` prefix keys, the cap's excess
    moved to the top), layer ``l`` keeps ``bottom - l * ((bottom - top) // (L - 1))``; each layer's
    budget adds the ``window`` back (the layer's SnapKV observation window, always kept).
    """
    budget = _check_int("budget", budget, 1)
    num_layers = _check_int("num_layers", num_layers, 1)
    window = _check_int("window", window, 0)
    beta = _check_int("beta", beta, 1)
    if budget <= window:
        raise ParameterError(f"budget: must exceed the window ({window}) it includes, got {budget}", argument="budget")
    prefix = budget - window
    low = prefix // beta
    high = 2 * prefix - low
    if high >= prompt_length - window:
        high = prompt_length - window
        low = 2 * prefix - high
    steps = (high - low) // (num_layers - 1) if num_layers > 1 else 0
    return [max(1, high - layer * steps) + window for layer in range(num_layers)]


def middle_full_layers(num_layers: int, fraction: float = 1 / 3) -> list[int]:
    """LongGen's layout (Ge et al., "A Little Goes a Long Way: Efficient Long Context Training and
    Inference with Partial Contexts", arXiv 2410.01485, Sec. 3): the middle ``fraction`` of the
    layers keep full attention (a full KV cache); the others a sink + recent window. At least one
    layer is full; with few layers, the middle one."""
    num_layers = _check_int("num_layers", num_layers, 1)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ParameterError(f"fraction: expected a float in (0, 1], got {fraction!r}", argument="fraction")
    count = max(1, round(num_layers * fraction))
    start = (num_layers - count) // 2
    return list(range(start, start + count))


def moa_spans(length: int, alpha: Tensor, beta: Tensor) -> Tensor:
    """MoA's elastic spans (Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large
    Language Model Compression", arXiv 2406.14909, Sec. 4.1): head ``h`` attends the last
    ``S_h = alpha_h + beta_h * N`` tokens at length ``N``; returns ``(H,)`` int64 spans in ``[1, N]``."""
    length = _check_int("length", length, 1)
    if not isinstance(alpha, Tensor) or not isinstance(beta, Tensor) or alpha.shape != beta.shape or alpha.ndim != 1:
        raise ShapeError("alpha, beta: expected two (H,) tensors of the same shape", argument="alpha")
    return (alpha.double() + beta.double() * length).round().clamp(1, length).long()


def per_head_recent(keys: Tensor, spans: Tensor, *, n_sink: int = 0) -> Tensor:
    """Keep mask ``(B, Hkv, S)`` bool: for kv head ``h`` the first ``n_sink`` keys and the last
    ``spans[h]`` (per-head budgets make the kept sets ragged, so a mask, not indices)."""
    _check_keys(keys)
    n_sink = _check_int("n_sink", n_sink, 0)
    b, h, s, _ = keys.shape
    if not isinstance(spans, Tensor) or spans.shape != (h,):
        raise ShapeError(f"spans: expected ({h},), one span per kv head, got {getattr(spans, 'shape', type(spans))}", argument="spans")
    j = torch.arange(s, device=keys.device)
    keep = (j >= s - spans.to(keys.device)[:, None]) | (j < n_sink)
    return keep.expand(b, h, s)


def allocate_head_spans(captured: Tensor, candidates: Sequence[int], total: int) -> Tensor:
    """Per-head spans under a total budget, chosen by the attention mass each span captures.

    ``captured`` ``(H, C)``: the mass of head ``h``'s attention inside the recent ``candidates[c]``
    keys (non-decreasing in ``c``), measured on calibration prompts. Every head starts at the
    smallest candidate; then the head whose next candidate adds the most mass per extra key grows,
    while the spans' sum stays within ``total``. This is MoA's search (arXiv 2406.14909, Sec. 4.2)
    with captured attention mass standing in for its gradient-based loss estimate: the same
    budgeted per-head choice among candidate spans, a cheaper objective. Returns ``(H,)`` int64.
    """
    if not isinstance(captured, Tensor) or captured.ndim != 2 or captured.shape[1] != len(candidates):
        raise ShapeError(f"captured: expected (H, {len(candidates)}), got {getattr(captured, 'shape', type(captured))}", argument="captured")
    if list(candidates) != sorted(set(candidates)) or not candidates or candidates[0] < 1:
        raise ParameterError(f"candidates: expected increasing positive spans, got {list(candidates)}", argument="candidates")
    h = captured.shape[0]
    total = _check_int("total", total, h * candidates[0])
    choice = [0] * h
    used = h * candidates[0]
    while True:
        best, best_gain = None, 0.0
        for head in range(h):
            c = choice[head]
            if c + 1 < len(candidates) and used + candidates[c + 1] - candidates[c] <= total:
                gain = float(captured[head, c + 1] - captured[head, c]) / (candidates[c + 1] - candidates[c])
                if best is None or gain > best_gain:
                    best, best_gain = head, gain
        if best is None:
            break
        used += candidates[choice[best] + 1] - candidates[choice[best]]
        choice[best] += 1
    return torch.tensor([candidates[c] for c in choice], dtype=torch.int64)
