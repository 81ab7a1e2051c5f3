"""Softplus attention with l1 normalization and a length-dependent scale (catalog V1, LSSA).

    w_ij = softplus(lambda_i * scale * q_i . k_j),   out_i = sum_j w_ij v_j / sum_j w_ij,
    lambda_i = log n_i / log T   (train_length = T given; else lambda = 1)

Gao, Spratling (and Gionfrida), "Softplus Attention with Re-weighting Boosts Length Extrapolation in
Large Language Models" (arXiv 2501.13428): softmax decomposed into a positive non-linearity and an
l1 normalization, the exponential replaced by Softplus (numerically stable: it grows linearly),
the normalization kept, and a dynamic scale factor for the token count from the invariance of the
attention entropy.

What is implemented, and what is not (the paper's equations are not in our sources: its code,
iminfine/freeatten, is not in the store and the paper has five revisions):

* implemented: Softplus, the l1 (row-sum) normalization, and an entropy-invariant length scale
  ``lambda_i = log_T n_i`` (Su 2021's derivation, the "log" law of
  :mod:`.temperature`; ``law="sqrt_log"`` gives Jin et al.'s square-root law instead), ``n_i``
  the real keys query i sees (its prefix when causal), T the training length. With
  ``train_length=None`` the scale is 1 (Softplus + l1 alone).
* not implemented: the paper's second stage, the "re-weighting" that sharpens the weights
  (a power function of the normalized weights, per secondary summaries); its exact form and
  constants could not be sourced. Apply it to :func:`softplus_attention`'s weights in a layer if
  you have them.

Backends: ``reference`` (materialized) and ``chunked`` (keys in chunks of ``CHUNK``: numerator and
row sum accumulate, no running max needed since Softplus does not overflow; a custom backward
recomputes each chunk, so no Nq x Nk tensor in either direction). Cost O(Nq Nk D) time,
O(Nq * CHUNK) memory on chunked.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import masks
from ...kernels.reference import default_scale
from ...registry import PATTERNS, Backend, Mechanism, Param, Problem, choice, positive_number, register
from .._prefix_decoder import PrefixDecoder
from .softcap import allowed_pairs, pattern_params, sample_pattern
from .temperature import LAWS, length_factor

__all__ = ["SOFTPLUS", "softplus_attention", "CHUNK"]

#: Keys per chunk of the ``chunked`` backend.
CHUNK = 1024


def _check_train_length(value: Any, p: Problem) -> Optional[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
        return None
    return "None (no length scale) or an int >= 2 (T: the training length)"


PARAMS = (
    Param("train_length", None, "T of lambda_i = log n_i / log T; None: lambda = 1 (Softplus + l1 alone)", _check_train_length, (1, 0, 2.5, "512", True), "int | None"),
    choice("law", LAWS, "log", "lambda = log n / log T (entropy invariance, default) or sqrt(log n / log T)"),
    *pattern_params(),
    positive_number("scale", "multiplies q.k (before lambda); default head_dim ** -0.5"),
)


def _row_scale(q: Tensor, k: Tensor, *, train_length, law, causal, causal_alignment, key_padding_mask, scale) -> Tensor:
    """(B, 1, Nq, 1) float64: lambda_i * scale, the multiplier of row i's scores."""
    base = default_scale(q, scale)
    if train_length is None:
        return torch.full((q.shape[0], 1, q.shape[2], 1), base, dtype=torch.float64, device=q.device)
    lam = length_factor(q, k, train_length=train_length, law=law, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask)
    return (lam * base)[:, None, :, None]


def _positive(s: Tensor) -> Tensor:
    """softplus(s), NaN where s is not finite (softplus(-inf) = 0 would hide an inf input)."""
    return F.softplus(s) + (s - s)


def _weights(q: Tensor, k: Tensor, **params: Any) -> Tensor:
    """(B, Hq, Nq, Nk): the l1-normalized Softplus weights (rows sum to 1; 0 for masked pairs)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.to(cdt).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q.to(cdt) @ kk.transpose(-1, -2)) * _row_scale(q, k, **params).to(cdt)
    w = _positive(s)
    allowed = allowed_pairs(q, k, params["causal"], params["causal_alignment"], params["key_padding_mask"])
    if allowed is not None:
        w = w.masked_fill(~allowed, 0.0)
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


def _reference(q, k, v, **params):
    """Materialized Softplus scores, masked, divided by their row sum: the spec."""
    w = _weights(q, k, **params)
    return (w @ v.to(w.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)).to(q.dtype)


def _visible(nq: int, nk: int, first: int, count: int, causal: bool, alignment: str, pad: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """(B|1, 1, Nq, count) bool for keys first .. first + count - 1, or None when all are visible."""
    vis = None
    if causal:
        rows = torch.arange(nq, device=device)[:, None] + masks.causal_offset(nq, nk, alignment)
        vis = (torch.arange(first, first + count, device=device)[None, :] <= rows)[None, None]
    if pad is not None:
        keep = ~pad[:, None, None, first : first + count]
        vis = keep if vis is None else vis & keep
    return vis


class _L1Chunked(torch.autograd.Function):
    """out = (sum_j w_ij v_j) / (sum_j w_ij) over key chunks; the backward recomputes each chunk.

    With g = dL/dout and den_i = sum_j w_ij: dL/dw_ij = (g_i . v_j - g_i . out_i) / den_i,
    dL/dv_j = sum_i w_ij g_i / den_i, and ds_ij = dL/dw_ij * sigmoid(s_ij) (the row scale c_i
    then enters dq and dk).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, c: Tensor, causal: bool, alignment: str, pad: Optional[Tensor]) -> Tensor:
        num = q.new_zeros(*q.shape[:3], v.shape[-1])
        den = q.new_zeros(*q.shape[:3], 1)
        for _, _kc, vc, s, vis in _chunks(q, k, v, c, causal, alignment, pad):
            w = _positive(s)
            if vis is not None:
                w = w.masked_fill(~vis, 0.0)
            num += w @ vc
            den += w.sum(-1, keepdim=True)
        den = torch.where(den == 0, torch.ones_like(den), den)
        out = num / den
        ctx.save_for_backward(q, k, v, c, pad, out, den)
        ctx.options = (causal, alignment)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        q, k, v, c, pad, out, den = ctx.saved_tensors
        causal, alignment = ctx.options
        g = grad_out / den
        g_out = (g * out).sum(-1, keepdim=True)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for start, kc, vc, s, vis in _chunks(q, k, v, c, causal, alignment, pad):
            stop = start + kc.shape[2]
            w = F.softplus(s)
            ds = (g @ vc.transpose(-1, -2) - g_out) * torch.sigmoid(s)
            if vis is not None:
                w, ds = w.masked_fill(~vis, 0.0), ds.masked_fill(~vis, 0.0)
            dv[:, :, start:stop] = w.transpose(-1, -2) @ g
            ds = ds * c
            dq += ds @ kc
            dk[:, :, start:stop] = ds.transpose(-1, -2) @ q
        return dq, dk, dv, None, None, None, None


def _chunks(q, k, v, c, causal, alignment, pad):
    """Yield ``(first key, k chunk, v chunk, scores c_i q_i.k_j, visible or None)``."""
    nq, nk = q.shape[2], k.shape[2]
    for start in range(0, nk, CHUNK):
        kc, vc = k[:, :, start : start + CHUNK], v[:, :, start : start + CHUNK]
        yield start, kc, vc, (q @ kc.transpose(-1, -2)) * c, _visible(nq, nk, start, kc.shape[2], causal, alignment, pad, q.device)


def _chunked(q, k, v, **params):
    """Keys in chunks of CHUNK: Softplus numerator and row sum accumulated; custom backward recomputes."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    c = _row_scale(q, k, **params).to(cdt)
    pad = params["key_padding_mask"]
    pad = None if pad is None else pad.reshape(q.shape[0], -1)
    out = _L1Chunked.apply(q.to(cdt), kk.to(cdt), vv.to(cdt), c, params["causal"], params["causal_alignment"], pad)
    return out.to(q.dtype)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params = sample_pattern(p, pattern, rng)
    params.pop("return_lse", None)
    if rng is None:
        return params
    if rng.random() < 0.6:
        params["train_length"] = rng.randint(2, 3 * p.kv_len + 2)
        if rng.random() < 0.3:
            params["law"] = "sqrt_log"
    return params


SOFTPLUS = register(
    Mechanism(
        name="softplus",
        family="variants",
        catalog=("V1",),
        paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models (Gao et al., arXiv 2501.13428): "
              "the first stage (Softplus, l1 normalization, length scale); the re-weighting stage is not implemented",
        formula="out_i = sum_j w_ij v_j / sum_j w_ij, w_ij = softplus(lambda_i scale q_i.k_j), lambda_i = log n_i / log T",
        cost="O(Nq * Nk * D) time; O(Nq * CHUNK) memory on chunked",
        summary="Softplus attention, l1-normalized rows, with an entropy-invariant log n / log T scale (LSSA's first stage)",
        patterns=frozenset(PATTERNS),
        params=PARAMS,
        gqa=True,
        decoder=PrefixDecoder("softplus", "new"),
        sample_params=_sample_params,
        weights=lambda q, k, v, **bound: (_weights(q, k, **bound), True),
    )
)
SOFTPLUS.add_backend(Backend("reference", _reference, doc="materialized Softplus scores over their row sum: the spec", priority=-100, materializes_scores=True))
SOFTPLUS.add_backend(Backend("chunked", _chunked, doc=f"keys in chunks of {CHUNK}, numerator and row sum accumulated; backward recomputes", priority=20))


def softplus_attention(q: Tensor, k: Tensor, v: Tensor, *, train_length: Optional[int] = None, law: str = "log", causal: bool = False,
                       causal_alignment: str = "bottom_right", key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                       backend: Optional[str] = None) -> Tensor:
    """Softplus attention with l1 normalization and a length scale (catalog V1; LSSA's first stage).

    ``w_ij = softplus(lambda_i * scale * q_i . k_j)``, ``out_i = sum_j w_ij v_j / sum_j w_ij``,
    ``lambda_i = log n_i / log T`` (``n_i`` the keys query i sees, ``T = train_length``; 1 when None).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        train_length: T, or None for no length scale. law: ``"log"`` (default) or ``"sqrt_log"``.
        causal, causal_alignment, key_padding_mask: as :func:`attnzoo.softmax_attention`.
        scale: default ``D ** -0.5``.

    The paper's re-weighting (sharpening) stage is not included (see the module docstring).
    Cost: O(Nq Nk D), O(Nq * 1024) memory (``chunked``). Paper: Gao et al., arXiv 2501.13428.

    Example::

        >>> q = k = v = torch.randn(2, 4, 2048, 64)
        >>> out = softplus_attention(q, k, v, train_length=512, causal=True)
    """
    return SOFTPLUS(q, k, v, backend=backend, train_length=train_length, law=law, causal=causal, causal_alignment=causal_alignment,
                    key_padding_mask=key_padding_mask, scale=scale)


SOFTPLUS.function = softplus_attention
