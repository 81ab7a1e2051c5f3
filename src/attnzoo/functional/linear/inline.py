"""Injective linear attention, InLine (catalog F8).

Han et al. (NeurIPS 2024), "Bridging the Divide: Reconsidering Softmax and Linear Attention",
eq. 5 (the injective linear attention; section numbers not checked here): linear attention
divides ``phi(q_i) . phi(k_j)`` by its row sum, which maps queries that differ by a scale
factor to the same attention row (not injective). InLine
subtracts the row mean instead and adds ``1/N``, so every row still sums to 1:

    A_ij  = s phi(q_i) . phi(k_j)
    out_i = sum_j (A_ij - mean_t A_it + 1) / N  v_j
          = (s/N) (phi(q_i) S - (phi(q_i) . K) v_bar) + v_bar,
    S = sum_j phi(k_j)^T v_j,  K = sum_j phi(k_j),  v_bar = mean_j v_j

``s = scale`` (default D^-0.5). The official code (LeapLabTHU/InLine, ``InLineAttention`` of
``models/inline_swin.py`` and ``inline_deit.py``) multiplies ``phi(q) . phi(k)`` by
``D^-0.5 / N`` (the paper's eq. 5 omits this factor, as its comment says): the ``s/N`` above.
Its feature maps (``kernel_func``) are ``identity`` (the default there and here), ``relu``,
``leaky_relu`` (slope 0.01) and ``exp`` (``exp(0.2 x)``), applied to q and k before the heads
are split (elementwise, so the same thing). The local modelling term of the paper (a
3 x 3 depthwise convolution of V whose kernel an MLP predicts from the mean token) is learnable:
it lives in :class:`attnzoo.nn.InLineAttention`.

Causal (not in the paper; defined here as the same rule on each query's visible keys): query
i sees the n_i keys j <= i + Nk - Nq (bottom-right), and the mean, the ``1/N`` and ``v_bar``
are taken over those keys:

    out_i = (s/n_i) (phi(q_i) S_i - (phi(q_i) . K_i) V_i / n_i) + V_i / n_i

with S_i, K_i, V_i the sums over the visible keys; a query that sees no key outputs 0. These
are running sums, so decoding (``init_state``/``step``) keeps F x (Dv + 1) + Dv numbers per
head. Cost O(N F Dv): ``chunked`` runs ``phi(q) [S, K]`` on the linear-attention engine with a
column of ones appended to v (:func:`attnzoo.kernels.linear_scan.chunked_form`); ``reference``
materializes A.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ParameterError
from ...kernels.linear_scan import chunked_form, chunked_scan, parallel_scores
from ...registry import PATTERNS, Backend, DecodingState, Mechanism, Param, Problem, flag, positive_number, register
from .feature_maps import feature_map_check, softplus
from ._shared import chunk_size_param, compute_dtype, expand_heads, key_padding_param, refuse_padding_while_decoding, sample_padding, visible_keys, zero_padded

__all__ = ["inline_attention", "INLINE", "InLineState", "INLINE_FEATURE_MAPS"]


def _exp_kernel(x: Tensor) -> Tensor:
    """``exp(0.2 x)``: the official ``exp_kernel`` (temperature 0.2)."""
    return torch.exp(0.2 * x)


INLINE_FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "exp": _exp_kernel,
}


INLINE_PARAMS = (
    Param(
        "feature_map",
        "identity",
        "phi on q and k: " + ", ".join(INLINE_FEATURE_MAPS) + " (exp(0.2 x)), or a callable (the official kernel_func)",
        feature_map_check(tuple(INLINE_FEATURE_MAPS), pairs=False),
        ("softmax", 3, ("relu",)),
        "str | callable",
    ),
    positive_number("scale", "s on phi(q) . phi(k) (the official head_dim ** -0.5, the default)"),
    flag("causal", False, "each query uses its visible keys j <= i + Nk - Nq: mean, 1/n and v_bar over them"),
    chunk_size_param(),
    key_padding_param(
        "(B, Nk) bool, True = ignore that key (torch.nn.MultiheadAttention's convention): padded keys are not visible, "
        "so the row mean, 1/n and v_bar run over the real keys"
    ),
)


def _phi(feature_map: Any) -> Callable[[Tensor], Tensor]:
    return INLINE_FEATURE_MAPS[feature_map] if isinstance(feature_map, str) else feature_map


def _operands(q: Tensor, k: Tensor, v: Tensor, feature_map: Any, pad: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """phi(q), phi(k), v in the compute dtype, key/value heads repeated (GQA); a padded key's
    phi(k) and v zeroed (it leaves S, K and the value sum; the counts are the caller's)."""
    dtype, heads, phi = compute_dtype(q.dtype), q.shape[1], _phi(feature_map)
    fk, v = phi(expand_heads(k, heads).to(dtype)), expand_heads(v, heads).to(dtype)
    return phi(q.to(dtype)), zero_padded(fk, pad), zero_padded(v, pad)


def _scale(params: dict, q: Tensor) -> float:
    return params["scale"] or q.shape[-1] ** -0.5


# --------------------------------------------------------------------------------------------
# reference: the attention matrix of eq. 5 materialized
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, **params):
    """W_ij = (A_ij - mean_visible A_i + 1) / n_i on the visible keys, 0 elsewhere; out = W v."""
    out_dtype = q.dtype
    pad = params.get("key_padding_mask")
    fq, fk, v = _operands(q, k, v, params["feature_map"], pad)
    nq, nk = fq.shape[2], fk.shape[2]
    scores = parallel_scores(fq, fk, causal=False, scale=_scale(params, q))
    visible = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if params["causal"]:
        visible = visible.tril(nk - nq)
    if pad is not None:  # a padded key is not visible: it leaves the mean and the count
        visible = visible & ~pad[:, None, None, :]
    count = visible.sum(-1, keepdim=True).to(scores.dtype)  # n_i
    n = count.clamp(min=1)
    scores = scores.masked_fill(~visible, 0)
    mean = scores.sum(-1, keepdim=True) / n
    weights = ((scores - mean + 1) / n).masked_fill(~visible, 0)
    return (weights @ v).to(out_dtype)


# --------------------------------------------------------------------------------------------
# fast: phi(q) [S, K] on the linear-attention engine, v_bar as a (prefix) mean
# --------------------------------------------------------------------------------------------
def _combine(product: Tensor, value_sums: Tensor, count: Tensor) -> Tensor:
    """``(s/n)(phi(q) S - (phi(q) . K) V / n) + V / n`` from ``product`` = s phi(q) [S, K] and V.

    ``count`` is n_i (clamped to 1 by the caller's sums being 0 where nothing is visible)."""
    n = count.clamp(min=1)
    v_bar = value_sums / n
    return (product[..., :-1] - product[..., -1:] * v_bar) / n + v_bar


def _visible_counts(nq: int, nk: int, seen: int, like: Tensor) -> Tensor:
    """n_i = i + Nk - Nq + 1 + seen (bottom-right), at least 0, shaped (Nq, 1)."""
    i = torch.arange(nq, device=like.device, dtype=like.dtype)
    return (i + (nk - nq + 1 + seen)).clamp(min=0).unsqueeze(-1)


def _aligned_prefix(v: Tensor, nq: int, carried: Optional[Tensor]) -> Tensor:
    """Sum of the values each bottom-right aligned query sees (plus ``carried``), (B, H, Nq, Dv)."""
    sums = v.cumsum(2)
    if carried is not None:
        sums = sums + carried.unsqueeze(2)
    nk = v.shape[2]
    if nq <= nk:
        return sums[:, :, nk - nq :]
    before = sums.new_zeros(*sums.shape[:2], nq - nk, sums.shape[-1])  # queries that see no key
    if carried is not None:
        before = before + carried.unsqueeze(2)
    return torch.cat([before, sums], dim=2)


@dataclass
class InLineState(DecodingState):
    """The causal recurrence's state after ``seen`` keys: ``kv`` = sum phi(k_j)^T [v_j, 1]
    (B, H, F, Dv + 1) and ``values`` = sum v_j (B, H, Dv); None before the first key."""

    seen: int = 0
    kv: Optional[Tensor] = None
    values: Optional[Tensor] = None


def _causal_step(
    fq: Tensor, fk: Tensor, v: Tensor, scale: float, chunk_size: int, state: InLineState, real: Optional[Tensor] = None
) -> tuple[Tensor, InLineState]:
    """Causal InLine of the new tokens from ``state`` (phi applied, pads zeroed), and the state after
    them. ``real`` (B, 1, Nk, 1), 1 for a real key: the counts n_i are then its aligned prefix sums."""
    product, kv = chunked_scan(fq, fk, v, state=state.kv, chunk_size=chunk_size, scale=scale, normalizer=True)
    value_sums = _aligned_prefix(v, fq.shape[2], state.values)
    if real is None:
        count = _visible_counts(fq.shape[2], fk.shape[2], state.seen, product)
    else:
        count = _aligned_prefix(real, fq.shape[2], None) + state.seen  # keys before the state: counted as real
    values = v.sum(2) if state.values is None else state.values + v.sum(2)
    return _combine(product, value_sums, count), dataclasses.replace(state, seen=state.seen + fk.shape[2], kv=kv, values=values)


def _chunked(q, k, v, **params):
    """``chunked_form(phi(q), phi(k), [v, 1])`` gives s phi(q) S and s phi(q) . K in one pass."""
    out_dtype = q.dtype
    pad = params.get("key_padding_mask")
    fq, fk, v = _operands(q, k, v, params["feature_map"], pad)
    scale = _scale(params, q)
    real = None if pad is None else visible_keys(pad, fk.shape[2], fk)
    if params["causal"]:
        return _causal_step(fq, fk, v, scale, params["chunk_size"], InLineState(), real)[0].to(out_dtype)
    product = chunked_form(fq, fk, v, causal=False, scale=scale, normalizer=True)
    if real is None:
        count = torch.full((1, 1), float(fk.shape[2]), dtype=product.dtype, device=product.device)
    else:  # the real keys of each sequence, (B, 1, 1, 1)
        count = real.sum(2, keepdim=True)
    return _combine(product, v.sum(2, keepdim=True), count).to(out_dtype)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
class InLineDecoder:
    """Causal decoding from an :class:`InLineState`: running sums, not a cache; each step makes a
    new state. ``feature_map``, ``scale`` and ``causal`` are bound at init_state."""

    per_step = frozenset({"chunk_size", "key_padding_mask"})

    def init_state(self, problem: Problem, **params: Any) -> InLineState:
        return InLineState()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: InLineState, **params: Any) -> tuple[Tensor, InLineState]:
        if not params["causal"]:
            raise ParameterError(
                "inline: causal: decoding needs causal=True (a bidirectional output depends on later tokens)", argument="causal"
            )
        if q.shape[2] > k.shape[2]:
            raise ParameterError(
                f"inline: q: a decoding step takes at most as many queries as new keys, got {q.shape[2]} and {k.shape[2]}", argument="q"
            )
        refuse_padding_while_decoding("inline", params)
        out_dtype = q.dtype
        fq, fk, v = _operands(q, k, v, params["feature_map"])
        out, state = _causal_step(fq, fk, v, _scale(params, q), params["chunk_size"], state)
        return out.to(out_dtype), state


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark; state size
# --------------------------------------------------------------------------------------------

def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    choice = rng.choice(tuple(INLINE_FEATURE_MAPS) + ("callable",))
    params["feature_map"] = softplus if choice == "callable" else choice
    if rng.random() < 0.3:
        params["scale"] = rng.choice((0.1, 0.5, 1.0))
    params["chunk_size"] = rng.choice((1, 2, 3, 7, 16, 64))
    params["key_padding_mask"] = sample_padding(p, rng)
    return params


def _state_size(head_dim: int, value_dim: Optional[int] = None, **params: Any) -> int:
    """F x (Dv + 1) + Dv per head: sum phi(k)^T [v, 1] and sum v; F = D for the named maps."""
    dv = head_dim if value_dim is None else value_dim
    feature_map = params.get("feature_map", "identity")
    if isinstance(feature_map, str):
        features = head_dim
    else:
        with torch.no_grad():
            features = feature_map(torch.zeros(1, 1, 1, head_dim)).shape[-1]
    return features * (dv + 1) + dv


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
INLINE = register(
    Mechanism(
        name="inline",
        family="linear",
        catalog=("F8",),
        paper="Bridging the Divide: Reconsidering Softmax and Linear Attention (InLine; Han et al., NeurIPS 2024)",
        formula="out_i = sum_j (s phi(q_i).phi(k_j) - mean_t s phi(q_i).phi(k_t) + 1) / N v_j",
        cost="O(N F Dv) time, O(N (F + Dv)) memory (chunked); O(Nq Nk) (reference)",
        summary="injective linear attention: the row mean subtracted instead of a division; causal as a prefix variant",
        patterns=frozenset(PATTERNS),
        params=INLINE_PARAMS,
        gqa=True,
        exact=True,
        decoder=InLineDecoder(),
        sample_params=_sample_params,
        state_size=_state_size,
    )
)
INLINE.add_backend(
    Backend("reference", _reference, doc="the attention matrix of eq. 5 materialized: the spec", priority=-100, materializes_scores=True)
)
INLINE.add_backend(
    Backend(
        "chunked",
        _chunked,
        doc="phi(q) [sum phi(k)^T v, sum phi(k)] on the chunked linear-attention engine, v_bar as a (prefix) mean",
        priority=50,
    )
)


def inline_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: Any = "identity",
    scale: Optional[float] = None,
    causal: bool = False,
    chunk_size: int = 64,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Injective linear attention, InLine (Han et al., NeurIPS 2024, eq. 5; catalog F8).

    ::

        out_i = sum_j (s phi(q_i).phi(k_j) - mean_t s phi(q_i).phi(k_t) + 1) / N  v_j

    the official code's scaling (``s / N`` on the scores, ``s = D^-0.5``); rows sum to 1
    without a division by the scores. With ``causal`` the mean, N and v_j run over each
    query's visible keys (a variant defined here, not the paper's; see the module docstring).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        feature_map: ``"identity"`` (default, as the official models), ``"relu"``,
            ``"leaky_relu"``, ``"exp"`` (exp(0.2 x)), or a callable phi.
        scale: s on phi(q) . phi(k), default D^-0.5.
        causal: prefix variant, bottom-right aligned; a query seeing no key outputs 0.
        chunk_size: tokens per chunk of the causal ``chunked`` product.
        key_padding_mask: (B, Nk) bool, **True = ignore that key**: a padded key is not
            visible, so the row mean, the 1/n and v_bar run over the real keys (the count
            changes), and a padded batch equals each sequence alone on its real rows, on either
            side. A query that sees no real key outputs 0.
        backend: force ``chunked`` (default) or ``reference``.

    Returns:
        (B, Hq, Nq, Dv) in the dtype of q (computed in float32 for half inputs).

    Cost: O(N F Dv) time and O(N (F + Dv)) memory on ``chunked``; decoding keeps
    F x (Dv + 1) + Dv numbers per head.

    Example::

        >>> q = k = v = torch.randn(1, 8, 3136, 32)
        >>> out = inline_attention(q, k, v)                        # identity map, as InLine-Swin
        >>> out = inline_attention(q, k, v, feature_map="relu", causal=True)
    """
    return INLINE(
        q, k, v, backend=backend, feature_map=feature_map, scale=scale, causal=causal, chunk_size=chunk_size, key_padding_mask=key_padding_mask
    )


INLINE.function = inline_attention
