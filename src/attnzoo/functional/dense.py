"""Dense, exact softmax attention (catalog D1-D3).

    out_i = sum_j softmax_j(s_ij) v_j,   s_ij = mask(score_mod(scale * q_i . k_j + bias_ij))

with ``mask`` setting to -inf the keys a query may not see (causal, key padding, ``mask_mod``).
The reference materializes the ``Nq x Nk`` scores; the fast backends do not:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash/efficient kernels);
* ``tiled``: FlashAttention-2 in PyTorch (:mod:`attnzoo.kernels.tiled`), O(N) memory, LSE,
  block skipping for causal and ``mask_mod`` patterns, its own FA2 backward;
* ``split_kv``: Lean Attention / FlashDecoding for few queries over a long cache
  (:mod:`attnzoo.kernels.split_kv`);
* ``flex``: FlexAttention (compiled; forward only on CPU).

Causal alignment when Nq != Nk: ``bottom_right`` (default, FlashAttention's: query i sees keys
``j <= i + Nk - Nq``, so the last query sees every key: the decoding convention) or
``top_left`` (``j <= i``, SDPA's ``is_causal``). A query that sees no key outputs 0 with
LSE -inf, never NaN.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import masks
from ..errors import ParameterError
from ..kernels import block_sparse
from ..kernels.flex import FLEX_CAPABILITIES, flex_forward
from ..kernels.flex import decline_reason as flex_decline_reason
from ..kernels.reference import materialized_attention
from ..kernels.sdpa import sdpa
from ..kernels.split_kv import split_kv_attention
from ..kernels.tiled import score_mod_grad_captures, tiled_attention
from ..registry import PATTERNS, Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from ._kv_cache import KVState

__all__ = ["softmax_attention", "SOFTMAX"]


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _check_padding(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    expected = f"None or a bool tensor of shape ({p.batch}, {p.kv_len}) on {p.device} (True = ignore the key)"
    if not isinstance(value, Tensor) or value.dtype != torch.bool or tuple(value.shape) != (p.batch, p.kv_len):
        return expected
    return None if value.device == p.device else expected


def _check_bias(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    target = (p.batch, p.q_heads, p.q_len, p.kv_len)
    expected = f"None or a floating tensor broadcastable to (B, H, Nq, Nk) = {target} on {p.device}"
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device or value.dim() > 4:
        return expected
    try:
        if torch.broadcast_shapes(tuple(value.shape), target) != target:
            return expected
    except RuntimeError:
        return expected
    return None


def _check_callable(value: Any, p: Problem) -> Optional[str]:
    return None if value is None or callable(value) else "None or a callable (b, h, q_idx, kv_idx)"


SOFTMAX_PARAMS = (
    flag("causal", False, "mask keys after the query (alignment: causal_alignment)"),
    choice(
        "causal_alignment",
        ("bottom_right", "top_left"),
        "bottom_right",
        "when Nq != Nk: bottom_right (the last query sees every key) or top_left",
    ),
    Param(
        "key_padding_mask",
        None,
        "(B, Nk) bool, True marks a key to ignore (nn.MultiheadAttention's convention)",
        _check_padding,
        (torch.zeros(1, dtype=torch.bool), torch.zeros(1, 1)),
        "Tensor | None",
    ),
    Param("bias", None, "additive bias broadcastable to (B, H, Nq, Nk)", _check_bias, (torch.zeros(3, 5, 7, 11, 13),), "Tensor | None"),
    Param(
        "mask_mod",
        None,
        "predicate (b, h, q_idx, kv_idx) -> bool, True = attend (attnzoo.masks)",
        _check_callable,
        (3,),
        "callable | None",
    ),
    Param(
        "score_mod",
        None,
        "(score, b, h, q_idx, kv_idx) -> score, applied after bias (attnzoo.masks)",
        _check_callable,
        ("softcap",),
        "callable | None",
    ),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


# --------------------------------------------------------------------------------------------
# the pattern, shared by the backends
# --------------------------------------------------------------------------------------------
def _pattern(nq: int, nk: int, causal: bool, alignment: str, mask_mod: Optional[Callable]) -> Optional[Callable]:
    """The mask predicate of a call (causal and/or the user's), without key padding."""
    parts = []
    if causal:
        parts.append(masks.causal(masks.causal_offset(nq, nk, alignment)))
    if mask_mod is not None:
        parts.append(mask_mod)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else masks.and_masks(*parts)


def _allowed(q: Tensor, k: Tensor, causal: bool, alignment: str, key_padding_mask: Optional[Tensor], mask_mod: Optional[Callable]) -> Optional[Tensor]:
    """The dense bool mask (B|1, H|1, Nq, Nk), True = attend, or None when nothing is masked."""
    b, h, nq = q.shape[:3]
    nk = k.shape[2]
    pattern = _pattern(nq, nk, causal, alignment, mask_mod)
    allowed = None
    if pattern is not None:
        allowed = masks.dense_mask(pattern, nq, nk, batch=b, heads=h, device=q.device)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.view(b, 1, 1, nk)
        allowed = keep if allowed is None else allowed & keep
    return allowed


def _result(out: Tensor, lse: Tensor, return_lse: bool) -> Any:
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# reference: the spec
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, causal, causal_alignment, key_padding_mask, bias, mask_mod, score_mod, scale, return_lse):
    """Materialized scores in float32 (float64 for float64 inputs): the obviously-right spec."""
    allowed = _allowed(q, k, causal, causal_alignment, key_padding_mask, mask_mod)
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=allowed, bias=bias, score_mod=score_mod)
    return _result(out, lse, return_lse)


# --------------------------------------------------------------------------------------------
# sdpa
# --------------------------------------------------------------------------------------------
def _sdpa_accepts(p: Problem, params: dict) -> Optional[str]:
    if params["return_lse"]:
        return "cannot return the LSE (use tiled, split_kv or flex)"
    if params["mask_mod"] is not None or params["score_mod"] is not None:
        return "takes no mask_mod/score_mod (tiled and flex do, without an Nq x Nk mask)"
    return None


def _sdpa(q, k, v, *, causal, causal_alignment, key_padding_mask, bias, mask_mod, score_mod, scale, return_lse):
    """torch.nn.functional.scaled_dot_product_attention; masks and bias folded into attn_mask."""
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    top_left = causal_alignment == "top_left" or nq == nk
    if bias is None and key_padding_mask is None and (not causal or top_left):
        return sdpa(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    allowed = _allowed(q, k, causal, causal_alignment, key_padding_mask, None)
    empty = None
    if allowed is not None:
        # Rows with no visible key: let them see everything (finite on every SDPA kernel), then
        # zero their output; their gradient is then exactly zero too.
        empty = ~allowed.any(-1, keepdim=True)
        allowed = allowed | empty
    if bias is not None:
        mask = bias.to(q.dtype)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
    else:
        mask = allowed
    out = sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out if empty is None else out.masked_fill(empty, 0.0)


# --------------------------------------------------------------------------------------------
# tiled (FlashAttention-2 in PyTorch)
# --------------------------------------------------------------------------------------------
def _tiled_accepts(p: Problem, params: dict) -> Optional[str]:
    score_mod = params["score_mod"]
    if score_mod is not None and torch.is_grad_enabled():
        captured = score_mod_grad_captures(score_mod)
        if captured:
            # its backward differentiates score_mod in the score only: these would get no gradient
            return f"score_mod captures tensors that require grad ({', '.join(captured)}): use the reference backend"
    return None


def _tiled(q, k, v, *, causal, causal_alignment, key_padding_mask, bias, mask_mod, score_mod, scale, return_lse):
    """FlashAttention-2 tiles with online softmax; skips tiles outside the causal/mask_mod pattern."""
    pattern = _pattern(q.shape[2], k.shape[2], causal, causal_alignment, mask_mod)
    out, lse = tiled_attention(
        q,
        k,
        v,
        plan=masks.plan_for(pattern, q.shape[2], k.shape[2], batch=q.shape[0], heads=q.shape[1]),
        scale=scale,
        mask_mod=pattern,
        score_mod=score_mod,
        bias=bias,
        key_padding_mask=key_padding_mask,
    )
    return _result(out, lse, return_lse)


def _fused_accepts(p: Problem, params: dict) -> Optional[str]:
    """The C++ block-sparse kernel: CPU, float32/bf16/f16, no bias or score_mod, built here."""
    if params["bias"] is not None or params["score_mod"] is not None:
        return "takes no bias or score_mod (tiled and flex do)"
    return block_sparse.decline_reason(p)


def _fused(q, k, v, *, causal, causal_alignment, key_padding_mask, bias, mask_mod, score_mod, scale, return_lse):
    """The C++ block-sparse FA2 kernel over the 64x64 blocks the causal/mask_mod pattern touches."""
    b, h, nq = q.shape[:3]
    nk = k.shape[2]
    pattern = _pattern(nq, nk, causal, causal_alignment, mask_mod)
    if pattern is None:
        plan = block_sparse.SparsePlan.dense(nq, nk)
    else:
        plan = block_sparse.SparsePlan.from_mask(pattern, nq, nk, batch=b, heads=h)
    out, lse = block_sparse.block_sparse_attention(q, k, v, plan, scale=scale, key_padding_mask=key_padding_mask)
    return _result(out, lse, return_lse)


# --------------------------------------------------------------------------------------------
# split-KV decode (Lean Attention)
# --------------------------------------------------------------------------------------------
SPLIT_KV_MAX_QUERIES = 16
SPLIT_KV_MIN_KEYS = 4096


def _split_kv_prefers(p: Problem, params: dict) -> Optional[str]:
    """For decoding (<= 16 queries over >= 4096 keys) with GQA, fewer (batch x KV heads) than threads, or what SDPA cannot do."""
    if p.q_len > SPLIT_KV_MAX_QUERIES:
        return f"meant for decoding: at most {SPLIT_KV_MAX_QUERIES} queries, got {p.q_len}"
    if p.kv_len < SPLIT_KV_MIN_KEYS:
        return f"meant for long contexts: at least {SPLIT_KV_MIN_KEYS} keys, got {p.kv_len}"
    # Measured on CPU (1 query, 64k keys): 2.2x faster than SDPA with 32 query heads on 8 KV
    # heads (the group's queries share one read of K and V), 1.2x with B x H = 1 (SDPA leaves
    # threads idle), but 5-19% slower with B x H >= threads and no GQA.
    sdpa_declines = _sdpa_accepts(p, params) is not None  # LSE, mask_mod, score_mod: tiled is far slower here
    if p.group_size == 1 and p.batch * p.kv_heads >= torch.get_num_threads() and not sdpa_declines:
        return "SDPA is faster without GQA when batch x heads fills the threads"
    return None


def _split_kv(q, k, v, *, causal, causal_alignment, key_padding_mask, bias, mask_mod, score_mod, scale, return_lse):
    """Few queries over many keys: up to 32 key chunks attended in parallel, merged by their LSE."""
    allowed = _allowed(q, k, causal, causal_alignment, key_padding_mask, mask_mod)
    out, lse = split_kv_attention(q, k, v, scale=scale, allowed=allowed, bias=bias, score_mod=score_mod)
    return _result(out, lse, return_lse)


# --------------------------------------------------------------------------------------------
# flex (FlexAttention)
# --------------------------------------------------------------------------------------------
def _flex_accepts(p: Problem, params: dict) -> Optional[str]:
    """CPU: head dims >= 32, forward only, no LSE; CUDA: head dims >= 16 (gradients, a learnable
    bias or score_mod capture, and the LSE all go through FlexAttention's own backward)."""
    return flex_decline_reason(p, score_mod=params["score_mod"], return_lse=params["return_lse"])


def _flex(q, k, v, *, causal, causal_alignment, key_padding_mask, bias, mask_mod, score_mod, scale, return_lse):
    """torch.compile'd FlexAttention with the pattern as a BlockMask (the first call per shape compiles)."""
    b, h, nq = q.shape[:3]
    nk = k.shape[2]
    pattern = _pattern(nq, nk, causal, causal_alignment, mask_mod)
    if key_padding_mask is not None:
        pad = key_padding_mask

        def keep_key(bi, hi, qi, ki):
            return ~pad[bi, ki]

        pattern = keep_key if pattern is None else masks.and_masks(pattern, keep_key)
    block_mask = None if pattern is None else masks.flex_block_mask(pattern, nq, nk, batch=b, heads=h, device=q.device)
    return flex_forward(q, k, v, block_mask=block_mask, scale=scale, score_mod=score_mod, bias=bias, return_lse=return_lse)


# --------------------------------------------------------------------------------------------
# decoding: a KV cache
# --------------------------------------------------------------------------------------------
class _SoftmaxDecoder:
    """Incremental decoding: append to the cache, attend causally (bottom-right) over it.

    ``causal`` and ``causal_alignment`` are not read (decoding is causal, bottom-right);
    ``scale`` and ``score_mod`` are bound at init_state.
    """

    per_step = frozenset({"causal", "causal_alignment", "key_padding_mask", "bias", "mask_mod", "return_lse"})

    def init_state(self, problem: Problem, **params: Any) -> KVState:
        _refuse_while_decoding(params)
        return KVState()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: KVState, **params: Any) -> tuple[Any, KVState]:
        _refuse_while_decoding(params)
        copy = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        state = state.append(k, v, copy=copy)
        score_mod = _at_absolute_positions(params.get("score_mod"), state.length - q.shape[2])
        out = SOFTMAX(q, state.k, state.v, causal=True, scale=params.get("scale"), score_mod=score_mod, return_lse=params.get("return_lse", False))
        return out, state


def _at_absolute_positions(score_mod: Any, shift: int) -> Any:
    """A score_mod that places queries by an ``offset`` field (``masks.alibi``: query i at key
    position i + offset) moved by ``shift``, so the step's queries sit where they do in the whole
    sequence; other score_mods see the step's own query indices (0..T-1)."""
    if not shift or not (dataclasses.is_dataclass(score_mod) and isinstance(getattr(score_mod, "offset", None), int)):
        return score_mod
    return dataclasses.replace(score_mod, offset=score_mod.offset + shift)


def _refuse_while_decoding(params: dict) -> None:
    for name in ("key_padding_mask", "bias", "mask_mod"):
        if params.get(name) is not None:
            raise ParameterError(f"softmax: {name}: not supported while decoding (pass None)", argument=name)


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    """Parameters for ``pattern``: plain without ``rng``, else each option on at random (tests)."""
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    if rng.random() < 0.3:
        pad = torch.rand(p.batch, p.kv_len, generator=gen) < rng.choice((0.2, 0.6))
        if rng.random() < 0.3:
            pad[0] = True  # a batch entry with every key ignored: zeros, not NaN
        params["key_padding_mask"] = pad.to(p.device)
    if rng.random() < 0.3:
        shape = rng.choice(
            ((p.batch, p.q_heads, p.q_len, p.kv_len), (p.q_heads, p.q_len, p.kv_len), (p.batch, 1, 1, p.kv_len), (p.q_len, p.kv_len))
        )
        params["bias"] = torch.randn(shape, generator=gen).to(device=p.device, dtype=p.dtype)
    if rng.random() < 0.25:
        params["mask_mod"] = rng.choice(
            (
                masks.sliding_window(rng.randrange(0, 9), rng.randrange(0, 9)),
                masks.prefix_lm(rng.randrange(0, 5)),
                lambda b, h, qi, ki: (qi + ki + h) % 3 != 0,  # a scattered pattern, batch/head dependent
            )
        )
    if rng.random() < 0.25:
        params["score_mod"] = rng.choice((masks.softcap(rng.choice((1.0, 5.0))), masks.alibi(p.q_heads)))
    if rng.random() < 0.3:
        params["return_lse"] = True
    if rng.random() < 0.2:
        params["scale"] = rng.choice((0.05, 0.5, 1.0))
    return params


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
SOFTMAX = register(
    Mechanism(
        name="softmax",
        family="dense",
        catalog=("D1", "D2", "D3", "L9"),
        paper="Attention Is All You Need; FlashAttention-2 (Dao, 2023); Lean Attention (Sanovar et al., 2024)",
        formula="out_i = sum_j softmax_j(mask(score_mod(scale * q_i . k_j + bias_ij))) v_j",
        cost="O(Nq * Nk * D) time; O(Nq * Nk) memory (reference, sdpa with a mask), O(N) (tiled, sdpa flash)",
        summary="exact softmax attention: causal (both alignments), key padding, bias, GQA/MQA, mask_mod/score_mod, LSE",
        patterns=frozenset(PATTERNS),
        params=SOFTMAX_PARAMS,
        gqa=True,
        decoder=_SoftmaxDecoder(),
        sample_params=_sample_params,
    )
)
SOFTMAX.add_backend(
    Backend("reference", _reference, doc="materialized scores in float32/float64: the spec", priority=-100, materializes_scores=True)
)
SOFTMAX.implementation("sdpa", accepts=_sdpa_accepts, priority=50)(_sdpa)
SOFTMAX.implementation(
    "split_kv",
    prefers=_split_kv_prefers,
    priority=60,
    materializes_scores=True,  # Nq x Nk, small for the few queries it is meant for
)(_split_kv)
# traceable=False: its BlockPlan is built from tensor values (torch.compile would break the graph)
SOFTMAX.implementation("tiled", accepts=_tiled_accepts, priority=20, traceable=False)(_tiled)
SOFTMAX.implementation("flex", accepts=_flex_accepts, **FLEX_CAPABILITIES)(_flex)
SOFTMAX.implementation("fused", accepts=_fused_accepts, **block_sparse.FUSED_CAPABILITIES)(_fused)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    key_padding_mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    mask_mod: Optional[Callable] = None,
    score_mod: Optional[Callable] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Exact softmax attention (catalog D1), dispatched to the best backend for the inputs.

    ``out_i = sum_j softmax_j(s_ij) v_j`` with ``s_ij = score_mod(scale * q_i . k_j + bias_ij)``
    and -inf where the pattern hides key j from query i (``causal``, ``key_padding_mask``,
    ``mask_mod``).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv (GQA/MQA). v: (B, Hkv, Nk, Dv).
        causal: hide keys after the query. When Nq != Nk, ``causal_alignment`` says where the
            queries sit: ``"bottom_right"`` (default; query i sees keys j <= i + Nk - Nq, the
            last query sees all, as in FlashAttention and decoding) or ``"top_left"`` (j <= i).
        key_padding_mask: (B, Nk) bool, True marks a key to ignore.
        bias: additive, broadcastable to (B, Hq, Nq, Nk); differentiable.
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` (True = attend); see :mod:`attnzoo.masks`.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score``, e.g. ``masks.softcap(30.0)``.
        scale: defaults to ``D ** -0.5``.
        return_lse: also return ``lse`` (B, Hq, Nq) in float32: -inf for a row with no key.
        backend: force ``reference``, ``sdpa``, ``tiled``, ``split_kv`` or ``flex``.

    Returns:
        ``out`` (B, Hq, Nq, Dv), or ``(out, lse)``. A row that sees no key outputs zeros.

    Cost: O(Nq * Nk * D) time; memory O(N) on ``tiled``/``split_kv``/SDPA's flash kernel.
    Paper: FlashAttention-2 (Dao, 2023) for ``tiled``; Lean Attention for ``split_kv``.

    Example::

        >>> q = k = v = torch.randn(2, 8, 1024, 64)
        >>> out = softmax_attention(q, k, v, causal=True)
        >>> out, lse = softmax_attention(q, k, v, return_lse=True)  # picks tiled
    """
    return SOFTMAX(
        q,
        k,
        v,
        backend=backend,
        causal=causal,
        causal_alignment=causal_alignment,
        key_padding_mask=key_padding_mask,
        bias=bias,
        mask_mod=mask_mod,
        score_mod=score_mod,
        scale=scale,
        return_lse=return_lse,
    )


SOFTMAX.function = softmax_attention
