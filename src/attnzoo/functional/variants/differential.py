"""Differential attention (issue 15; Ye et al., "Differential Transformer", ICLR 2025, Sec. 2.1, Eq. 1).

Each head's query and key are split into two halves of d = D / 2 features; the output is the
difference of the two softmax maps applied to one value:

    out = (softmax(scale q1 k1^T) - lambda * softmax(scale q2 k2^T)) v,   scale = d ** -0.5

``lambda`` is the paper's re-parameterized ``exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init``
(:class:`attnzoo.nn.DifferentialAttention` learns it); here it is a number or one value per query
head. The GroupNorm / RMSNorm of each head and the ``(1 - lambda_init)`` factor of Eq. 3 belong
to the layer. Rows of the difference are not distributions.

Backends: ``reference`` (both maps materialized), ``paired`` (two calls of :func:`attnzoo.softmax_attention`,
which dispatches to SDPA, the fused kernel or the tiled engine: no N x N tensor; gradients through
both). Cost: twice softmax attention at head dim D / 2, O(Nq Nk D).
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels.reference import materialized_attention
from ...registry import PATTERNS, Backend, Mechanism, Param, Problem, choice, flag, get, positive_number, register
from .._padding import key_padding_param, sample_padding
from .._prefix_decoder import PrefixDecoder

__all__ = ["DIFFERENTIAL", "differential_attention"]


def _check_lambda(value: Any, p: Problem) -> Optional[str]:
    want = f"a finite number or a tensor of {p.q_heads} values (one per query head)"
    if isinstance(value, bool):
        return want
    if isinstance(value, (int, float)):
        return None if abs(float(value)) < float("inf") else want
    if isinstance(value, Tensor) and value.is_floating_point() and value.numel() == p.q_heads and bool(torch.isfinite(value).all()):
        return None
    return want


def _check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if p.head_dim % 2:
        return "q", f"the head dim D splits into two halves (q1, q2): expected an even D, got {p.head_dim}"
    return None


PARAMS = (
    Param("lam", 0.8, "lambda: a number or (Hq,) per head (the paper's lambda_init 0.8 deep in the net)", _check_lambda, (float("nan"), "0.5", True, torch.zeros(1, 7)), "float | Tensor"),
    flag("causal", False, "no key after the query"),
    choice("causal_alignment", ("bottom_right", "top_left"), "bottom_right", "when Nq != Nk, where query i sits among the keys"),
    key_padding_param(),
    positive_number("scale", "multiplies q.k of each half; default (D / 2) ** -0.5"),
)


def _lam(lam: Any, q: Tensor) -> Any:
    return lam.to(q.dtype).view(1, -1, 1, 1) if isinstance(lam, Tensor) else lam


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return (q.shape[-1] // 2) ** -0.5 if scale is None else scale


def _allowed(q: Tensor, k: Tensor, causal: bool, alignment: str, key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    nq, nk = q.shape[2], k.shape[2]
    allowed = masks.dense_mask(masks.causal(masks.causal_offset(nq, nk, alignment)), nq, nk, device=q.device) if causal else None
    if key_padding_mask is not None:
        keep = ~key_padding_mask.view(q.shape[0], 1, 1, nk)
        allowed = keep if allowed is None else allowed & keep
    return allowed


def _weights(q: Tensor, k: Tensor, *, lam, causal, causal_alignment, key_padding_mask, scale) -> Tensor:
    """(B, Hq, Nq, Nk): softmax map 1 minus lambda times map 2 (the matrix the output is ``w @ v`` of)."""
    allowed = _allowed(q, k, causal, causal_alignment, key_padding_mask)
    eye = torch.eye(k.shape[2], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    values = eye.expand(k.shape[0], k.shape[1], -1, -1)  # probing with v = I reads the maps
    (q1, q2), (k1, k2) = _halves(q), _halves(k)
    p1, _ = materialized_attention(q1, k1, values.to(q.dtype), scale=_scale(q, scale), allowed=allowed)
    p2, _ = materialized_attention(q2, k2, values.to(q.dtype), scale=_scale(q, scale), allowed=allowed)
    return p1 - _lam(lam, q) * p2


def _reference(q, k, v, *, lam, causal, causal_alignment, key_padding_mask, scale):
    """Both softmax maps materialized, subtracted, applied to v: the spec."""
    allowed = _allowed(q, k, causal, causal_alignment, key_padding_mask)
    (q1, q2), (k1, k2) = _halves(q), _halves(k)
    o1, _ = materialized_attention(q1, k1, v, scale=_scale(q, scale), allowed=allowed)
    o2, _ = materialized_attention(q2, k2, v, scale=_scale(q, scale), allowed=allowed)
    return o1 - _lam(lam, q) * o2


def _paired(q, k, v, *, lam, causal, causal_alignment, key_padding_mask, scale):
    """Two softmax attentions at head dim D / 2 through attnzoo's own dispatch, subtracted."""
    softmax = get("softmax")
    (q1, q2), (k1, k2) = _halves(q), _halves(k)
    common = dict(causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask, scale=_scale(q, scale))
    return softmax(q1, k1, v, **common) - _lam(lam, q) * softmax(q2, k2, v, **common)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    if rng.random() < 0.4:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        params["lam"] = (torch.rand(p.q_heads, generator=gen) * 1.5).to(device=p.device, dtype=p.dtype)
    elif rng.random() < 0.5:
        params["lam"] = rng.uniform(-0.5, 1.5)
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    pad = sample_padding(p, rng)
    if pad is not None:
        params["key_padding_mask"] = pad
    if rng.random() < 0.3:
        params["scale"] = rng.uniform(0.05, 0.5)
    return params


DIFFERENTIAL = register(
    Mechanism(
        name="differential",
        family="variants",
        catalog=(),
        paper="Differential Transformer (Ye et al., ICLR 2025), Sec. 2.1, Eq. 1",
        formula="out = (softmax(scale q1 k1^T) - lambda softmax(scale q2 k2^T)) v, q = [q1, q2], k = [k1, k2] per head",
        cost="O(Nq * Nk * D) time (two softmax attentions at D / 2); O(N) memory on paired",
        summary="differential attention: the difference of two softmax maps (halves of q and k), lambda-weighted, on one value",
        patterns=frozenset(PATTERNS),
        params=PARAMS,
        gqa=True,
        check_params=_check_params,
        sample_params=_sample_params,
        decoder=PrefixDecoder("differential", "new"),
        weights=lambda q, k, v, **bound: (_weights(q, k, **bound), False),
    )
)
DIFFERENTIAL.add_backend(Backend("reference", _reference, doc="both softmax maps materialized and subtracted: the spec", priority=-100, materializes_scores=True))
DIFFERENTIAL.add_backend(Backend("paired", _paired, doc="two softmax attentions at head dim D / 2 (SDPA / fused / tiled by dispatch), subtracted", priority=20))


def differential_attention(q: Tensor, k: Tensor, v: Tensor, *, lam: Any = 0.8, causal: bool = False, causal_alignment: str = "bottom_right",
                           key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """Differential attention: ``(softmax(q1 k1^T s) - lam * softmax(q2 k2^T s)) v`` per head.

    Args:
        q: (B, Hq, Nq, D), D even: the first D / 2 features are q1, the rest q2 (timm's and the
            official layout). k: (B, Hkv, Nk, D) likewise. v: (B, Hkv, Nk, Dv) (the paper's 2d).
        lam: lambda, a number or (Hq,) tensor. causal, causal_alignment, key_padding_mask: as softmax's.
        scale: default ``(D / 2) ** -0.5``.

    Cost: two softmax attentions at head dim D / 2. Paper: Ye et al. (2025), Eq. 1.

    Example::

        >>> q = k = torch.randn(2, 4, 128, 32); v = torch.randn(2, 4, 128, 32)
        >>> out = differential_attention(q, k, v, lam=0.5, causal=True)
    """
    return DIFFERENTIAL(q, k, v, backend=backend, lam=lam, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask, scale=scale)


DIFFERENTIAL.function = differential_attention
