"""Reversed attention (catalog V6): the softmax normalized over the receivers, not the senders.

    P_ij = exp(s_ij) / sum_{i'} exp(s_i'j),   s_ij = scale * q_i . k_j,   out_i = sum_j P_ij v_j

Each key j (a sender, carrying v_j) distributes its message over the queries (the receivers)
with weights that sum to 1 over i: the *columns* of P are distributions, its rows are not.
DependencyViT (Ding et al., "Visual Dependency Transformers: Dependency Tree Emerges from Reversed
Attention", CVPR 2023, Sec. 3.1) computes it as ``softmax(Q K^T, dim=-1)^T V`` for self-attention:
child token c's query attends its parents' keys, and the child sends v_c to its parents
following that distribution. That is this mechanism with the roles of q and k exchanged:
``reversed_attention(k, q, v) == softmax(q k^T)^T v`` (same arithmetic; in a layer the two
projections are learned alike). The layer's head selector and message controller (Sec. 3.2,
per-token gates multiplied into P) belong to a module, not to this mechanism.

Non-causal only: a key's normalizer sums over every query, the later ones too, so no causal
reading exists. ``key_padding_mask`` removes senders; ``query_padding_mask`` removes receivers
(a padded query outputs 0 and takes no share of any key's message). When it is None and
Nq == Nk (self-attention), the key mask marks the queries too: a padded token neither sends nor
receives, so a padded batch equals each sequence alone. Pass an all-False mask to keep every
query of a cross-attention with Nq == Nk.

Backends: ``reference`` (materialized, column softmax) and ``tiled``: two passes of the FA2 engine
(:mod:`attnzoo.kernels.tiled`), no Nq x Nk tensor in either direction. Pass 1 runs the engine on
the transposed problem (queries k, keys q) for each key's log-normalizer ``c_j = logsumexp_i s_ij``;
pass 2 is softmax attention with the bias ``-c_j`` and its row LSE ``l_i``, and since
``P_ij = exp(s_ij - c_j) = softmax_j(s_ij - c_j) * exp(l_i)``, the output is pass 2's times
``exp(l_i)`` (at most Nk: every term ``exp(s_ij - c_j) <= 1``). Gradients flow through both
passes (the engine differentiates its LSE and its bias). Cost: about twice softmax attention,
O(Nq Nk D) time, O(N) memory.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, stable_softmax_lse
from ...kernels.tiled import tiled_attention
from ...registry import Backend, Mechanism, Param, Problem, positive_number, register
from .._padding import key_padding_param, sample_padding

__all__ = ["REVERSED", "reversed_attention"]


def _check_query_padding(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    expected = f"None or a bool tensor of shape (B, Nq) = {(p.batch, p.q_len)} on {p.device} (True = ignore the query)"
    if not isinstance(value, Tensor) or value.dtype != torch.bool or tuple(value.shape) != (p.batch, p.q_len) or value.device != p.device:
        return expected
    return None


PARAMS = (
    key_padding_param(),
    Param("query_padding_mask", None, "(B, Nq) bool, True = a padded receiver (outputs 0); None: the key mask when Nq == Nk, else none",
          _check_query_padding, (torch.zeros(1, dtype=torch.bool), torch.zeros(1, 1)), "Tensor | None"),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
)


def _paddings(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], query_padding_mask: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(key pad (B, Nk), query pad (B, Nq)), each None when nothing is padded."""
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    kpad = None if key_padding_mask is None else key_padding_mask.reshape(b, nk)
    qpad = query_padding_mask
    if qpad is None and kpad is not None and nq == nk:
        qpad = kpad
    return kpad, qpad


def _weights(q: Tensor, k: Tensor, *, key_padding_mask: Optional[Tensor], query_padding_mask: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """(B, Hq, Nq, Nk) P: column-normalized weights, 0 where a key or query is padded."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.to(cdt).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.to(cdt) @ kk.transpose(-1, -2) * default_scale(q, scale)
    kpad, qpad = _paddings(q, k, key_padding_mask, query_padding_mask)
    if kpad is not None:
        s = s.masked_fill(kpad[:, None, None, :], float("-inf"))
    if qpad is not None:
        s = s.masked_fill(qpad[:, None, :, None], float("-inf"))
    p, _ = stable_softmax_lse(s, dim=-2)  # over the queries: each column a distribution
    return p


def _reference(q, k, v, *, key_padding_mask, query_padding_mask, scale):
    """Materialized scores, softmax over the query axis, applied to v: the spec."""
    p = _weights(q, k, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, scale=scale)
    vv = v.to(p.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (p @ vv).to(q.dtype)


def _tiled(q, k, v, *, key_padding_mask, query_padding_mask, scale):
    """Two FA2 passes: the column log-normalizers (transposed problem), then softmax with their bias."""
    kpad, qpad = _paddings(q, k, key_padding_mask, query_padding_mask)
    s = default_scale(q, scale)
    b, hq, nq = q.shape[:3]
    kk = k.repeat_interleave(hq // k.shape[1], dim=1)
    # pass 1: c_j = logsumexp_i s_ij, the LSE of keys attending to the queries (padded queries ignored)
    _, col_lse = tiled_attention(kk, q, q.new_zeros(b, hq, nq, 1), scale=s, key_padding_mask=qpad)
    bias = torch.where(torch.isfinite(col_lse), -col_lse, torch.zeros_like(col_lse)).unsqueeze(2)  # (B, Hq, 1, Nk)
    # pass 2: softmax_j(s_ij - c_j) and its row LSE l_i; P_ij = softmax * exp(l_i)
    out, row_lse = tiled_attention(q, k, v, scale=s, bias=bias, key_padding_mask=kpad)
    out = out * torch.exp(row_lse).unsqueeze(-1).to(out.dtype)
    if qpad is not None:
        out = out.masked_fill(qpad[:, None, :, None], 0.0)
    return out


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if rng is None:
        return params
    pad = sample_padding(p, rng)
    if pad is not None:
        params["key_padding_mask"] = pad
    if rng.random() < 0.3:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        params["query_padding_mask"] = (torch.rand(p.batch, p.q_len, generator=gen) < rng.choice((0.2, 0.6))).to(p.device)
    if rng.random() < 0.3:
        params["scale"] = rng.choice((0.05, 0.5, 1.0))
    return params


REVERSED = register(
    Mechanism(
        name="reversed",
        family="variants",
        catalog=("V6",),
        paper="Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention (Ding et al., CVPR 2023), Sec. 3.1",
        formula="out_i = sum_j (exp(s_ij) / sum_i' exp(s_i'j)) v_j, s_ij = scale q_i.k_j (softmax over the queries)",
        cost="O(Nq * Nk * D) time (two FA2 passes); O(N) memory on tiled",
        summary="reversed attention: each key's softmax over the queries (columns sum to 1), non-causal",
        patterns=frozenset({"noncausal_self", "noncausal_cross"}),
        params=PARAMS,
        gqa=True,
        sample_params=_sample_params,
        decoder_refusal="reversed attention normalizes each key over every query, the later ones too: it has no causal form",
        weights=lambda q, k, v, **bound: (_weights(q, k, **bound), False),
    )
)
REVERSED.add_backend(Backend("reference", _reference, doc="materialized scores, softmax over the query axis: the spec", priority=-100, materializes_scores=True))
REVERSED.add_backend(Backend("tiled", _tiled, doc="two FA2 passes: column LSE on the transposed problem, then softmax with its bias, times exp(row LSE)", priority=20, traceable=False))


def reversed_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None, query_padding_mask: Optional[Tensor] = None,
                       scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """Reversed attention (catalog V6): softmax over the queries, ``out_i = sum_j P_ij v_j``, ``sum_i P_ij = 1``.

    Args:
        q: (B, Hq, Nq, D) receivers. k: (B, Hkv, Nk, D) senders, Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        key_padding_mask: (B, Nk) bool, True = a padded sender. query_padding_mask: (B, Nq) bool,
            True = a padded receiver (outputs 0); None: the key mask when Nq == Nk (self-attention).
        scale: default ``D ** -0.5``.

    DependencyViT's ``softmax(q k^T)^T v`` (self-attention) is ``reversed_attention(k, q, v)``.
    Cost: O(Nq Nk D), O(N) memory (``tiled``). Paper: Ding et al. (CVPR 2023), Sec. 3.1.

    Example::

        >>> q = k = v = torch.randn(2, 6, 196, 64)
        >>> out = reversed_attention(q, k, v)
    """
    return REVERSED(q, k, v, backend=backend, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, scale=scale)


REVERSED.function = reversed_attention
