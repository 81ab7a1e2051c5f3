"""Retention: linear attention with a fixed per-head decay (catalog F2; chunked form F3).

    causal (default):  out_i = sum_(j <= i) gamma_h^(i-j) (s q_i . k_j) v_j
    bidirectional:     out_i = sum_j        gamma_h^|i-j| (s q_i . k_j) v_j

RetNet's retention (Sun et al., 2023, Sec. 2.1: parallel form eq. 5, recurrent eq. 6, chunkwise
eq. 7) with the decays of its multi-scale retention, ``gamma_h = 1 - 2^(-5-h)`` (Sec. 2.2), and
``s = D^-0.5``: by default exactly what flash-linear-attention's ``naive_retention`` computes.
Causal queries are bottom-right aligned when Nq != Nk (decoding). ``causal=False`` is the
bidirectional decay ``gamma^|i-j|`` for vision token sequences (vision retention, ViR:
Hatamizadeh et al., 2023), a causal pass plus a reversed one that skips the diagonal.

RetNet's normalizations (Sec. 2.2, "retention score normalization"), as options; both are
exact in all three forms:

* ``normalize_decay``: ``D_ij <- D_ij / sqrt(sum_j D_ij)``, a per-row factor in closed form;
* ``normalize_scores``: ``R_ij <- R_ij / max(|sum_j R_ij|, 1)`` with ``R = (s Q K^T) * D``; the
  row sum is one more column of the values in the chunked and recurrent forms. RetNet's code
  detaches the denominator; here it is differentiated (the gradient of what is computed).
  The GroupNorm RetNet applies after retention is the module's, not this function's.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...errors import ParameterError
from ...kernels.linear_scan import chunked_form, decay_row_sums, decay_weights, fused_causal_forward
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from ._shared import (
    Operands,
    ScanDecoder,
    add_form_backends,
    chunk_size_param,
    compute_dtype,
    expand_heads,
    key_padding_param,
    padded_keys,
    sample_padding,
    visible_keys,
    zero_padded,
)

__all__ = ["retention", "RETENTION", "retnet_gamma"]


def retnet_gamma(heads: int) -> list[float]:
    """RetNet's per-head decays ``1 - 2^(-5-h)``, h = 0..H-1 (Sun et al., 2023, Sec. 2.2)."""
    return [1.0 - 2.0 ** (-5 - h) for h in range(heads)]


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _is_decay(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and 0 < float(x) <= 1


def _check_gamma(value: Any, p: Problem) -> Optional[str]:
    expected = f"None (RetNet's 1 - 2^(-5-h)), a float in (0, 1], or {p.q_heads} of them (one per query head, a sequence or a 1-D tensor)"
    if value is None or _is_decay(value):
        return None
    if isinstance(value, Tensor):
        if value.requires_grad:
            return expected + " that does not require grad (retention's decays are fixed; detach it)"
        if value.dim() != 1 or value.numel() != p.q_heads or not value.is_floating_point():
            return expected
        return None if bool(((value > 0) & (value <= 1)).all()) else expected
    if isinstance(value, (tuple, list)) and len(value) == p.q_heads and all(_is_decay(g) for g in value):
        return None
    return expected


def _check_combination(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if not bound["causal"] and p.q_len != p.kv_len:
        return "causal", f"the bidirectional decay gamma^|i-j| needs as many queries as keys, got {p.q_len} and {p.kv_len}"
    return None


RETENTION_PARAMS = (
    Param(
        "gamma",
        None,
        "per-head decay in (0, 1]: None (RetNet's 1 - 2^(-5-h)), one float for every head, or one per head",
        _check_gamma,
        (0.0, 1.5, float("nan"), "0.9", (0.9, 0.9, 0.9), torch.full((2, 2), 0.9)),
        "float | sequence | Tensor | None",
    ),
    flag("causal", True, "decay gamma^(i-j) over earlier keys (default, as RetNet); False: gamma^|i-j| both ways"),
    positive_number("scale", "multiplies q; default head_dim ** -0.5"),
    flag("normalize_decay", False, "RetNet's D_ij / sqrt(sum_j D_ij)"),
    flag("normalize_scores", False, "RetNet's R_ij / max(|sum_j R_ij|, 1)"),
    key_padding_param(
        "(B, Nk) bool, True = ignore that key (torch.nn.MultiheadAttention's convention): padded keys are zeroed, "
        "and normalize_decay sums the decay over the real keys; exact on either side, the decay being relative"
    ),
    chunk_size_param(),
)
_DEFAULTS = {p.name: p.default for p in RETENTION_PARAMS}


def _log_decay(gamma: Any, heads: int, device: torch.device) -> Tensor:
    """log(gamma) per query head, (H,) float64 (the engine casts it to the compute dtype)."""
    if gamma is None:
        gamma = retnet_gamma(heads)
    if isinstance(gamma, Tensor):
        return gamma.detach().to(device=device, dtype=torch.float64).log()
    values = [float(gamma)] * heads if _is_decay(gamma) else [float(g) for g in gamma]
    return torch.tensor(values, dtype=torch.float64, device=device).log()


# --------------------------------------------------------------------------------------------
# operands and output, shared by the backends and the decoder
# --------------------------------------------------------------------------------------------
def _operands(q: Tensor, k: Tensor, v: Tensor, params: dict) -> Operands:
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    heads = q.shape[1]
    q, k, v = q.to(dtype), expand_heads(k, heads).to(dtype), expand_heads(v, heads).to(dtype)
    scale = params["scale"] or q.shape[-1] ** -0.5
    k = zero_padded(k, padded_keys(params))
    return Operands(q, k, v, _log_decay(params["gamma"], heads, q.device), out_dtype, scale, params["normalize_scores"])


def _fused(q: Tensor, k: Tensor, v: Tensor, params: dict) -> Optional[Tensor]:
    """Without RetNet's normalizations: one C++ call on the inputs as they are; else None."""
    if params["normalize_decay"] or params["normalize_scores"]:
        return None
    scale = params["scale"] or q.shape[-1] ** -0.5
    log_decay = _log_decay(params["gamma"], q.shape[1], q.device)
    k = zero_padded(k, padded_keys(params))  # no feature map: a zero key is a key that adds nothing
    return fused_causal_forward(q, k, v, scale=scale, log_decay=log_decay, chunk_size=params["chunk_size"])


def _decay_norm(rows: Tensor) -> Tensor:
    """sqrt of the decay's row sums; a row that sees no key (sum 0, numerators 0) is divided by 1."""
    return torch.where(rows > 0, rows.sqrt(), torch.ones_like(rows))


def _padded_decay_rows(pad: Tensor, nq: int, causal: bool, log_decay: Tensor, like: Tensor) -> Tensor:
    """sum_(j visible, real) gamma^(i-j) per row, (B, H, Nq, 1): the engine with one feature (q = 1,
    k = 1 for a real key and 0 for a pad, v = 1), O(N) per head, any padding."""
    b, h, nk = pad.shape[0], log_decay.shape[0], pad.shape[1]
    keys = visible_keys(pad, nk, like).expand(b, h, nk, 1)
    ones_q, ones_v = like.new_ones(b, h, nq, 1), like.new_ones(b, h, nk, 1)
    return chunked_form(ones_q, keys.contiguous(), ones_v, causal=causal, log_decay=log_decay.to(like.dtype))


def _decay_rows(params: dict, nq: int, nk: int, log_decay: Tensor, like: Tensor) -> Tensor:
    """The decay's row sums over the keys each query sees (float64 in closed form), real keys only when padded."""
    pad = padded_keys(params)
    if pad is None:
        return decay_row_sums(nq, nk, causal=params["causal"], log_decay=log_decay, device=like.device)
    if pad.shape[1] != nk:  # a decoding step: its mask covers the new keys, the sums need every earlier one
        raise ParameterError(
            "retention: key_padding_mask: not supported with normalize_decay while decoding (the decay's row sums over "
            "the real keys need the mask of every earlier key): pass None, or run the whole sequence at once",
            argument="key_padding_mask",
        )
    return _padded_decay_rows(pad, nq, params["causal"], log_decay, like)


def _finish(out: Tensor, params: dict, nq: int, nk: int) -> Tensor:
    if params["normalize_decay"]:
        log_decay = _log_decay(params["gamma"], out.shape[1], out.device)
        out = out / _decay_norm(_decay_rows(params, nq, nk, log_decay, out.detach())).to(out.dtype)
    if params["normalize_scores"]:
        out = out[..., :-1] / out[..., -1:].abs().clamp(min=1)
    return out


# --------------------------------------------------------------------------------------------
# reference: RetNet's parallel form, literally
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, **params):
    """D materialized (and normalized), R = (s Q K^T) * D (and normalized), out = R V."""
    ops = _operands(q, k, v, {**params, "normalize_scores": False})
    decay = decay_weights(q.shape[2], k.shape[2], causal=params["causal"], log_decay=ops.log_decay, like=ops.q)
    if padded_keys(params) is not None:  # the pads leave the decay's row sums too
        decay = decay * visible_keys(padded_keys(params), k.shape[2], decay).transpose(-1, -2)
    if params["normalize_decay"]:
        decay = decay / _decay_norm(decay.sum(-1, keepdim=True))
    scores = (ops.scale * ops.q @ ops.k.transpose(-1, -2)) * decay
    if params["normalize_scores"]:
        scores = scores / scores.sum(-1, keepdim=True).abs().clamp(min=1)
    return (scores @ ops.v).to(q.dtype)


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark; state size
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    """RetNet's defaults without ``rng``; with it, random decays, normalizations and chunk sizes."""
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    params["gamma"] = rng.choice((None, 0.9, 1.0, tuple(rng.uniform(0.3, 1.0) for _ in range(p.q_heads))))
    params["normalize_decay"] = rng.random() < 0.4
    params["normalize_scores"] = rng.random() < 0.4
    if rng.random() < 0.3:  # below D^-0.5 only: the bare decayed sum's rounding grows with its terms
        params["scale"] = rng.choice((0.02, 0.1))
    params["chunk_size"] = rng.choice((1, 2, 3, 7, 16, 64))
    params["key_padding_mask"] = sample_padding(p, rng)
    return params


def _state_size(head_dim: int, value_dim: Optional[int] = None, **params: Any) -> int:
    """D x Dv per head (D x (Dv + 1) with normalize_scores: the row sum rides along)."""
    bound = {**_DEFAULTS, **params}
    return head_dim * ((head_dim if value_dim is None else value_dim) + (1 if bound["normalize_scores"] else 0))


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
RETENTION = register(
    Mechanism(
        name="retention",
        family="linear",
        catalog=("F2", "F3"),
        paper="RetNet (Sun et al., 2023); ViR (Hatamizadeh et al., 2023); Lightning Attention-2 (Qin et al., 2024)",
        formula="out_i = sum_(j <= i) gamma_h^(i-j) (s q_i . k_j) v_j  (causal=False: gamma_h^|i-j| over every j)",
        cost="O(N (L D + D Dv)) time, O(N L + N D Dv / L) memory (chunked, L = chunk_size); O(N^2) (reference)",
        summary="RetNet retention: per-head exponential decay, causal or bidirectional (vision), RetNet's normalizations",
        patterns=frozenset({"causal_self", "causal_cross", "noncausal_self"}),
        params=RETENTION_PARAMS,
        gqa=True,
        decoder=ScanDecoder("retention", _operands, _finish),
        sample_params=_sample_params,
        check_params=_check_combination,
        state_size=_state_size,
    )
)
RETENTION.add_backend(Backend("reference", _reference, doc="D and R materialized: RetNet's parallel form, the spec", priority=-100, materializes_scores=True))
add_form_backends(RETENTION, _operands, _finish, _fused)


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    gamma: Any = None,
    causal: bool = True,
    scale: Optional[float] = None,
    normalize_decay: bool = False,
    normalize_scores: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    chunk_size: int = 64,
    backend: Optional[str] = None,
) -> Tensor:
    """Retention (catalog F2): linear attention with a per-head exponential decay.

    ::

        out_i = sum_(j <= i) gamma_h^(i-j) (s q_i . k_j) v_j        (causal, default)
        out_i = sum_j        gamma_h^|i-j| (s q_i . k_j) v_j        (causal=False)

    RetNet (Sun et al., 2023), Sec. 2.1 eqs. 5-7; defaults (``gamma_h = 1 - 2^(-5-h)``,
    ``s = D^-0.5``, no normalization) reproduce flash-linear-attention's ``naive_retention``.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        gamma: None (RetNet's), a float for every head, or one per query head.
        causal: False gives the bidirectional decay gamma^|i-j| (vision; needs Nq = Nk).
        scale: multiplies q, default D^-0.5.
        normalize_decay: RetNet's ``D_ij / sqrt(sum_j D_ij)``.
        normalize_scores: RetNet's ``R_ij / max(|sum_j R_ij|, 1)``.
        key_padding_mask: (B, Nk) bool, **True = ignore that key**: padded keys are zeroed and
            leave ``normalize_decay``'s row sums; the decay gamma^(i-j) is relative, so a batch
            padded on the left or the right equals each sequence alone on its real rows. A
            query that sees no real key outputs 0.
        chunk_size: tokens per chunk of the ``chunked`` backend (Lightning Attention-2).
        backend: force ``chunked`` (default), ``reference`` or ``recurrent``.

    Cost: O(N (L D + D Dv)) time on ``chunked``; decoding (``init_state``/``step``) keeps D x Dv
    numbers per head whatever the context length.

    Example::

        >>> q = k = v = torch.randn(1, 8, 4096, 64)
        >>> out = retention(q, k, v)                                   # causal, RetNet's decays
        >>> img = retention(q, k, v, causal=False, gamma=0.95)         # bidirectional (vision)
    """
    return RETENTION(
        q,
        k,
        v,
        backend=backend,
        gamma=gamma,
        causal=causal,
        scale=scale,
        normalize_decay=normalize_decay,
        normalize_scores=normalize_scores,
        key_padding_mask=key_padding_mask,
        chunk_size=chunk_size,
    )


RETENTION.function = retention
