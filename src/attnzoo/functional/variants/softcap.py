"""Logit soft-capping (catalog V8, a stabilizer): softmax over ``cap * tanh(s / cap)``.

    out_i = sum_j softmax_j(cap * tanh(s_ij / cap)) v_j,   s_ij = scale * q_i . k_j

Gemma 2 (Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024, Sec. 3,
"Logit soft-capping") caps the attention logits at 50.0 (and the final logits at 30.0): the
scaled scores go through ``cap * tanh(. / cap)`` before the mask and the softmax, so no logit
leaves (-cap, cap) and the softmax cannot saturate (the attention-logit growth that Dehghani et
al. 2023 and Wortsman et al., "Small-scale proxies for large-scale Transformer training
instabilities", 2023, tie to divergence). ``cap = inf`` is plain softmax attention.

The fast paths are softmax's own engines with a ``score_mod`` (:func:`attnzoo.masks.softcap`):
``tiled`` (FlashAttention-2 in PyTorch, O(N) memory, its own backward, LSE) and ``flex``
(compiled FlexAttention). Cost: softmax's, O(Nq Nk D) time, plus one tanh per score.

This file also holds the helpers the other variants of issue 15 share (:mod:`.temperature`,
:mod:`.softplus`): the pattern parameters, the visible-key count of each query row, the dense
pattern, and the call of a softmax backend with a score_mod.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels.flex import FLEX_CAPABILITIES
from ...kernels.flex import decline_reason as flex_decline_reason
from ...kernels.reference import materialized_attention
from ...registry import PATTERNS, Backend, Mechanism, Param, Problem, choice, flag, get, positive_number, register
from .._padding import key_padding_param, sample_padding
from .._prefix_decoder import PrefixDecoder

__all__ = ["SOFTCAP", "softcap_attention", "GEMMA2_ATTENTION_CAP"]

#: Gemma 2's attention-logit cap (``attn_logit_softcapping``).
GEMMA2_ATTENTION_CAP = 50.0


# --------------------------------------------------------------------------------------------
# helpers shared by the softmax-shaped variants (softcap, length_temperature)
# --------------------------------------------------------------------------------------------
def pattern_params() -> tuple[Param, ...]:
    """causal, causal_alignment, key_padding_mask: the pattern parameters of softmax's variants."""
    return (
        flag("causal", False, "no key after the query"),
        choice("causal_alignment", ("bottom_right", "top_left"), "bottom_right", "when Nq != Nk, where query i sits among the keys"),
        key_padding_param(),
    )


def allowed_pairs(q: Tensor, k: Tensor, causal: bool, alignment: str, key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B|1, 1, Nq, Nk) bool, True = query i may see key j; None when every pair is visible."""
    nq, nk = q.shape[2], k.shape[2]
    allowed = None
    if causal:
        allowed = masks.dense_mask(masks.causal(masks.causal_offset(nq, nk, alignment)), nq, nk, device=q.device)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.reshape(q.shape[0], 1, 1, nk)
        allowed = keep if allowed is None else allowed & keep
    return allowed


def visible_keys(q: Tensor, k: Tensor, causal: bool, alignment: str, key_padding_mask: Optional[Tensor]) -> Tensor:
    """(B, Nq) float64: how many keys each query row may see (causal prefix, real keys only)."""
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    real = torch.ones(b, nk, dtype=torch.float64, device=q.device)
    if key_padding_mask is not None:
        real = (~key_padding_mask.reshape(b, nk)).double()
    if not causal:
        return real.sum(-1, keepdim=True).expand(b, nq)
    # keys 0 .. i + offset: the prefix count of real keys at that position (0 before key 0)
    prefix = torch.cat([real.new_zeros(b, 1), real.cumsum(-1)], dim=-1)  # prefix[:, m] = real keys among the first m
    last = torch.arange(nq, device=q.device) + masks.causal_offset(nq, nk, alignment)
    return prefix[:, (last + 1).clamp(0, nk)]


def softmax_backend(name: str) -> Callable[..., Any]:
    """The function of softmax's backend ``name`` (called with every softmax parameter)."""
    return get("softmax").backends[name].fn


def call_softmax(name: str, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, causal_alignment: str, key_padding_mask: Optional[Tensor],
                 scale: Optional[float], score_mod: Optional[Callable] = None, return_lse: bool = False) -> Any:
    """Softmax backend ``name`` with a score_mod and nothing else (no bias, no mask_mod)."""
    return softmax_backend(name)(
        q, k, v, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask, bias=None,
        mask_mod=None, score_mod=score_mod, scale=scale, return_lse=return_lse,
    )


def sample_pattern(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    """causal for the pattern; with ``rng``: top-left alignment, key padding and a scale at random."""
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    pad = sample_padding(p, rng)
    if pad is not None:
        params["key_padding_mask"] = pad
    if rng.random() < 0.3:
        params["scale"] = rng.choice((0.05, 0.5, 1.0))
    if rng.random() < 0.3:
        params["return_lse"] = True
    return params


def _result(out: Tensor, lse: Tensor, return_lse: bool) -> Any:
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# softcap
# --------------------------------------------------------------------------------------------
def _check_cap(value: Any, p: Problem) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not value > 0:
        return "a positive number (inf: no capping)"
    return None


PARAMS = (
    Param("cap", GEMMA2_ATTENTION_CAP, "the cap c of c * tanh(s / c) (Gemma 2: 50.0; inf: plain softmax)", _check_cap, (0.0, -1.0, float("nan"), "50", True), "float"),
    *pattern_params(),
    positive_number("scale", "multiplies q.k before the cap; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row's capped scores, (B, H, Nq)"),
)


@dataclass(frozen=True)
class _Softcap(masks.ScoreMod):
    """``cap * tanh(s / cap)``, NaN where the score is not finite: tanh(+-inf) is finite, which
    would let an inf in q or k vanish silently (the finite check reads the output)."""

    cap: float

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.cap * torch.tanh(score / self.cap) + (score - score)


def _score_mod(cap: float) -> Optional[Callable]:
    return None if math.isinf(cap) else _Softcap(float(cap))


def _reference(q, k, v, *, cap, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """Materialized scores, capped by c * tanh(s / c), masked, softmax: the spec."""

    def capped(s, b, h, qi, ki):
        return s if math.isinf(cap) else cap * torch.tanh(s / cap) + (s - s)

    out, lse = materialized_attention(q, k, v, scale=scale, allowed=allowed_pairs(q, k, causal, causal_alignment, key_padding_mask), score_mod=capped)
    return _result(out, lse, return_lse)


def _tiled(q, k, v, *, cap, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """softmax's tiled engine (FlashAttention-2 in PyTorch) with the cap as its score_mod."""
    return call_softmax("tiled", q, k, v, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask,
                        scale=scale, score_mod=_score_mod(cap), return_lse=return_lse)


def _flex(q, k, v, *, cap, causal, causal_alignment, key_padding_mask, scale, return_lse):
    """softmax's FlexAttention backend with the cap as its score_mod (compiled per shape)."""
    return call_softmax("flex", q, k, v, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask,
                        scale=scale, score_mod=_score_mod(cap), return_lse=return_lse)


def _flex_accepts(p: Problem, params: dict) -> Optional[str]:
    return flex_decline_reason(p, score_mod=_score_mod(params["cap"]), return_lse=params["return_lse"])


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params = sample_pattern(p, pattern, rng)
    if rng is not None and rng.random() < 0.7:
        params["cap"] = rng.choice((0.5, 1.0, 5.0, 50.0, float("inf")))
    return params


SOFTCAP = register(
    Mechanism(
        name="softcap",
        family="variants",
        catalog=("V8",),
        paper="Gemma 2 (Gemma Team, 2024), Sec. 3 'Logit soft-capping'; Small-scale proxies for large-scale Transformer training instabilities (Wortsman et al., 2023)",
        formula="out_i = sum_j softmax_j(mask(cap * tanh(scale q_i.k_j / cap))) v_j",
        cost="O(Nq * Nk * D) time; O(N) memory on tiled",
        summary="softmax attention over soft-capped logits cap * tanh(s / cap) (Gemma 2: cap 50); inf: plain softmax",
        patterns=frozenset(PATTERNS),
        params=PARAMS,
        gqa=True,
        decoder=PrefixDecoder("softcap", "new"),
        sample_params=_sample_params,
    )
)
SOFTCAP.add_backend(Backend("reference", _reference, doc="materialized scores, capped, masked softmax: the spec", priority=-100, materializes_scores=True))
SOFTCAP.add_backend(Backend("tiled", _tiled, doc="softmax's tiled FA2 engine with the cap as score_mod (O(N) memory, LSE)", priority=20, traceable=False))
SOFTCAP.add_backend(Backend("flex", _flex, doc="softmax's FlexAttention backend with the cap as score_mod", accepts=_flex_accepts, **FLEX_CAPABILITIES))


def softcap_attention(q: Tensor, k: Tensor, v: Tensor, *, cap: float = GEMMA2_ATTENTION_CAP, causal: bool = False, causal_alignment: str = "bottom_right",
                      key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None, return_lse: bool = False,
                      backend: Optional[str] = None) -> Any:
    """Softmax attention over soft-capped logits (catalog V8; Gemma 2's attention logit soft-capping).

    ``out_i = sum_j softmax_j(cap * tanh(scale q_i . k_j / cap)) v_j``, masked keys excluded.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        cap: c (Gemma 2: 50.0); ``float("inf")`` is plain softmax attention.
        causal, causal_alignment, key_padding_mask: as :func:`attnzoo.softmax_attention`.
        scale: multiplies q.k before the cap; default ``D ** -0.5``.
        return_lse: also return the LSE of each row's capped scores (B, Hq, Nq).

    Cost: O(Nq Nk D) time, O(N) memory (``tiled``). Paper: Gemma 2 (2024), Sec. 3.

    Example::

        >>> q = k = v = torch.randn(2, 4, 256, 64)
        >>> out = softcap_attention(q, k, v, cap=50.0, causal=True)
    """
    return SOFTCAP(q, k, v, backend=backend, cap=cap, causal=causal, causal_alignment=causal_alignment, key_padding_mask=key_padding_mask,
                   scale=scale, return_lse=return_lse)


SOFTCAP.function = softcap_attention
