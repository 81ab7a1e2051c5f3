"""Token-count-dependent temperature (catalog V4): softmax with an entropy-preserving scale.

    out_i = sum_j softmax_j(lambda_i * scale * q_i . k_j) v_j,
    lambda_i = sqrt(log n_i / log T)   (law "sqrt_log")   or   log n_i / log T   (law "log")

``n_i`` is the number of keys query i attends (the real keys of its sequence; under a causal mask
its visible prefix) and ``T`` = ``train_length`` the token count the model was trained at, so
``lambda = 1`` (plain softmax attention) when ``n == T``.

* ``sqrt_log``: Jin et al., "Training-free Diffusion Model Adaptation for Variable-Sized
  Text-to-Image Synthesis" (NeurIPS 2023): the attention entropy grows with log N, and replacing
  the scale ``1 / sqrt(d)`` by ``sqrt(log_T N / d)`` keeps it near its training value (a
  (log n)^(1/2) inverse-temperature law; T = the training resolution's token count). The
  constant temperatures of TempScale (Length-Induced Embedding Collapse) and of the ViT
  patch-perturbation work are plain softmax with another ``scale``: no mechanism of their own.
* ``log``: the entropy-invariance scale ``log_T n`` of Su (2021, "Attention's scale from entropy
  invariance") used by the InfoScale line of work (Li et al., 2025) and by log-n attention
  scaling in LLM length extrapolation (a (log n)^1 law).

Reading we follow: n is counted per query row (visible keys), which for non-causal self-attention
is Jin et al.'s N (all tokens) and for causal attention the prefix length (log-n scaling per
position); key padding is excluded, so a padded batch equals each sequence alone and decoding
needs no fixed length. A row with one visible key gets lambda = 0 (its only key, weight 1).

Backends: ``reference`` (materialized), ``sdpa`` (queries pre-multiplied by lambda_i: any SDPA
kernel, no LSE) and ``tiled`` (softmax's FA2 engine with lambda_i as a score_mod: O(N) memory,
LSE). Cost: softmax's, O(Nq Nk D).

The file also registers ``position_temperature`` (catalog V3): Zhang et al., "Selective Attention:
Enhancing Transformer through Principled Context Control" (NeurIPS 2024), as its official code
(umich-sota/selective_attention, ``lit_gpt/gpt_2_PTS.py``) computes the position temperature::

    out_i = sum_j softmax_j(tau_i * scale * q_i . k_j) v_j,   tau_i = 1 + exp(-exp(beta_h)) * log(pos_i)

``pos_i`` the 1-based position of query i (the official ``arange(1, T + 1)``; here among the real
keys, so padding and decoding agree), ``beta`` learnable (official init 1.5; one per layer there, a
number or one per head here). The paper's token-aware query temperature and its value temperature
are not in the official code: a layer may pass its own per-query multiplier as
``query_temperature`` (B, Hq, Nq); the value temperature is not implemented. The fast backends
multiply the queries by tau (in float32, so autograd reaches beta and query_temperature) and call
softmax's SDPA or tiled backend.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels.reference import default_scale, materialized_attention
from ...registry import PATTERNS, Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from .._prefix_decoder import PrefixDecoder
from .softcap import allowed_pairs, call_softmax, pattern_params, sample_pattern, visible_keys

__all__ = ["LENGTH_TEMPERATURE", "POSITION_TEMPERATURE", "length_temperature_attention", "position_temperature_attention", "length_factor", "position_factor"]

LAWS = ("sqrt_log", "log")


def _check_train_length(value: Any, p: Problem) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        return "an int >= 2 (T: the number of tokens at training; log T must be positive)"
    return None


PARAMS = (
    Param("train_length", None, "T: the token count the model was trained at (lambda = 1 when n == T); required", _check_train_length,
          (None, 1, 0, 2.5, "512", True), "int"),
    choice("law", LAWS, "sqrt_log", "lambda = sqrt(log n / log T) (Jin et al. 2023) or log n / log T (Su 2021)"),
    *pattern_params(),
    positive_number("scale", "the base scale lambda multiplies; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row's tempered scores, (B, H, Nq)"),
)


def length_factor(q: Tensor, k: Tensor, *, train_length: int, law: str, causal: bool, causal_alignment: str,
                  key_padding_mask: Optional[Tensor]) -> Tensor:
    """(B, Nq) float64: lambda_i of each query row (n_i = its visible real keys, at least 1)."""
    n = visible_keys(q, k, causal, causal_alignment, key_padding_mask).clamp(min=1)
    ratio = torch.log(n) / math.log(train_length)
    return ratio.sqrt() if law == "sqrt_log" else ratio


@dataclass(frozen=True, eq=False)
class _RowScale(masks.ScoreMod):
    """``score * lambda[b, q_idx]``: the per-row temperature as a score_mod (no gradient to lambda)."""

    factor: Tensor  # (B, Nq)

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score * self.factor.to(score.dtype)[b, q_idx]


def _reference(q, k, v, *, train_length, law, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """Materialized scores times lambda_i, masked softmax: the spec."""
    lam = length_factor(q, k, train_length=train_length, law=law, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask)
    allowed = allowed_pairs(q, k, causal, causal_alignment, key_padding_mask)
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=allowed, score_mod=lambda s, b, h, qi, ki: s * lam.to(s.dtype)[b, qi])
    return (out, lse) if return_lse else out


def _tiled(q, k, v, *, train_length, law, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """softmax's tiled FA2 engine with lambda_i as its score_mod (O(N) memory, LSE)."""
    lam = length_factor(q, k, train_length=train_length, law=law, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask)
    return call_softmax("tiled", q, k, v, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask,
                        scale=scale, score_mod=_RowScale(lam), return_lse=return_lse)


def _sdpa(q, k, v, *, train_length, law, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """Queries pre-multiplied by lambda_i, then softmax's SDPA backend (flash / efficient kernels)."""
    lam = length_factor(q, k, train_length=train_length, law=law, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask)
    cdt = _compute_dtype(q)
    tempered = q.to(cdt) * lam.to(cdt)[:, None, :, None]
    return _in_dtype(call_softmax("sdpa", tempered, k.to(cdt), v.to(cdt), causal=causal, causal_alignment=causal_alignment,
                                  key_padding_mask=key_padding_mask, scale=scale), q.dtype)


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _in_dtype(result: Any, dtype: torch.dtype) -> Any:
    """The output cast back to the inputs' dtype (the LSE stays float32/float64, as softmax's)."""
    if isinstance(result, tuple):
        return (result[0].to(dtype), *result[1:])
    return result.to(dtype)


def _sdpa_accepts(p: Problem, params: dict) -> Optional[str]:
    return "cannot return the LSE (use tiled)" if params["return_lse"] else None


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params = sample_pattern(p, pattern, rng)
    if rng is None:
        return {**params, "train_length": max(2, p.kv_len)}
    params["train_length"] = rng.randint(2, 3 * p.kv_len + 2)
    if rng.random() < 0.5:
        params["law"] = "log"
    return params


LENGTH_TEMPERATURE = register(
    Mechanism(
        name="length_temperature",
        family="variants",
        catalog=("V4",),
        paper="Training-free Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis (Jin et al., NeurIPS 2023); "
              "Information Entropy Invariance (Li et al., 2025) / Su (2021) for the log law",
        formula="out_i = sum_j softmax_j(lambda_i scale q_i.k_j) v_j, lambda_i = sqrt(log n_i / log T) (or log n_i / log T)",
        cost="O(Nq * Nk * D) time; O(N) memory on tiled and SDPA's flash kernel",
        summary="softmax with an entropy-preserving temperature: scores times sqrt(log n / log T), n the keys a query sees, T the training length",
        patterns=frozenset(PATTERNS),
        params=PARAMS,
        gqa=True,
        decoder=PrefixDecoder("length_temperature", "new"),
        sample_params=_sample_params,
    )
)
LENGTH_TEMPERATURE.add_backend(Backend("reference", _reference, doc="materialized scores times lambda_i, masked softmax: the spec", priority=-100, materializes_scores=True))
LENGTH_TEMPERATURE.add_backend(Backend("sdpa", _sdpa, doc="queries times lambda_i, then softmax's SDPA backend (no LSE)", accepts=_sdpa_accepts, priority=50))
LENGTH_TEMPERATURE.add_backend(Backend("tiled", _tiled, doc="softmax's tiled FA2 engine with lambda_i as score_mod (O(N) memory, LSE)", priority=20, traceable=False))


def length_temperature_attention(q: Tensor, k: Tensor, v: Tensor, *, train_length: int, law: str = "sqrt_log", causal: bool = False,
                                 causal_alignment: str = "bottom_right", key_padding_mask: Optional[Tensor] = None,
                                 scale: Optional[float] = None, return_lse: bool = False, backend: Optional[str] = None) -> Any:
    """Softmax attention with a token-count-dependent temperature (catalog V4).

    ``out_i = sum_j softmax_j(lambda_i * scale * q_i . k_j) v_j`` with ``lambda_i = sqrt(log n_i / log T)``
    (``law="sqrt_log"``, Jin et al. 2023) or ``log n_i / log T`` (``law="log"``, Su 2021), ``n_i`` the
    keys query i sees (real keys; causal: its prefix) and ``T = train_length``. Equals softmax
    attention when ``n_i == T``.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        train_length: T (>= 2). law: ``"sqrt_log"`` or ``"log"``.
        causal, causal_alignment, key_padding_mask, return_lse: as :func:`attnzoo.softmax_attention`.
        scale: the base scale lambda multiplies; default ``D ** -0.5``.

    Cost: O(Nq Nk D); O(N) memory on ``tiled``. Paper: Jin et al. (NeurIPS 2023).

    Example::

        >>> q = k = v = torch.randn(1, 8, 4096, 64)  # a 64 x 64 latent, trained at 32 x 32
        >>> out = length_temperature_attention(q, k, v, train_length=1024)
    """
    return LENGTH_TEMPERATURE(q, k, v, backend=backend, train_length=train_length, law=law, causal=causal, causal_alignment=causal_alignment,
                              key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


LENGTH_TEMPERATURE.function = length_temperature_attention



# --------------------------------------------------------------------------------------------
# V3: position-dependent temperature (Selective Self-Attention's position temperature)
# --------------------------------------------------------------------------------------------
def _check_beta(value: Any, p: Problem) -> Optional[str]:
    want = f"a finite number or a floating tensor of {p.q_heads} values (one per query head)"
    if isinstance(value, bool):
        return want
    if isinstance(value, (int, float)):
        return None if math.isfinite(value) else want
    if isinstance(value, Tensor) and value.is_floating_point() and value.numel() == p.q_heads and value.device == p.device:
        return None if bool(torch.isfinite(value).all()) else want
    return want


def _check_query_temperature(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    shape = (p.batch, p.q_heads, p.q_len)
    want = f"None or a floating tensor broadcastable to (B, Hq, Nq) = {shape} on {p.device}"
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device or value.dim() > 3:
        return want
    try:
        return None if torch.broadcast_shapes(tuple(value.shape), shape) == shape else want
    except RuntimeError:
        return want


POSITION_PARAMS = (
    Param("beta", 1.5, "beta of 1 + exp(-exp(beta)) log(pos): a number or (Hq,) per head, learnable (official init 1.5)", _check_beta,
          (float("nan"), float("inf"), "1.5", True, torch.zeros(1, 7)), "float | Tensor"),
    Param("query_temperature", None, "an extra per-query multiplier (B, Hq, Nq) (e.g. a layer's token-aware temperature); differentiable",
          _check_query_temperature, (torch.zeros(3, 5, 7, 11), "1"), "Tensor | None"),
    *pattern_params(),
    positive_number("scale", "the base scale the temperature multiplies; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row's tempered scores, (B, H, Nq)"),
)


def position_factor(q: Tensor, k: Tensor, *, beta: Any, query_temperature: Optional[Tensor], causal_alignment: str,
                    key_padding_mask: Optional[Tensor], **_: Any) -> Tensor:
    """(B, Hq, Nq) tau_i = (1 + exp(-exp(beta_h)) log pos_i) * query_temperature (differentiable in beta and it).

    pos_i: the 1-based position of query i among the real keys (keys 0 .. i + offset), at least 1.
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = visible_keys(q, k, True, causal_alignment, key_padding_mask).clamp(min=1).to(cdt)  # (B, Nq)
    b = beta.to(cdt).reshape(1, -1, 1) if isinstance(beta, Tensor) else torch.tensor(float(beta), dtype=cdt, device=q.device)
    tau = 1 + torch.exp(-torch.exp(b)) * torch.log(pos)[:, None, :]
    tau = tau.expand(q.shape[0], q.shape[1], q.shape[2])
    return tau if query_temperature is None else tau * query_temperature.to(cdt)


def _position_reference(q, k, v, *, beta, query_temperature, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """Materialized scores times tau_i, masked softmax: the spec."""
    tau = position_factor(q, k, beta=beta, query_temperature=query_temperature, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask)
    allowed = allowed_pairs(q, k, causal, causal_alignment, key_padding_mask)
    cdt = _compute_dtype(q)  # (tau_i q_i) . k_j: the scores times tau_i
    out, lse = materialized_attention(q.to(cdt) * tau[..., None], k.to(cdt), v.to(cdt), scale=default_scale(q, scale), allowed=allowed)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


def _position_softmax(name: str):
    def run(q, k, v, *, beta, query_temperature, causal, causal_alignment, key_padding_mask, scale, return_lse):
        # the tempered queries stay in float32 (a bf16 rounding of tau q would shift every logit)
        tau = position_factor(q, k, beta=beta, query_temperature=query_temperature, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask)
        cdt = _compute_dtype(q)
        result = call_softmax(name, q.to(cdt) * tau[..., None], k.to(cdt), v.to(cdt), causal=causal, causal_alignment=causal_alignment,
                              key_padding_mask=key_padding_mask, scale=default_scale(q, scale), return_lse=return_lse)
        return _in_dtype(result, q.dtype)

    run.__name__ = f"_position_{name}"
    run.__doc__ = f"Queries times tau_i (autograd reaches beta and query_temperature), then softmax's {name} backend."
    return run


def _position_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params = sample_pattern(p, pattern, rng)
    if rng is None:
        return params
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    if rng.random() < 0.4:
        params["beta"] = (torch.randn(p.q_heads, generator=gen) - 1).to(device=p.device, dtype=p.dtype)
    elif rng.random() < 0.5:
        params["beta"] = rng.uniform(-2.0, 2.0)
    if rng.random() < 0.3:
        params["query_temperature"] = (0.5 + torch.rand(p.batch, p.q_heads, p.q_len, generator=gen)).to(device=p.device, dtype=p.dtype)
    return params


POSITION_TEMPERATURE = register(
    Mechanism(
        name="position_temperature",
        family="variants",
        catalog=("V3",),
        paper="Selective Attention: Enhancing Transformer through Principled Context Control (Zhang et al., NeurIPS 2024): "
              "the position temperature of the official code (umich-sota/selective_attention, lit_gpt/gpt_2_PTS.py)",
        formula="out_i = sum_j softmax_j(tau_i scale q_i.k_j) v_j, tau_i = (1 + exp(-exp(beta_h)) log pos_i) * query_temperature_i",
        cost="O(Nq * Nk * D) time; O(N) memory on tiled and SDPA's flash kernel",
        summary="softmax with a query-position temperature 1 + exp(-exp(beta)) log(pos) (Selective Self-Attention), learnable beta per head",
        patterns=frozenset({"noncausal_self", "causal_self", "causal_cross"}),
        params=POSITION_PARAMS,
        gqa=True,
        decoder=PrefixDecoder("position_temperature", "new"),
        sample_params=_position_sample_params,
    )
)
POSITION_TEMPERATURE.add_backend(Backend("reference", _position_reference, doc="materialized scores times tau_i, masked softmax: the spec", priority=-100, materializes_scores=True))
POSITION_TEMPERATURE.add_backend(Backend("sdpa", _position_softmax("sdpa"), doc="queries times tau_i, then softmax's SDPA backend (no LSE)", accepts=_sdpa_accepts, priority=50))
POSITION_TEMPERATURE.add_backend(Backend("tiled", _position_softmax("tiled"), doc="queries times tau_i, then softmax's tiled FA2 engine (O(N) memory, LSE)", priority=20, traceable=False))


def position_temperature_attention(q: Tensor, k: Tensor, v: Tensor, *, beta: Any = 1.5, query_temperature: Optional[Tensor] = None, causal: bool = False,
                                   causal_alignment: str = "bottom_right", key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                                   return_lse: bool = False, backend: Optional[str] = None) -> Any:
    """Softmax attention with a query-position temperature (catalog V3, Selective Self-Attention's position part).

    ``out_i = sum_j softmax_j(tau_i * scale * q_i . k_j) v_j`` with
    ``tau_i = (1 + exp(-exp(beta_h)) * log(pos_i)) * query_temperature_i``, ``pos_i`` the 1-based
    position of query i among the real keys (its KV-cache position when decoding).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        beta: a number or (Hq,) tensor (learnable; the official init is 1.5, so the slope exp(-exp(beta)) is small).
        query_temperature: optional (B, Hq, Nq) multiplier (a layer's token-aware temperature), differentiable.
        causal, causal_alignment, key_padding_mask, return_lse: as :func:`attnzoo.softmax_attention`.
        scale: default ``D ** -0.5``.

    Cost: O(Nq Nk D); O(N) memory on ``tiled``. Paper: Zhang et al. (NeurIPS 2024); official code lit_gpt/gpt_2_PTS.py.

    Example::

        >>> q = k = v = torch.randn(2, 12, 1024, 64)
        >>> out = position_temperature_attention(q, k, v, beta=torch.full((12,), 1.5), causal=True)
    """
    return POSITION_TEMPERATURE(q, k, v, backend=backend, beta=beta, query_temperature=query_temperature, causal=causal, causal_alignment=causal_alignment,
                                key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


POSITION_TEMPERATURE.function = position_temperature_attention
