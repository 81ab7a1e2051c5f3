"""LinFusion's normalized non-causal linear attention (catalog F8).

Liu et al., 2024, "LinFusion: 1 GPU, 1 Minute, 16K Image" (official code Huage001/LinFusion,
``src/linfusion/attention.py``, ``GeneralizedLinearAttention``), which replaces the
self-attention layers of a diffusion UNet by::

    out_i = phi(q_i) . ( (1/Nk) sum_j phi(k_j)^T v_j )  /  ( phi(q_i) . (1/Nk) sum_j phi(k_j) + eps )

phi = elu + 1 on the heads of q and k (not scaled), eps = 1e-4 added to the *mean*-normalized
denominator, as the official forward computes ``z = q @ mean(k) + 1e-4`` and
``kv = (k^T / sqrt N) @ (v / sqrt N)``. The generalization of the paper is in how q and k
are made, not in this formula: a small MLP (Linear, LayerNorm, LeakyReLU, Linear) added to the
tokens before the q and k projections, ``q = W_q (x + MLP_q(x))`` -- learnable parts, held by
:class:`attnzoo.nn.LinFusionAttention`. (The paper's text was not reachable when this was
written; everything here follows the official code.)

So the functional form is exactly ``linear`` (F1) with ``scale=1`` and a denominator's
``eps`` multiplied by Nk: what differs, the mean normalization, is written here; the feature
maps (:mod:`.feature_maps`), the normalizer column and the division (:mod:`._shared`) and the
engine's non-causal product ``phi(q) (phi(k)^T [v, 1])`` (:func:`~attnzoo.kernels.linear_scan.chunked_form`)
are reused. The official code divides the key-value sum by the query count (its inputs are
self-attention, Nq = Nk); here both means run over the Nk keys, which is the same for self
attention and stays a weighted average for cross attention. Non-causal only (the official
layer is bidirectional; a causal call is refused: ``causal`` is not a parameter).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.linear_scan import chunked_form, parallel_scores
from ...registry import Backend, Mechanism, Param, Problem, positive_number, register
from ._shared import compute_dtype, divide_by_normalizer, expand_heads, key_padding_param, sample_padding, visible_keys, zero_padded
from .feature_maps import feature_map_check, feature_map_for

__all__ = ["linfusion_attention", "LINFUSION"]

LINFUSION_MAPS = ("elu", "relu")


LINFUSION_PARAMS = (
    Param(
        "feature_map",
        "elu",
        "phi: 'elu' (elu + 1, the official), 'relu', a callable x (B, H, N, D) -> (B, H, N, F) or a pair (phi_q, phi_k)",
        feature_map_check(
            LINFUSION_MAPS, expected="'elu' (elu + 1, the official), 'relu', a callable phi(x) -> non-negative features, or a pair (phi_q, phi_k)"
        ),
        ("identity", 3, ("elu",)),
        "str | callable | (callable, callable)",
    ),
    dataclasses.replace(
        positive_number("eps", "added to the mean-normalized denominator phi(q_i) . mean_j phi(k_j) (the official 1e-4)", optional=False),
        default=1e-4,
    ),
    key_padding_param(
        "(B, Nk) bool, True = ignore that key (torch.nn.MultiheadAttention's convention): padded keys' features are zeroed "
        "and both means run over the real keys (their count per sequence)"
    ),
)


def _features(q: Tensor, k: Tensor, v: Tensor, feature_map: Any, pad: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """phi(q), phi(k) (no scale on q; zero for padded keys) and v, key/value heads repeated, float32 for half inputs."""
    dtype, heads = compute_dtype(q.dtype), q.shape[1]
    q, k, v = q.to(dtype), expand_heads(k, heads).to(dtype), expand_heads(v, heads).to(dtype)
    maps = feature_map_for(feature_map, head_dim=q.shape[-1], scale=1.0, device=q.device)
    return maps.query(q), zero_padded(maps.key(k), pad), v


def _key_count(k: Tensor, pad: Optional[Tensor], like: Tensor) -> Tensor | float:
    """Nk, the count the means divide by: the real keys of each sequence (B, 1, 1, 1) when padded
    (at least 1: a sequence with no real key has zero sums, and outputs 0)."""
    if pad is None:
        return float(k.shape[2])
    return visible_keys(pad, k.shape[2], like).sum(2, keepdim=True).clamp(min=1)


def _reference(q, k, v, *, feature_map, eps, key_padding_mask=None):
    """The weights phi(q_i) . phi(k_j) / Nk materialized; out = weights @ v / (row sum + eps)."""
    fq, fk, values = _features(q, k, v, feature_map, key_padding_mask)
    weights = parallel_scores(fq, fk, causal=False) / _key_count(k, key_padding_mask, fq)
    return (weights @ values / (weights.sum(-1, keepdim=True) + eps)).to(q.dtype)


def _factorized(q, k, v, *, feature_map, eps, key_padding_mask=None):
    """phi(q) (phi(k)^T [v, 1]) / Nk in one product (the 1/Nk rides on the GEMM; on phi(k) per sequence when padded), then the division."""
    fq, fk, values = _features(q, k, v, feature_map, key_padding_mask)
    count = _key_count(k, key_padding_mask, fq)
    if isinstance(count, Tensor):
        fk, count = fk / count, 1.0
    out = chunked_form(fq, fk, values, causal=False, scale=1.0 / count, normalizer=True)
    return divide_by_normalizer(out, eps).to(q.dtype)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {}
    params: dict[str, Any] = {"feature_map": rng.choice(LINFUSION_MAPS + (torch.sigmoid, (torch.sigmoid, torch.exp)))}
    params["key_padding_mask"] = sample_padding(p, rng)
    if params["feature_map"] == "relu":  # relu rows can be all zero: keep a denominator of eps away from 1e-4 rounding
        params["eps"] = 1e-2
    elif rng.random() < 0.3:
        params["eps"] = rng.choice((1e-8, 1e-2))
    return params


LINFUSION = register(
    Mechanism(
        name="linfusion",
        family="linear",
        catalog=("F8",),
        paper="LinFusion: 1 GPU, 1 Minute, 16K Image (Liu et al., 2024), official GeneralizedLinearAttention",
        formula="out_i = phi(q_i) . mean_j phi(k_j)^T v_j / (phi(q_i) . mean_j phi(k_j) + eps), phi = elu + 1",
        cost="O(N F Dv) time, O(N (F + Dv)) memory (factorized); O(Nq Nk) (reference)",
        summary="LinFusion's non-causal linear attention for diffusion: elu + 1 features, mean-normalized denominator; self and cross",
        patterns=frozenset({"noncausal_self", "noncausal_cross"}),
        params=LINFUSION_PARAMS,
        gqa=True,
        exact=True,
        sample_params=_sample_params,
    )
)
LINFUSION.add_backend(Backend("reference", _reference, doc="the weights materialized, divided by their row sum + eps: the spec", priority=-100, materializes_scores=True))
LINFUSION.add_backend(Backend("factorized", _factorized, doc="phi(q) (phi(k)^T [v, 1]) / Nk on the linear engine: O(N F Dv)", priority=50))


def linfusion_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: Any = "elu",
    eps: float = 1e-4,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """LinFusion's normalized non-causal linear attention (Liu et al., 2024; catalog F8).

    ::

        out_i = phi(q_i) . (1/Nk) sum_j phi(k_j)^T v_j  /  (phi(q_i) . (1/Nk) sum_j phi(k_j) + eps)

    phi = elu + 1 (the official), q unscaled; eps sits on the mean-normalized denominator, so it
    weighs the same whatever N is. Equal to ``linear_attention(q, k, v, scale=1.0, eps=eps * Nk)``.
    The learnable MLPs that make q and k are in :class:`attnzoo.nn.LinFusionAttention`.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        feature_map: ``"elu"`` (elu + 1), ``"relu"``, a callable ``phi(x)`` or a pair
            ``(phi_q, phi_k)`` (non-negative features keep the denominator positive).
        eps: added to the mean-normalized denominator (official: 1e-4).
        key_padding_mask: (B, Nk) bool, **True = ignore that key**: its features are zeroed
            and both means run over the real keys, so a padded batch equals each sequence alone
            on its real rows; a sequence with no real key outputs 0.
        backend: force ``factorized`` (default) or ``reference``.

    Returns:
        (B, Hq, Nq, Dv), in the dtype of q (computed in float32 for half inputs).

    Cost: O(N F Dv) time, O(N (F + Dv)) memory on ``factorized``.

    Example::

        >>> q = k = v = torch.randn(2, 8, 4096, 64)      # a 64 x 64 latent, 8 heads
        >>> out = linfusion_attention(q, k, v)
    """
    return LINFUSION(q, k, v, backend=backend, feature_map=feature_map, eps=eps, key_padding_mask=key_padding_mask)


LINFUSION.function = linfusion_attention
