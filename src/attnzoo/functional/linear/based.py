"""Based: linear attention with the 2nd-order Taylor map of exp (catalog F5).

    a_ij  = s q_i[:d] . k_j[:d]                       (d = feature_dim, s = scale, default d^-0.5)
    w_ij  = 1 + a_ij + a_ij^2 / 2                      (exp(a_ij) to second order; w_ij >= 1/2)
    out_i = sum_(j visible) w_ij v_j  /  (sum_(j visible) w_ij + eps)

(the denominator only with ``normalize``), visible = the keys up to the query's position with
``causal`` (the default; bottom-right aligned when Nq != Nk) or every key. Arora et al. (2024),
"Simple linear attention language models balance the recall-throughput tradeoff", Sec. 4: the
Taylor feature map ``phi(x) = [1, x, x (x) x / sqrt 2]`` makes ``phi(s q) . phi(k) = w`` exactly,
so the sum is a linear-attention state of ``1 + d + d(d+1)/2`` features (the symmetric square
keeps d(d+1)/2 of the d^2 products) times ``Dv + 1`` values. The feature dimension d is the
state-size knob the paper turns (with the window of the sliding-window layers) to trace its
recall/memory frontier. Only the paper's abstract was reachable here: the section number is
from memory, and the formula is checked against the official code (the tests write it out).
Defaults follow the official code (HazyResearch/based ``TaylorExp``, zoology's ``Based``) and
flash-linear-attention's ``naive_parallel_based``: d = 16, scale d^-0.5, normalized, eps 1e-6.

q and k: Based's layer projects them to d channels per head and passes those (D = d). Wider
q, k (D > d) are accepted: their first d channels are expanded and the others are not read,
which is how the benchmark runs Based's d = 16 state on D = 64 heads. ``feature_dim=None``
expands all D channels (F grows as D^2 / 2: 2145 features at D = 64).

This is ``linear`` with ``feature_map="taylor"`` and Based's defaults (scale d^-0.5 rather than
D^-0.5, causal): its operands are linear's, on the same engine
(:mod:`attnzoo.kernels.linear_scan`). Backends: ``reference`` (the weights w materialized from
q . k directly, the spec: O(Nq Nk d)), ``chunked`` (Lightning Attention-2 tiling over the
Taylor features, O(N (L F + F Dv)), the default) and ``recurrent``. Decoding keeps the state,
F x (Dv + 1) numbers per head (153 x (Dv + 1) at d = 16), not a cache. The sliding-window and
short-convolution layers Based interleaves with this one are modules:
:mod:`attnzoo.nn.linear.based`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional

from torch import Tensor

from ...kernels.linear_scan import decay_weights
from ...registry import PATTERNS, Backend, Mechanism, Param, Problem, flag, positive_number, register
from ._shared import (
    Operands,
    ScanDecoder,
    add_form_backends,
    chunk_size_param,
    compute_dtype,
    expand_heads,
    is_int,
    key_padding_param,
    padded_keys,
    sample_padding,
    visible_keys,
)
from .feature_maps import MAP_PARAMETERS, taylor_feature_count
# based is linear with a fixed map (taylor), so it reuses linear's operands, finish and fused forward
from .linear import linear_finish, linear_fused, linear_operands

__all__ = ["based_attention", "BASED", "DEFAULT_FEATURE_DIM"]

#: Based's feature dimension (its language models and fla's layer use 16).
DEFAULT_FEATURE_DIM = 16


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _check_feature_dim(value: Any, p: Problem) -> Optional[str]:
    if value is None or (is_int(value) and 1 <= value <= p.head_dim):
        return None
    return f"None (all D channels) or an int in [1, D={p.head_dim}] (q and k give their first feature_dim channels)"


BASED_PARAMS = (
    Param(
        "feature_dim",
        DEFAULT_FEATURE_DIM,
        "d: the Taylor map expands the first d channels of q and k, F = 1 + d + d(d+1)/2 features (None: all D)",
        _check_feature_dim,
        (0, -1, 2.5, "16", 10**9),
        "int | None",
    ),
    flag("normalize", True, "divide by sum_j w_ij (+ eps), as Based and fla (use_norm=True); False: the bare sum"),
    flag("causal", True, "each query sees the keys up to its position (bottom-right when Nq != Nk); False: every key"),
    dataclasses.replace(
        positive_number("eps", "added to the denominator (normalize=True); fla's naive_parallel_based uses 1e-6", optional=False),
        default=1e-6,
    ),
    positive_number("scale", "multiplies q . k inside the Taylor map; default feature_dim ** -0.5 (Based's exp(q.k / sqrt d))"),
    key_padding_param(),
    chunk_size_param(),
)
_DEFAULTS = {p.name: p.default for p in BASED_PARAMS}


def _feature_dim(params: dict, head_dim: int) -> int:
    return params["feature_dim"] or head_dim


def _scale(params: dict, head_dim: int) -> float:
    return params["scale"] or _feature_dim(params, head_dim) ** -0.5


# --------------------------------------------------------------------------------------------
# operands and output: linear's, with the Taylor map and Based's scale
# --------------------------------------------------------------------------------------------
_NO_MAP_PARAMETERS = {name: None for names in MAP_PARAMETERS.values() for name in names}


def _as_linear(params: dict, head_dim: int) -> dict:
    """These parameters as ``linear``'s: feature_map="taylor" over d channels, scale d^-0.5 resolved."""
    return {
        **params,
        **_NO_MAP_PARAMETERS,
        "feature_map": "taylor",
        "feature_dim": _feature_dim(params, head_dim),
        "scale": _scale(params, head_dim),
    }


def _operands(q: Tensor, k: Tensor, v: Tensor, params: dict) -> Operands:
    return linear_operands(q, k, v, _as_linear(params, q.shape[-1]))


def _finish(out: Tensor, params: dict, nq: int, nk: int) -> Tensor:
    return linear_finish(out, params, nq, nk)


def _fused(q: Tensor, k: Tensor, v: Tensor, params: dict) -> Optional[Tensor]:
    return linear_fused(q, k, v, _as_linear(params, q.shape[-1]))


# --------------------------------------------------------------------------------------------
# reference: the weights 1 + a + a^2/2 materialized, no feature map
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, **params):
    """w = 1 + a + a^2 / 2 with a = s q[:d] k[:d]^T, future keys zeroed, times v (over its row sum)."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    heads, d, s = q.shape[1], _feature_dim(params, q.shape[-1]), _scale(params, q.shape[-1])
    q, k, v = q[..., :d].to(dtype), expand_heads(k, heads)[..., :d].to(dtype), expand_heads(v, heads).to(dtype)
    a = s * (q @ k.transpose(-1, -2))
    weights = 1 + a + a * a / 2
    visible = decay_weights(q.shape[2], k.shape[2], causal=params["causal"], log_decay=None, like=weights)
    if visible is not None:
        weights = weights * visible
    if padded_keys(params) is not None:  # w_ij >= 1/2 everywhere: a padded key's weight is set to 0
        weights = weights * visible_keys(padded_keys(params), k.shape[2], weights).transpose(-1, -2)
    out = weights @ v
    if params["normalize"]:
        out = out / (weights.sum(-1, keepdim=True) + params["eps"])
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark; state size
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    """Based's d = 16 (the head dim when smaller) without ``rng``; with it, d, scale, eps, normalize, chunks."""
    params: dict[str, Any] = {"causal": pattern.startswith("causal"), "feature_dim": min(DEFAULT_FEATURE_DIM, p.head_dim)}
    if rng is None:
        return params
    params["feature_dim"] = rng.choice((1, 2, min(8, p.head_dim), min(DEFAULT_FEATURE_DIM, p.head_dim)))
    params["normalize"] = rng.random() < 0.7
    if rng.random() < 0.3:  # a bare sum's rounding grows with its terms: larger scales only when normalized
        params["scale"] = rng.choice((0.1, 0.5, 1.0) if params["normalize"] else (0.02, 0.1))
    if rng.random() < 0.2:
        params["eps"] = rng.choice((1e-12, 1e-3))
    params["chunk_size"] = rng.choice((1, 2, 3, 7, 16, 64))
    params["key_padding_mask"] = sample_padding(p, rng)
    return params


def _state_size(head_dim: int, value_dim: Optional[int] = None, **params: Any) -> int:
    """(1 + d + d(d+1)/2) x (Dv + 1) per head (x Dv without normalize); d = feature_dim (None: D)."""
    bound = {**_DEFAULTS, **params}
    features = taylor_feature_count(_feature_dim(bound, head_dim))
    return features * ((head_dim if value_dim is None else value_dim) + (1 if bound["normalize"] else 0))


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
BASED = register(
    Mechanism(
        name="based",
        family="linear",
        catalog=("F5",),
        paper="Simple linear attention language models balance the recall-throughput tradeoff (Based; Arora et al., 2024)",
        formula="out_i = sum_(j visible) (1 + a_ij + a_ij^2 / 2) v_j / (sum_(j visible) (1 + a_ij + a_ij^2 / 2) + eps),  a_ij = s q_i[:d] . k_j[:d]",
        cost="O(N (L F + F Dv)) time, F = 1 + d + d(d+1)/2 (chunked, L = chunk_size); O(Nq Nk (d + Dv)) (reference)",
        summary="Based's Taylor linear attention: exp(q.k) to second order over d = feature_dim channels, a state of F x (Dv + 1)",
        patterns=frozenset(PATTERNS),
        params=BASED_PARAMS,
        gqa=True,
        exact=True,  # its own formula, exactly; its distance to softmax is what `attnzoo bench error` measures
        decoder=ScanDecoder("based", _operands, _finish),
        sample_params=_sample_params,
        state_size=_state_size,
    )
)
BASED.add_backend(Backend("reference", _reference, doc="w = 1 + a + a^2/2 materialized from q . k: the spec", priority=-100, materializes_scores=True))
add_form_backends(BASED, _operands, _finish, _fused)


def based_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_dim: Optional[int] = DEFAULT_FEATURE_DIM,
    normalize: bool = True,
    causal: bool = True,
    eps: float = 1e-6,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    chunk_size: int = 64,
    backend: Optional[str] = None,
) -> Tensor:
    """Based's Taylor linear attention (catalog F5).

    ::

        a_ij = s q_i[:d] . k_j[:d],    w_ij = 1 + a_ij + a_ij^2 / 2
        out_i = sum_(j <= i) w_ij v_j / (sum_(j <= i) w_ij + eps)

    (every j with ``causal=False``; the denominator only with ``normalize``): linear attention
    with the feature map ``phi(x) = [1, x, x (x) x / sqrt 2]`` of the first d channels, the
    second-order Taylor expansion of exp(s q . k). Arora et al. (2024), Sec. 4; defaults are
    flash-linear-attention's ``naive_parallel_based`` (d = 16, s = d^-0.5, normalized, eps 1e-6).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
            Based projects q and k to d channels per head (D = d); with D > d the first d
            channels are used.
        feature_dim: d, the state-size knob (F = 1 + d + d(d+1)/2 features); None: d = D.
        normalize: divide by the row sum of w (+ ``eps``).
        causal: each query sees the keys up to its position (default), bottom-right aligned.
        scale: s, default d^-0.5.
        key_padding_mask: (B, Nk) bool, **True = ignore that key**: its weight w_ij is 0 (its
            Taylor features zeroed), so a padded batch equals each sequence alone on its real
            rows; a query that sees no real key outputs 0.
        chunk_size: tokens per chunk of the ``chunked`` backend (need not divide N).
        backend: force ``chunked`` (default), ``reference`` or ``recurrent``.

    Returns:
        (B, Hq, Nq, Dv), in the dtype of q (computed in float32 for half inputs).

    Cost: O(N (L F + F Dv)) time on ``chunked`` (F = 153 at d = 16); decoding
    (``attnzoo.get("based").init_state``/``step``, causal) keeps F x (Dv + 1) numbers per head
    whatever the context length (``attnzoo.get("based").state_size(D, ...)``).

    Example::

        >>> q = k = torch.randn(1, 8, 16384, 16); v = torch.randn(1, 8, 16384, 64)
        >>> out = based_attention(q, k, v)                           # causal, d = 16
        >>> out = based_attention(q, k, v, feature_dim=8)            # a smaller state
    """
    return BASED(
        q,
        k,
        v,
        backend=backend,
        feature_dim=feature_dim,
        normalize=normalize,
        causal=causal,
        eps=eps,
        scale=scale,
        key_padding_mask=key_padding_mask,
        chunk_size=chunk_size,
    )


BASED.function = based_attention
