"""TransNormer's two attentions (catalog F7): NormAttention and DiagAttention.

Qin et al., EMNLP 2022, "The Devil in Linear Transformer" (official code: OpenNLPLab/Transnormer,
whose layers live in OpenNLPLab/fairseq-evo, ``NormLinearAttention`` and ``NormLocalAttention``).
The paper finds that the scaling of linear attention (the division by ``phi(q_i) . sum_j
phi(k_j)``) makes its gradients unbounded (Sec. 3), and that linear attention spreads its
weight over the whole sequence in early layers ("attention dilution", also Sec. 3). TransNormer
answers each with one attention (Sec. 4; only the paper's abstract and summaries of it were
reachable when this was written, so every detail below follows the official code, read in full):

**NormAttention** (mechanism ``transnormer``, Sec. 4): no denominator; a normalization of the
output takes its place::

    out_i = XNorm( sum_(j visible) (phi(q_i) . phi(k_j)) v_j )

XNorm is LayerNorm or RMSNorm (``norm``); the official layer normalizes the H x Dv channels of a
token together, after merging the heads (``LayerNorm(embed_dim)``: ``norm_scope="token"``, the
default), ``"head"`` normalizes each head alone. q is not scaled (the official code leaves
``q *= scaling`` commented out; a norm of the output makes a scale moot for ``relu`` and
``identity``). The kernel phi is ``elu`` (elu + 1, this library's name), ``relu``, ``identity``
or a callable; the official language-model configurations use ``F.elu`` itself (no + 1):
pass ``feature_map=torch.nn.functional.elu`` for it. The norm's learnable gain and bias are
inputs (``norm_weight``, ``norm_bias``); :class:`attnzoo.nn.TransNormerAttention` holds them.
Runs on the linear-attention engine: ``chunked`` (Lightning Attention-2 tiling, O(N (L F + F
Dv))), ``recurrent``, and decoding with an F x Dv state per head (the norm is per token).

**DiagAttention** (mechanism ``transnormer_diag``, Sec. 4): attention restricted to the
non-overlapping diagonal blocks of ``block_size`` tokens (causal inside a block when causal)::

    out_i = sum_(j in block(i), visible) w_ij v_j,   w_i = softmax_j(s q_i . k_j)  (kernel="softmax")
                                                     w_ij = relu(s q_i . k_j)        (kernel="relu")

The paper describes vanilla (softmax) attention inside the blocks; the official fairseq-evo
language-model configurations set ``local_act_fun="relu"`` (unnormalized ReLU weights, the
layer's output norm following), hence ``kernel``. Both scale q by D^-0.5 as the official code.
The last block is shorter when block_size does not divide N; a block_size above N is one
block (full attention). ``blocks`` runs every full block in one batched call (SDPA for softmax)
and the short tail in a second: O(N w D), no padding, no mask. Decoding keeps the keys and
values of the current block: at most w - 1 tokens, whatever the context length.

Why two mechanisms and not one with ``kind="norm" | "diag"``: they share no parameter but
``causal`` (feature map and norm against block size and kernel), no backend (the linear engine
against block-wise softmax), nor decoding state (an F x Dv sum against the last block's keys);
one registry entry would need every capability declared per kind. The module
:class:`attnzoo.nn.TransNormerAttention` has ``kind``: it is the layer, and the paper stacks
DiagAttention layers first, NormAttention layers after. The paper's later causal variant with a
decay (TransNormerLLM) is ``retention`` with its decays; not repeated here.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ParameterError
from ...kernels.linear_scan import fused_causal_forward, parallel_scores
from ...kernels.sdpa import sdpa
from ...registry import PATTERNS, Backend, DecodingState, Mechanism, Param, Problem, choice, flag, positive_number, register
from ._shared import (
    Operands,
    ScanDecoder,
    add_form_backends,
    chunk_size_param,
    compute_dtype,
    expand_heads,
    is_int,
    key_padding_param,
    padded_keys,
    refuse_unless_right_padded,
    sample_padding,
    zero_padded,
)
from .feature_maps import feature_count, feature_map_check, feature_map_for, softplus
from .linear import keys_with_zero_features

__all__ = [
    "transnormer_attention",
    "transnormer_diag_attention",
    "normalize_output",
    "TRANSNORMER",
    "TRANSNORMER_DIAG",
    "DiagState",
]

NORM_FEATURE_MAPS = ("elu", "relu", "identity")
NORMS = ("layer", "rms")
NORM_SCOPES = ("token", "head")
DEFAULT_NORM_EPS = {"layer": 1e-5, "rms": 1e-8}  # nn.LayerNorm's; the official RMSNorm's


# --------------------------------------------------------------------------------------------
# the output normalization (XNorm), shared by NormAttention and the module's DiagAttention
# --------------------------------------------------------------------------------------------
def _norm_eps(norm: str, eps: Optional[float]) -> float:
    return DEFAULT_NORM_EPS[norm] if eps is None else eps


def _gain(t: Optional[Tensor], heads: int, like: Tensor) -> Optional[Tensor]:
    """A (Dv,) or (H, Dv) gain/bias as (H, Dv) in the dtype of ``like``, or None."""
    if t is None:
        return None
    t = t.to(like.dtype)
    return t.expand(heads, t.shape[-1]) if t.dim() == 1 else t


def normalize_output(
    out: Tensor, *, norm: str = "layer", scope: str = "token", weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: Optional[float] = None
) -> Tensor:
    """XNorm of an attention output (B, H, N, Dv): LayerNorm or RMSNorm over each token's H x Dv
    channels (``scope="token"``, as the official layer after merging the heads) or each head's Dv.

    ``weight``/``bias`` (Dv,) or (H, Dv); RMSNorm is ``x / sqrt(mean(x^2) + eps)`` (eps inside the
    root, as ``F.rms_norm``: the official RMSNorm adds its 1e-8 to the root, the same but for
    outputs within ~1e-4 of zero). Fused ``F.layer_norm``/``F.rms_norm`` over the trailing dims.
    """
    heads, dv = out.shape[1], out.shape[-1]
    w, b = _gain(weight, heads, out), _gain(bias, heads, out)
    e = _norm_eps(norm, eps)
    if scope == "head":  # per-head gains do not fit the fused ops' (Dv,) weight: applied after
        y = F.layer_norm(out, (dv,), eps=e) if norm == "layer" else F.rms_norm(out, (dv,), eps=e)
        y = y if w is None else y * w.unsqueeze(1)
        return y if b is None else y + b.unsqueeze(1)
    x = out.transpose(1, 2)  # (B, N, H, Dv): a token's channels last
    y = F.layer_norm(x, (heads, dv), w, b, e) if norm == "layer" else F.rms_norm(x, (heads, dv), w, e)
    if norm == "rms" and b is not None:
        y = y + b
    return y.transpose(1, 2)


def _normalize_reference(out: Tensor, params: dict) -> Tensor:
    """XNorm written out: mean and variance (or mean square) over the normalized channels."""
    dims = (-1,) if params["norm_scope"] == "head" else (1, -1)
    eps = _norm_eps(params["norm"], params["norm_eps"])
    if params["norm"] == "layer":
        centered = out - out.mean(dims, keepdim=True)
        y = centered / torch.sqrt(centered.square().mean(dims, keepdim=True) + eps)
    else:
        y = out / torch.sqrt(out.square().mean(dims, keepdim=True) + eps)
    heads = out.shape[1]
    weight, bias = _gain(params["norm_weight"], heads, out), _gain(params["norm_bias"], heads, out)
    if weight is not None:
        y = y * weight.unsqueeze(1)
    if bias is not None:
        y = y + bias.unsqueeze(1)
    return y


# --------------------------------------------------------------------------------------------
# NormAttention: parameters
# --------------------------------------------------------------------------------------------
def _check_gain(value: Any, p: Problem) -> Optional[str]:
    expected = f"None or a floating tensor of shape (Dv={p.value_dim},) or (H={p.q_heads}, Dv={p.value_dim}) on {p.device}"
    if value is None:
        return None
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device:
        return expected
    return None if tuple(value.shape) in ((p.value_dim,), (p.q_heads, p.value_dim)) else expected


def _check_norm_eps(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) < float("inf")):
        return "None (1e-5 for layer, 1e-8 for rms) or a finite positive number"
    return None


TRANSNORMER_PARAMS = (
    Param(
        "feature_map",
        "elu",
        "phi: 'elu' (elu + 1), 'relu', 'identity', a callable x (B, H, N, D) -> (B, H, N, F), or a pair (phi_q, phi_k); "
        "the official configs use torch.nn.functional.elu",
        feature_map_check(NORM_FEATURE_MAPS),
        ("softmax_kernel", 3, ("elu",)),
        "str | callable | (callable, callable)",
    ),
    flag("causal", False, "each query sees the keys up to its position (bottom-right when Nq != Nk)"),
    choice("norm", NORMS, "layer", "XNorm: LayerNorm ('layer', the official default) or RMSNorm ('rms')"),
    choice("norm_scope", NORM_SCOPES, "token", "normalize each token's H x Dv channels together ('token', the official layer) or each head's Dv"),
    Param("norm_weight", None, "the norm's gain, (Dv,) or (H, Dv) (attnzoo.nn.TransNormerAttention holds it)", _check_gain, (torch.zeros(2, 2, 2), 1.0), "Tensor | None"),
    Param("norm_bias", None, "the norm's bias, (Dv,) or (H, Dv)", _check_gain, (torch.zeros(2, 2, 2), 1.0), "Tensor | None"),
    Param("norm_eps", None, "added to the variance (mean square); None: 1e-5 (layer), 1e-8 (rms)", _check_norm_eps, (0.0, -1.0, float("nan"), "1"), "float | None"),
    key_padding_param(),
    chunk_size_param(),
)
_NORM_DEFAULTS = {p.name: p.default for p in TRANSNORMER_PARAMS}


# --------------------------------------------------------------------------------------------
# NormAttention: operands, reference, fast forms
# --------------------------------------------------------------------------------------------
def _operands(q: Tensor, k: Tensor, v: Tensor, params: dict) -> Operands:
    """phi(q), phi(k), v (no normalizer column: there is no denominator), float32 for half inputs."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    heads, pad = q.shape[1], padded_keys(params)
    q, k, v = q.to(dtype), expand_heads(k, heads).to(dtype), expand_heads(v, heads).to(dtype)
    if params["feature_map"] == "identity":
        return Operands(q, zero_padded(k, pad), v, None, out_dtype)
    maps = feature_map_for(params["feature_map"], head_dim=q.shape[-1], scale=1.0, device=q.device)
    return Operands(maps.query(q), zero_padded(maps.key(k), pad), v, None, out_dtype)


def _finish(out: Tensor, params: dict, nq: int, nk: int) -> Tensor:
    return normalize_output(
        out, norm=params["norm"], scope=params["norm_scope"], weight=params["norm_weight"], bias=params["norm_bias"], eps=params["norm_eps"]
    )


def _fused(q: Tensor, k: Tensor, v: Tensor, params: dict) -> Optional[Tensor]:
    """The maps the C++ kernel knows in one call, then the norm; else None. Padded raw keys are
    replaced by keys whose feature is 0 (:func:`~.linear.keys_with_zero_features`)."""
    k = keys_with_zero_features(k, params)
    if k is None:
        return None
    out = fused_causal_forward(q, k, v, feature_map=params["feature_map"], chunk_size=params["chunk_size"], dtype=compute_dtype(q.dtype))
    return None if out is None else _finish(out, params, q.shape[2], k.shape[2]).to(q.dtype)


def _reference(q, k, v, **params):
    """phi(q) phi(k)^T materialized (future masked), times v, then XNorm written out."""
    ops = _operands(q, k, v, params)
    out = parallel_scores(ops.q, ops.k, causal=params["causal"]) @ ops.v
    return _normalize_reference(out, params).to(q.dtype)



def _sample_norm_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def randn(*shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(device=p.device, dtype=p.dtype)

    choice_ = rng.choice(NORM_FEATURE_MAPS + ("callable", "pair", "plain elu"))
    params["feature_map"] = {"callable": softplus, "pair": (torch.sigmoid, softplus), "plain elu": F.elu}.get(choice_, choice_)
    params["norm"] = rng.choice(NORMS)
    params["norm_scope"] = rng.choice(NORM_SCOPES)
    for name in ("norm_weight", "norm_bias"):
        if rng.random() < 0.4:
            shape = (p.value_dim,) if rng.random() < 0.5 else (p.q_heads, p.value_dim)
            params[name] = randn(*shape, std=0.2, mean=1.0 if name == "norm_weight" else 0.0)
    if rng.random() < 0.2:
        params["norm_eps"] = rng.choice((1e-6, 1e-3))
    params["chunk_size"] = rng.choice((1, 2, 3, 7, 16, 64))
    params["key_padding_mask"] = sample_padding(p, rng)
    return params


def _norm_state_size(head_dim: int, value_dim: Optional[int] = None, **params: Any) -> int:
    """F x Dv per head (sum_j phi(k_j)^T v_j; no normalizer column): F = D for elu, relu, identity."""
    fmap = params.get("feature_map", _NORM_DEFAULTS["feature_map"])
    return feature_count(fmap, head_dim) * (head_dim if value_dim is None else value_dim)


TRANSNORMER = register(
    Mechanism(
        name="transnormer",
        family="linear",
        catalog=("F7",),
        paper="The Devil in Linear Transformer (Qin et al., EMNLP 2022), Sec. 4, NormAttention",
        formula="out_i = XNorm(sum_(j visible) (phi(q_i) . phi(k_j)) v_j), XNorm = LayerNorm | RMSNorm over the token's channels",
        cost="O(N (L F + F Dv)) time, O(N L + N F Dv / L) memory (chunked, L = chunk_size); O(Nq Nk) (reference)",
        summary="TransNormer's NormAttention: linear attention without the denominator, the output normalized instead; causal or not",
        patterns=frozenset(PATTERNS),
        params=TRANSNORMER_PARAMS,
        gqa=True,
        exact=True,
        decoder=ScanDecoder("transnormer", _operands, _finish),
        sample_params=_sample_norm_params,
        state_size=_norm_state_size,
    )
)
TRANSNORMER.add_backend(
    Backend("reference", _reference, doc="the scores materialized, XNorm written out: the spec", priority=-100, materializes_scores=True)
)
add_form_backends(TRANSNORMER, _operands, _finish, _fused)


def transnormer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: Any = "elu",
    causal: bool = False,
    norm: str = "layer",
    norm_scope: str = "token",
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    norm_eps: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    chunk_size: int = 64,
    backend: Optional[str] = None,
) -> Tensor:
    """TransNormer's NormAttention (Qin et al., EMNLP 2022, Sec. 4; catalog F7).

    ::

        out_i = XNorm( sum_j (phi(q_i) . phi(k_j)) v_j )

    over every key, or with ``causal`` over the keys j <= i + Nk - Nq: linear attention without
    its denominator ("scaling"), whose output is normalized instead (LayerNorm or RMSNorm), which
    keeps the gradients bounded (the paper's Sec. 3 and 4). q is not scaled.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        feature_map: ``"elu"`` (elu + 1), ``"relu"``, ``"identity"``, a callable ``phi(x)`` or a
            pair ``(phi_q, phi_k)``; the official configs use ``torch.nn.functional.elu``.
        causal: each query sees the keys up to its position, bottom-right aligned.
        norm: ``"layer"`` (LayerNorm, the official default) or ``"rms"`` (RMSNorm).
        norm_scope: ``"token"`` normalizes each token's H x Dv channels together (the official
            layer, a norm over the merged heads), ``"head"`` each head's Dv channels.
        norm_weight, norm_bias: the norm's gain and bias, (Dv,) or (H, Dv), or None.
        norm_eps: added under the root; None: 1e-5 (layer), 1e-8 (rms).
        key_padding_mask: (B, Nk) bool, **True = ignore that key**: its features phi(k) are
            zeroed, so a padded batch equals each sequence alone on its real rows (either side).
            A query that sees no real key normalizes a zero vector: ``norm_bias`` (0 without).
        chunk_size: tokens per chunk of the ``chunked`` backend (need not divide N).
        backend: force ``chunked`` (default), ``reference`` or ``recurrent``.

    Returns:
        (B, Hq, Nq, Dv), in the dtype of q (computed in float32 for half inputs).

    Cost: O(N (L F + F Dv)) time on ``chunked``; causal decoding (``init_state``/``step``) keeps
    F x Dv numbers per head whatever the context length.

    Example::

        >>> q = k = v = torch.randn(1, 8, 4096, 64)
        >>> out = transnormer_attention(q, k, v, causal=True, norm="rms")
    """
    return TRANSNORMER(
        q,
        k,
        v,
        backend=backend,
        feature_map=feature_map,
        causal=causal,
        norm=norm,
        norm_scope=norm_scope,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        norm_eps=norm_eps,
        key_padding_mask=key_padding_mask,
        chunk_size=chunk_size,
    )


TRANSNORMER.function = transnormer_attention


# --------------------------------------------------------------------------------------------
# DiagAttention: parameters
# --------------------------------------------------------------------------------------------
KERNELS = ("softmax", "relu")
DEFAULT_BLOCK = 64  # the official configs use 32 (WikiText-103 T1) and 64


def _check_block_size(value: Any, p: Problem) -> Optional[str]:
    return None if is_int(value) and value >= 1 else "a positive int (tokens per diagonal block; above N: one block)"


DIAG_PARAMS = (
    Param("block_size", DEFAULT_BLOCK, "tokens per diagonal block (the last one shorter when it does not divide N)", _check_block_size, (0, -4, 2.5, "64", True), "int"),
    flag("causal", False, "causal inside each block"),
    choice("kernel", KERNELS, "softmax", "weights inside a block: softmax (the paper) or unnormalized relu (the official configs' local_act_fun)"),
    positive_number("scale", "multiplies q . k; default head_dim ** -0.5 (the official code scales q)"),
    key_padding_param(
        "(B, N) bool, True = ignore that key (torch.nn.MultiheadAttention's convention): masked inside the blocks; "
        "padding on the right only (the blocks are cut from position 0, pads before a sequence would move them)"
    ),
)
_DIAG_PADDING_WHY = "the blocks are cut from position 0 of the padded sequence, so pads before a real token move its block boundaries"


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


# --------------------------------------------------------------------------------------------
# DiagAttention: reference, blocks, decoding
# --------------------------------------------------------------------------------------------
def _diag_reference(q, k, v, *, block_size, causal, kernel, scale, key_padding_mask=None):
    """All Nq x Nk scores, the pairs outside the query's block (or in its future, or padded) masked."""
    refuse_unless_right_padded("transnormer_diag", key_padding_mask, _DIAG_PADDING_WHY)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    heads, n = q.shape[1], q.shape[2]
    q, k, v = q.to(dtype), expand_heads(k, heads).to(dtype), expand_heads(v, heads).to(dtype)
    pos = torch.arange(n, device=q.device)
    visible = (pos.view(-1, 1) // block_size) == (pos.view(1, -1) // block_size)
    if causal:
        visible &= pos.view(1, -1) <= pos.view(-1, 1)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) * _scale(q, scale)
    if kernel == "softmax":
        seen = visible.any(-1, keepdim=True)  # a row with no visible key outputs 0, not NaN
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")).masked_fill(~seen, 0), dim=-1) * seen
    else:
        weights = torch.relu(scores) * visible
    return (weights @ v).to(out_dtype)


def _attend_blocks(q: Tensor, k: Tensor, v: Tensor, causal: bool, kernel: str, scale: float, keep: Optional[Tensor] = None) -> Tensor:
    """(..., w, D) blocks attended inside themselves: SDPA for softmax, two GEMMs for relu.

    ``keep`` (..., 1, w) bool marks the real keys of each block (None: all). A softmax row with
    no visible key attends to its whole block instead (so SDPA sees no all -inf row, whose NaN
    would reach the gradients) and is then set to 0."""
    if kernel == "softmax":
        if keep is None:
            return sdpa(q, k, v, is_causal=causal, scale=scale)
        w = k.shape[-2]
        allowed = keep.expand(*keep.shape[:-2], q.shape[-2], w)
        if causal:
            allowed = allowed & torch.ones(q.shape[-2], w, dtype=torch.bool, device=q.device).tril()
        seen = allowed.any(-1, keepdim=True)
        return sdpa(q, k, v, attn_mask=allowed | ~seen, scale=scale).masked_fill(~seen, 0)
    dtype = compute_dtype(q.dtype)
    weights = torch.relu((q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale)
    if causal:
        weights = weights.tril()  # relu saved its output: no in-place mask
    if keep is not None:
        weights = weights * keep
    return (weights @ v.to(dtype)).to(q.dtype)


def _split(x: Tensor, full: int, block_size: int) -> tuple[Tensor, Tensor]:
    """(B, H, N, ·) -> its full blocks as (B, H * N // w, w, ·) and its tail (B, H, N % w, ·)."""
    b, h, _, d = x.shape
    blocks = x[:, :, :full].reshape(b, h * (full // block_size), block_size, d)
    return blocks, x[:, :, full:]


def _block_keep(pad: Optional[Tensor], n: int, heads: int, full: int, w: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The real keys of the full blocks, (B, H * full // w, 1, w), and of the tail, (B, 1, 1, N - full).

    A decoding step's mask covers its new keys only: the cached keys before them (the open
    block's start) are real, since with padding on the right no real token follows a pad."""
    if pad is None:
        return None, None
    keep = ~pad
    if keep.shape[1] < n:
        keep = torch.cat([keep.new_ones(keep.shape[0], n - keep.shape[1]), keep], dim=1)
    blocks = keep[:, :full].reshape(keep.shape[0], 1, full // w, 1, w).expand(-1, heads, -1, -1, -1).reshape(keep.shape[0], -1, 1, w)
    return blocks, keep[:, None, None, full:]


def _diag_blocks(q, k, v, *, block_size, causal, kernel, scale, key_padding_mask=None):
    """Full blocks in one batched call, the short last block in a second: no padding of the blocks."""
    refuse_unless_right_padded("transnormer_diag", key_padding_mask, _DIAG_PADDING_WHY)
    heads, n = q.shape[1], q.shape[2]
    k, v = expand_heads(k, heads), expand_heads(v, heads)
    s = _scale(q, scale)
    w = min(block_size, n)
    full = n // w * w
    keep_blocks, keep_tail = _block_keep(key_padding_mask, n, heads, full, w)
    parts = []
    if full:
        qb, q_tail = _split(q, full, w)
        kb, k_tail = _split(k, full, w)
        vb, v_tail = _split(v, full, w)
        parts.append(_attend_blocks(qb, kb, vb, causal, kernel, s, keep_blocks).reshape(q.shape[0], heads, full, v.shape[-1]))
    else:
        q_tail, k_tail, v_tail = q, k, v
    if full < n:
        parts.append(_attend_blocks(q_tail, k_tail, v_tail, causal, kernel, s, keep_tail))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


@dataclass
class DiagState(DecodingState):
    """Causal decoding state: the keys and values of the current, unfinished block (at most
    block_size - 1 tokens, (B, H, t, ·)), and ``seen``, the tokens folded in so far."""

    seen: int = 0
    k: Optional[Tensor] = None
    v: Optional[Tensor] = None


class DiagDecoder:
    """Append tokens to the current block: the cached tokens start at a block boundary, so
    [cache, new] runs through the ``blocks`` path (cached positions with zero queries, dropped).
    ``block_size``, ``kernel``, ``scale`` and ``causal`` are bound at init_state; each step makes
    a new state."""

    per_step = frozenset({"key_padding_mask"})

    def init_state(self, problem: Problem, **params: Any) -> DiagState:
        return DiagState()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: DiagState, **params: Any) -> tuple[Tensor, DiagState]:
        if not params["causal"]:
            raise ParameterError(
                "transnormer_diag: causal: decoding needs causal=True (a bidirectional block depends on later tokens)", argument="causal"
            )
        if q.shape[2] != k.shape[2]:
            raise ParameterError(f"transnormer_diag: q: a decoding step takes one query per new key, got {q.shape[2]} and {k.shape[2]}", argument="q")
        heads = q.shape[1]
        k, v = expand_heads(k, heads), expand_heads(v, heads)
        cached = 0 if state.k is None else state.k.shape[2]
        if cached:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
            q = torch.cat([q.new_zeros(*q.shape[:2], cached, q.shape[-1]), q], dim=2)
        out = _diag_blocks(q, k, v, **params)[:, :, cached:]
        seen = state.seen + out.shape[2]
        keep = seen % params["block_size"]  # tokens of the block still open
        # copies: views would keep the whole step's keys (or the caller's tensors) alive in the state
        tail_k, tail_v = (k[:, :, k.shape[2] - keep :].clone(), v[:, :, v.shape[2] - keep :].clone()) if keep else (None, None)
        return out, dataclasses.replace(state, seen=seen, k=tail_k, v=tail_v)


def _sample_diag_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    params["block_size"] = rng.choice((1, 2, 3, 7, 16, 64, 1000))
    params["kernel"] = rng.choice(KERNELS)
    if rng.random() < 0.3:
        params["scale"] = rng.choice((0.05, 0.5, 1.0))
    params["key_padding_mask"] = sample_padding(p, rng, right_only=True)
    return params


def _diag_state_size(head_dim: int, value_dim: Optional[int] = None, **params: Any) -> int:
    """(block_size - 1) x (D + Dv) per head: the keys and values of the unfinished block."""
    block = params.get("block_size", DEFAULT_BLOCK)
    return (block - 1) * (head_dim + (head_dim if value_dim is None else value_dim))


TRANSNORMER_DIAG = register(
    Mechanism(
        name="transnormer_diag",
        family="linear",
        catalog=("F7",),
        paper="The Devil in Linear Transformer (Qin et al., EMNLP 2022), Sec. 4, DiagAttention",
        formula="out_i = sum_(j in block(i), visible) w_ij v_j, w = softmax(s q k^T) or relu(s q k^T) inside non-overlapping blocks of w tokens",
        cost="O(N w D) time, O(N w) memory (blocks); O(N^2) (reference)",
        summary="TransNormer's DiagAttention: softmax (or relu) attention inside non-overlapping diagonal blocks; causal or not",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=DIAG_PARAMS,
        gqa=True,
        exact=True,
        decoder=DiagDecoder(),
        sample_params=_sample_diag_params,
        state_size=_diag_state_size,
    )
)
TRANSNORMER_DIAG.add_backend(
    Backend("reference", _diag_reference, doc="every score materialized, the pairs outside a block masked: the spec", priority=-100, materializes_scores=True)
)
TRANSNORMER_DIAG.add_backend(
    Backend(
        "blocks",
        _diag_blocks,
        doc="the full blocks as one batch (SDPA for softmax, two GEMMs for relu), the short last block in a second call",
        priority=50,
    )
)


def transnormer_diag_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = DEFAULT_BLOCK,
    causal: bool = False,
    kernel: str = "softmax",
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """TransNormer's DiagAttention (Qin et al., EMNLP 2022, Sec. 4; catalog F7).

    ::

        out_i = sum_(j in block(i)) softmax_j(s q_i . k_j) v_j        (kernel="softmax")
        out_i = sum_(j in block(i)) relu(s q_i . k_j) v_j               (kernel="relu")

    with block(i) the tokens of i's block of ``block_size`` (tokens ``[b w, (b + 1) w)``, the
    last block shorter), restricted to j <= i with ``causal``; ``s`` = scale (default D^-0.5).
    Self-attention only (Nq = Nk): the blocks pair queries and keys of one sequence.

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        block_size: tokens per block; any positive int (above N: one block, full attention).
        causal: causal inside each block.
        kernel: ``"softmax"`` (the paper) or ``"relu"`` (the official configs' ReLU weights,
            unnormalized: the layer's output norm follows, see :class:`attnzoo.nn.TransNormerAttention`).
        scale: multiplies q . k, default D^-0.5.
        key_padding_mask: (B, N) bool, **True = ignore that key**, masked inside the blocks
            (a row whose block holds no visible key outputs 0). Padding on the right only: the
            blocks are cut from position 0, so a pad before a real token moves the block
            boundaries, which is refused (ParameterError).
        backend: force ``blocks`` (default) or ``reference``.

    Returns:
        (B, Hq, N, Dv), in the dtype of q.

    Cost: O(N w D) time and O(N w) memory on ``blocks`` (w = block_size); causal decoding keeps
    the current block's keys and values (at most w - 1 tokens).

    Example::

        >>> q = k = v = torch.randn(1, 8, 4096, 64)
        >>> out = transnormer_diag_attention(q, k, v, block_size=64, causal=True)
    """
    return TRANSNORMER_DIAG(
        q, k, v, backend=backend, block_size=block_size, causal=causal, kernel=kernel, scale=scale, key_padding_mask=key_padding_mask
    )


TRANSNORMER_DIAG.function = transnormer_diag_attention
