"""Attention without the softmax normalization (catalog V2): an elementwise activation of each score.

    out_i = sum_{j visible} phi(scale q_i . k_j) v_j          (no division by a row sum)

* ``sigmoid``: ``phi(s) = sigmoid(s + b)`` with the bias ``b = -log n``, n the number of keys
  (Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid Self-Attention", ICLR 2025,
  Sec. 3-4: the bias keeps the initial row mass near 1 and training stable; their code keeps it a
  fixed buffer, so it is a number here, default ``-log n``). Gu et al. ("When Attention Sink
  Emerges in Language Models", ICLR 2025) train it without the bias: no attention sink emerges.
* ``relu``: ``phi(s) = relu(s) / n`` (Wortsman et al., "Replacing softmax with ReLU in Vision
  Transformers", 2023: the 1/L scaling; the ReLU attention "Active-Dormant Attention Heads"
  (Guo et al., 2024) contrasts with softmax's sinks).

``n`` is the number of *real* keys of each sequence (key padding excluded), so a padded batch
equals each sequence run alone; ``length=`` fixes it instead (decoding needs it fixed: the full
forward's default depends on the total length, which a decoder does not know yet).

Rows are not distributions (no LSE). Backends: ``reference`` (materialized scores), ``chunked``
(keys in chunks of ``CHUNK``: rows need no normalizer, so the chunks' outputs simply add; the
backward recomputes each chunk's scores, O(N * CHUNK) memory in both directions, no N x N).
Cost O(Nq Nk D) time.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels.reference import default_scale
from ...registry import PATTERNS, Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from .._padding import key_padding_param, sample_padding
from .._prefix_decoder import PrefixDecoder

__all__ = ["SIGMOID", "RELU", "sigmoid_attention", "relu_attention", "CHUNK"]

#: Keys per chunk of the ``chunked`` backend (memory O(Nq * CHUNK) per (batch, head)).
CHUNK = 1024


def _finite_number(value: Any, p: Problem) -> Optional[str]:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return None
    return "None or a finite number"


def _positive_length(value: Any, p: Problem) -> Optional[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return "None or a positive int (the n of the formula)"


COMMON_PARAMS = (
    Param("length", None, "n of the formula; None: each sequence's real key count", _positive_length, (0, -3, 2.5, "8"), "int | None"),
    flag("causal", False, "no key after the query"),
    choice("causal_alignment", ("bottom_right", "top_left"), "bottom_right", "when Nq != Nk, where query i sits among the keys"),
    key_padding_param(),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
)
SIGMOID_PARAMS = (Param("bias", None, "b of sigmoid(s + b); None: -log n", _finite_number, (float("nan"), float("inf"), "0", True), "float | None"), *COMMON_PARAMS)
RELU_PARAMS = COMMON_PARAMS


# --------------------------------------------------------------------------------------------
# the activations: phi(s) and phi'(s) with the per-sequence n
# --------------------------------------------------------------------------------------------
def _real_keys(k: Tensor, key_padding_mask: Optional[Tensor], length: Optional[int]) -> Tensor:
    """(B, 1, 1, 1) float64: n of each sequence."""
    b, nk = k.shape[0], k.shape[2]
    if length is not None:
        n = torch.full((b,), float(length), dtype=torch.float64, device=k.device)
    elif key_padding_mask is None:
        n = torch.full((b,), float(nk), dtype=torch.float64, device=k.device)
    else:
        n = (~key_padding_mask.reshape(b, -1)).sum(-1).double().clamp(min=1)
    return n.view(b, 1, 1, 1)


def _carry_non_finite(w: Tensor, s: Tensor) -> Tensor:
    """``w`` with NaN wherever the score is not finite: sigmoid(+-inf) and relu(-inf) are finite,
    which would let an inf input vanish silently (the finite check reads the output)."""
    return w + (s - s)


def _sigmoid(s: Tensor, n: Tensor, bias: Optional[float]) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    b = -torch.log(n).to(s.dtype) if bias is None else bias
    w = torch.sigmoid(s + b)
    return _carry_non_finite(w, s), lambda grad_w: grad_w * w * (1 - w)


def _relu(s: Tensor, n: Tensor, bias: Optional[float]) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    inv_n = (1 / n).to(s.dtype)
    return _carry_non_finite(torch.relu(s) * inv_n, s), lambda grad_w: grad_w * (s > 0).to(s.dtype) * inv_n


ACTIVATIONS = {"sigmoid": _sigmoid, "relu": _relu}


def _visible(q_len: int, kv_len: int, first: int, count: int, causal: bool, alignment: str, pad: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """(B|1, 1, Nq, count) bool for keys ``first .. first + count - 1``, or None when all are visible."""
    parts = []
    if causal:
        rows = torch.arange(q_len, device=device)[:, None] + masks.causal_offset(q_len, kv_len, alignment)
        parts.append((torch.arange(first, first + count, device=device)[None, :] <= rows)[None, None])
    if pad is not None:
        parts.append(~pad[:, None, None, first : first + count])
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] & parts[1]


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    group = q.shape[1] // k.shape[1]
    return (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


def _weights(activation: str, q: Tensor, k: Tensor, *, bias: Optional[float] = None, length: Optional[int], causal: bool, causal_alignment: str,
             key_padding_mask: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """(B, Hq, Nq, Nk) phi of every score, 0 where the pair is masked (the matrix the output is ``w @ v`` of)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.to(cdt).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.to(cdt) @ kk.transpose(-1, -2) * default_scale(q, scale)
    w, _ = ACTIVATIONS[activation](s, _real_keys(k, key_padding_mask, length), bias)
    pad = None if key_padding_mask is None else key_padding_mask.reshape(q.shape[0], -1)
    visible = _visible(q.shape[2], k.shape[2], 0, k.shape[2], causal, causal_alignment, pad, q.device)
    return w if visible is None else w.masked_fill(~visible, 0.0)


def _reference(activation: str):
    def run(q, k, v, *, bias=None, **params):
        w = _weights(activation, q, k, bias=bias, **params)
        return (w @ v.to(w.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)).to(q.dtype)

    run.__name__ = f"_{activation}_reference"
    return run


class _Chunked(torch.autograd.Function):
    """Forward and backward over key chunks; the backward recomputes each chunk's scores."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, activation: str, bias: Optional[float], n: Tensor, scale: float, causal: bool, alignment: str, pad: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(q, k, v, n, pad)
        ctx.options = (activation, bias, scale, causal, alignment)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        for _, _kc, vc, (w, _dphi) in _chunk_weights(q, k, v, activation, bias, n, scale, causal, alignment, pad):
            out += w @ vc
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        q, k, v, n, pad = ctx.saved_tensors
        activation, bias, scale, causal, alignment = ctx.options
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for start, kc, vc, (w, dphi) in _chunk_weights(q, k, v, activation, bias, n, scale, causal, alignment, pad):
            stop = start + kc.shape[2]
            dv[:, :, start:stop] = w.transpose(-1, -2) @ grad_out
            ds = dphi(grad_out @ vc.transpose(-1, -2)) * scale
            dq += ds @ kc
            dk[:, :, start:stop] = ds.transpose(-1, -2) @ q
        return dq, dk, dv, None, None, None, None, None, None, None


def _chunk_weights(q, k, v, activation, bias, n, scale, causal, alignment, pad):
    """Yield ``(first key, k chunk, v chunk, (w, dphi))`` with masked pairs' weights and gradients 0."""
    nq, nk = q.shape[2], k.shape[2]
    for start in range(0, nk, CHUNK):
        kc, vc = k[:, :, start : start + CHUNK], v[:, :, start : start + CHUNK]
        w, dphi = ACTIVATIONS[activation](q @ kc.transpose(-1, -2) * scale, n, bias)
        visible = _visible(nq, nk, start, kc.shape[2], causal, alignment, pad, q.device)
        if visible is not None:
            w, dphi = w.masked_fill(~visible, 0.0), _masked(dphi, visible)
        yield start, kc, vc, (w, dphi)


def _masked(dphi: Callable[[Tensor], Tensor], visible: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda grad_w: dphi(grad_w).masked_fill(~visible, 0.0)


def _chunked(activation: str):
    def run(q, k, v, *, length, causal, causal_alignment, key_padding_mask, scale, bias=None):
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        kk, vv = _heads(q, k, v)
        n = _real_keys(k, key_padding_mask, length)
        pad = None if key_padding_mask is None else key_padding_mask.reshape(q.shape[0], -1)
        out = _Chunked.apply(q.to(cdt), kk.to(cdt), vv.to(cdt), activation, bias, n, float(default_scale(q, scale)), causal, causal_alignment, pad)
        return out.to(q.dtype)

    run.__name__ = f"_{activation}_chunked"
    return run


#: Decoding (a KV cache, :class:`.._prefix_decoder.PrefixDecoder`) needs n fixed: the forward's
#: default n, the keys of the call, changes with every step.
_DECODING_NEEDS = {"length": "decoding needs a fixed n (e.g. the full sequence length); the forward's default is its key count"}


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:  # plain; causal ones fix n, which decoding needs (and equals the default here)
        return {**params, "length": p.kv_len} if params["causal"] else params
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    if params["causal"] or rng.random() < 0.3:  # (always when causal: decoding needs it)
        params["length"] = rng.randint(1, 3 * p.kv_len)
    pad = sample_padding(p, rng)
    if pad is not None:
        params["key_padding_mask"] = pad
    if rng.random() < 0.3:
        params["scale"] = rng.uniform(0.05, 0.5)
    return params


def _register(name: str, params: tuple[Param, ...], paper: str, formula: str, summary: str) -> Mechanism:
    mech = register(
        Mechanism(
            name=name,
            family="variants",
            catalog=("V2",),
            paper=paper,
            formula=formula,
            cost="O(Nq * Nk * D) time; O(Nq * CHUNK) memory on chunked",
            summary=summary,
            patterns=frozenset(PATTERNS),
            params=params,
            gqa=True,
            decoder=PrefixDecoder(name, "new", required=_DECODING_NEEDS),
            sample_params=_sample_params,
            weights=lambda q, k, v, **bound: (_weights(name, q, k, **bound), False),
        )
    )
    mech.add_backend(Backend("reference", _reference(name), doc="materialized scores, the activation, masked pairs 0: the spec", priority=-100))
    mech.add_backend(Backend("chunked", _chunked(name), doc=f"keys in chunks of {CHUNK}, outputs summed (no normalizer); backward recomputes each chunk", priority=20))
    return mech


SIGMOID = _register(
    "sigmoid",
    SIGMOID_PARAMS,
    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention (Ramapuram et al., ICLR 2025), Sec. 3-4; When Attention Sink Emerges in Language Models (Gu et al., ICLR 2025)",
    "out_i = sum_j sigmoid(scale q_i.k_j + b) v_j, b = -log n",
    "sigmoid attention: each score through sigmoid(s - log n), rows not normalized (no attention sink)",
)
RELU = _register(
    "relu",
    RELU_PARAMS,
    "Replacing softmax with ReLU in Vision Transformers (Wortsman et al., 2023); Active-Dormant Attention Heads (Guo et al., 2024)",
    "out_i = sum_j relu(scale q_i.k_j) / n v_j",
    "ReLU attention: relu(score) / n, rows not normalized",
)


def sigmoid_attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Optional[float] = None, length: Optional[int] = None, causal: bool = False,
                      causal_alignment: str = "bottom_right", key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                      backend: Optional[str] = None) -> Tensor:
    """Sigmoid attention (catalog V2): ``out_i = sum_j sigmoid(scale q_i . k_j + b) v_j``, no row normalization.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        bias: b; None: ``-log n`` (Ramapuram et al.'s choice). length: n; None: each sequence's real keys.
        causal, causal_alignment: no key after the query (bottom-right by default when Nq != Nk).
        key_padding_mask: (B, Nk) bool, True = ignore the key. scale: default ``D ** -0.5``.

    Cost: O(Nq Nk D) time, O(Nq * 1024) memory (``chunked``). Paper: Ramapuram et al. (ICLR 2025), Sec. 3-4.

    Example::

        >>> q = k = v = torch.randn(2, 4, 256, 64)
        >>> out = sigmoid_attention(q, k, v, causal=True)
    """
    return SIGMOID(q, k, v, backend=backend, bias=bias, length=length, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask, scale=scale)


def relu_attention(q: Tensor, k: Tensor, v: Tensor, *, length: Optional[int] = None, causal: bool = False, causal_alignment: str = "bottom_right",
                   key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """ReLU attention (catalog V2): ``out_i = sum_j relu(scale q_i . k_j) / n v_j``, no row normalization.

    Args as :func:`sigmoid_attention` (no bias). Paper: Wortsman et al. (2023), Sec. 2 (the 1/L scale).

    Example::

        >>> out = relu_attention(q, k, v)
    """
    return RELU(q, k, v, backend=backend, length=length, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask, scale=scale)


SIGMOID.function = sigmoid_attention
RELU.function = relu_attention
