"""Selective attention (catalog V3; Leviathan, Kalman, Matias, "Selective Attention Improves
Transformer", ICLR 2025, Sec. 3): a token can stop later tokens from attending to a token.

    L_h[i, j] = scale q_{h,i} . k_{h,j}                     (masked: causal, key padding)
    S[i, j]   = ReLU(L_{h0}[i, j])   with S[i, i] = 0 (no token masks itself) and S[:, BOS] = 0
    F[i, j]   = sum_{i' < i} S[i', j]                      (masks accumulated by earlier queries)
    out_{h,i} = sum_j softmax_j(L_h[i, j] - F[i, j]) v_j   (every head, h0 included)

One head ``h0`` (``selection_head``, the paper's first head) decides: a query i' that strongly
attends key j marks j as no longer needed, and every later query pays ``S[i', j]`` on that key.
No parameters. The arithmetic follows x-transformers' ``selective_attn`` (ReLU of the masked
head-0 logits, diagonal and BOS column zeroed, shifted by one query, cumulative sum over queries).

Causal self-attention only (the paper's autoregressive setting): F reads every earlier query.
``BOS`` is the first real key of each sequence (the first position, or the first after left
padding; ``protect_first=False`` lets it be masked too); a padded query contributes no mask, so a
padded batch equals each sequence alone.

Backends: ``reference`` (all logits and F materialized) and ``blocked``: query blocks of ``BLOCK``
rows in order, carrying the running column sum of S (one value per key) from block to block, each
block's attention over its rows only and recomputed in the backward (activation checkpointing), so
no Nq x Nk tensor is held; O(BLOCK * Nk * H) working memory. Cost: O(Nq Nk D) time, one extra
head's logits.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ...kernels.reference import default_scale, stable_softmax_lse
from ...registry import Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from .._padding import key_padding_param, sample_padding
from .._prefix_decoder import PrefixDecoder

__all__ = ["SELECTIVE", "selective_attention", "BLOCK"]

#: Query rows per block of the ``blocked`` backend.
BLOCK = 128


def _check_head(value: Any, p: Problem) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < p.q_heads:
        return f"an int in [0, {p.q_heads}) (a query head)"
    return None


PARAMS = (
    Param("selection_head", 0, "h0: the query head whose ReLU'd logits are the masks (the paper's first head)", _check_head, (-1, 10**6, 1.5, True), "int"),
    flag("protect_first", True, "never mask the first real key (the paper's BOS rule)"),
    flag("causal", True, "must be True: selective attention is causal"),
    choice("causal_alignment", ("bottom_right", "top_left"), "bottom_right", "kept for the common signature (self-attention: Nq == Nk)"),
    key_padding_param(),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
)


def _check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if not bound["causal"]:
        return "causal", "selective attention is causal only (each query's masks come from earlier queries): pass causal=True"
    return None


def _pads(q: Tensor, key_padding_mask: Optional[Tensor]) -> tuple[Optional[Tensor], Tensor]:
    """(key pad (B, N) or None, BOS index (B,)): the first real key of each sequence (0 if none)."""
    b, n = q.shape[0], q.shape[2]
    if key_padding_mask is None:
        return None, torch.zeros(b, dtype=torch.long, device=q.device)
    pad = key_padding_mask.reshape(b, n)
    return pad, (~pad).to(torch.int8).argmax(-1)


def _visible(first: int, rows: int, n: int, pad: Optional[Tensor], device: torch.device) -> Tensor:
    """(B|1, rows, N) bool: key j visible from query i (j <= i, real key, real query) for queries first .. first + rows - 1."""
    i = torch.arange(first, first + rows, device=device)[:, None]
    vis = (torch.arange(n, device=device)[None, :] <= i)[None]
    if pad is not None:
        vis = vis & ~pad[:, None, :] & ~pad[:, first : first + rows, None]
    return vis


def _gate(q0: Tensor, k0: Tensor, first: int, pad: Optional[Tensor], bos: Tensor, protect_first: bool, scale: float) -> Tensor:
    """(B, rows, N) S for queries first .. first + rows - 1: ReLU of head h0's visible logits, diagonal and BOS 0."""
    rows, n = q0.shape[1], k0.shape[1]
    s = torch.relu(q0 @ k0.transpose(-1, -2) * scale)
    keep = _visible(first, rows, n, pad, q0.device)
    i = torch.arange(first, first + rows, device=q0.device)[:, None]
    keep = keep & (torch.arange(n, device=q0.device)[None, :] != i)[None]
    if protect_first:
        keep = keep & (torch.arange(n, device=q0.device)[None, None, :] != bos[:, None, None])
    return s.masked_fill(~keep, 0.0)


def _heads(q: Tensor, k: Tensor, v: Tensor, selection_head: int, cdt: torch.dtype) -> tuple[Tensor, ...]:
    group = q.shape[1] // k.shape[1]
    kk, vv = k.to(cdt).repeat_interleave(group, dim=1), v.to(cdt).repeat_interleave(group, dim=1)
    qq = q.to(cdt)
    return qq, kk, vv, qq[:, selection_head], kk[:, selection_head]


def _attend(q_rows: Tensor, kk: Tensor, vv: Tensor, f_rows: Tensor, first: int, pad: Optional[Tensor], scale: float) -> Tensor:
    """Softmax attention of rows first.. over all keys with the logits lowered by F (B, rows, N)."""
    s = q_rows @ kk.transpose(-1, -2) * scale - f_rows[:, None]
    s = s.masked_fill(~_visible(first, q_rows.shape[2], kk.shape[2], pad, q_rows.device)[:, None], float("-inf"))
    p, _ = stable_softmax_lse(s)
    return p @ vv


def _reference(q, k, v, *, selection_head, protect_first, causal, causal_alignment, key_padding_mask, scale):
    """Every logit and F materialized: the spec."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qq, kk, vv, q0, k0 = _heads(q, k, v, selection_head, cdt)
    pad, bos = _pads(q, key_padding_mask)
    sc = default_scale(q, scale)
    s = _gate(q0, k0, 0, pad, bos, protect_first, sc)
    f = s.cumsum(1) - s  # sum over earlier queries only
    return _attend(qq, kk, vv, f, 0, pad, sc).to(q.dtype)


def _block(q_rows, q0_rows, kk, vv, k0, acc, first, pad, bos, protect_first, sc):
    s = _gate(q0_rows, k0, first, pad, bos, protect_first, sc)
    f = acc[:, None, :] + s.cumsum(1) - s
    return _attend(q_rows, kk, vv, f, first, pad, sc), acc + s.sum(1)


def _blocked(q, k, v, *, selection_head, protect_first, causal, causal_alignment, key_padding_mask, scale):
    """Query blocks in order carrying F's running column sum; each block recomputed in the backward."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qq, kk, vv, q0, k0 = _heads(q, k, v, selection_head, cdt)
    pad, bos = _pads(q, key_padding_mask)
    sc = default_scale(q, scale)
    n = q.shape[2]
    acc = q0.new_zeros(q.shape[0], k.shape[2])
    outs = []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    for first in range(0, n, BLOCK):
        rows = slice(first, first + BLOCK)
        args = (qq[:, :, rows], q0[:, rows], kk, vv, k0, acc, first, pad, bos, protect_first, sc)
        out, acc = checkpoint(_block, *args, use_reentrant=False) if grad else _block(*args)
        outs.append(out)
    return torch.cat(outs, dim=2).to(q.dtype)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"causal": True}
    if rng is None:
        return params
    if rng.random() < 0.4:
        params["selection_head"] = rng.randrange(p.q_heads)
    if rng.random() < 0.3:
        params["protect_first"] = False
    pad = sample_padding(p, rng)
    if pad is not None:
        params["key_padding_mask"] = pad
    if rng.random() < 0.3:
        params["scale"] = rng.choice((0.05, 0.5, 1.0))
    return params


SELECTIVE = register(
    Mechanism(
        name="selective",
        family="variants",
        catalog=("V3",),
        paper="Selective Attention Improves Transformer (Leviathan, Kalman, Matias, ICLR 2025), Sec. 3; x-transformers selective_attn",
        formula="out_{h,i} = sum_j softmax_j(L_h[i,j] - F[i,j]) v_j, F[i,j] = sum_{i'<i} ReLU(L_{h0}[i',j]) (i' != j, j != BOS)",
        cost="O(Nq * Nk * D) time; O(BLOCK * Nk * H) working memory on blocked",
        summary="selective attention: head h0's ReLU'd logits, summed over earlier queries, are subtracted from every head's logits (causal)",
        patterns=frozenset({"causal_self"}),
        params=PARAMS,
        gqa=True,
        check_params=_check_params,
        decoder=PrefixDecoder("selective", "all"),
        sample_params=_sample_params,
    )
)
SELECTIVE.add_backend(Backend("reference", _reference, doc="every logit and F materialized: the spec", priority=-100, materializes_scores=True))
SELECTIVE.add_backend(Backend("blocked", _blocked, doc=f"query blocks of {BLOCK} carrying F's column sums, checkpointed (no Nq x Nk tensor held)", priority=20))


def selective_attention(q: Tensor, k: Tensor, v: Tensor, *, selection_head: int = 0, protect_first: bool = True, causal: bool = True,
                        causal_alignment: str = "bottom_right", key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                        backend: Optional[str] = None) -> Tensor:
    """Selective attention (Leviathan et al., ICLR 2025): earlier queries mask keys for later ones.

    ``F[i, j] = sum_{i' < i} ReLU(L_{h0}[i', j])`` (own position and the first real key excluded) is
    subtracted from every head's causal logits ``L_h[i, j]`` before the softmax.

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv). Causal self-attention.
        selection_head: h0, a query head (default 0). protect_first: never mask the first real key (BOS).
        key_padding_mask: (B, N) bool, True = pad (a padded token neither masks nor is seen).
        scale: default ``D ** -0.5``.

    Cost: O(N^2 D); O(128 * N * H) working memory (``blocked``). Paper: Leviathan et al. (ICLR 2025), Sec. 3.

    Example::

        >>> q = k = v = torch.randn(2, 8, 512, 64)
        >>> out = selective_attention(q, k, v)
    """
    return SELECTIVE(q, k, v, backend=backend, selection_head=selection_head, protect_first=protect_first, causal=causal,
                     causal_alignment=causal_alignment, key_padding_mask=key_padding_mask, scale=scale)


SELECTIVE.function = selective_attention
