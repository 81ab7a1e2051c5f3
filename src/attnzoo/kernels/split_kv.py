"""Split-KV attention for decoding, and the merge of partial attention states.

Lean Attention (Sanovar et al., 2024) and FlashDecoding split a long key/value context into
chunks, attend the few queries to each chunk independently (in parallel), and combine the
partial results exactly through their log-sum-exp:

    lse = log sum_c exp(lse_c),    out = sum_c exp(lse_c - lse) * out_c.

:func:`merge_attention_states` is that combination; ring (context-parallel) attention reuses
it across devices. Cost of :func:`split_kv_attention`: O(Nq * Nk * D) time, O(Nq * Nk) memory,
meant for Nq much smaller than Nk (decoding), where it is bound by reading K and V once.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["merge_attention_states", "split_kv_attention", "stable_softmax_lse"]


def stable_softmax_lse(s: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """``(softmax(s), logsumexp(s))`` along ``dim``, with rows of only ``-inf`` giving 0 and -inf.

    Unlike ``torch.softmax``/``torch.logsumexp`` this never produces NaN (forward or backward)
    for a row with nothing to attend; shared by every materialized softmax in the library.
    """
    m = s.amax(dim, keepdim=True).detach()  # softmax is shift-invariant: the shift needs no grad
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(s - m)
    total = e.sum(dim, keepdim=True)
    empty = total == 0
    p = e / torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), m + torch.log(torch.where(empty, torch.ones_like(total), total)))
    return p, lse.squeeze(dim)


def merge_attention_states(
    outputs: Union[Sequence[Tensor], Tensor], lses: Union[Sequence[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Combine attention over disjoint key sets into attention over their union.

    ``outputs``: partial outputs, each (..., Nq, Dv) (a sequence, or one tensor stacked on dim 0);
    ``lses``: their log-sum-exps, each (..., Nq). Returns ``(out, lse)`` exactly equal to attending
    over all keys at once; parts with ``lse = -inf`` (no key) contribute nothing, and a row with
    no key anywhere gets output 0 and lse -inf. Differentiable.

    Example::

        o1, l1 = attnzoo.attention(q, k[:, :, :512], v[:, :, :512], return_lse=True)
        o2, l2 = attnzoo.attention(q, k[:, :, 512:], v[:, :, 512:], return_lse=True)
        out, lse = attnzoo.merge_attention_states([o1, o2], [l1, l2])
    """
    o = outputs if isinstance(outputs, Tensor) else torch.stack(list(outputs))
    lse = lses if isinstance(lses, Tensor) else torch.stack(list(lses))
    if o.shape[:-1] != lse.shape:
        raise ValueError(
            f"merge_attention_states: lses: expected shape {tuple(o.shape[:-1])} to match outputs "
            f"{tuple(o.shape)}, got {tuple(lse.shape)}"
        )
    weights, total = stable_softmax_lse(lse.float() if lse.dtype in (torch.float16, torch.bfloat16) else lse, dim=0)
    out = (weights.unsqueeze(-1) * o.to(weights.dtype)).sum(0)
    return out.to(o.dtype), total


def split_kv_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    num_splits: Optional[int] = None,
    max_splits: int = 32,
    min_split: int = 16,
    allowed: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    score_mod: Optional[Callable] = None,
) -> tuple[Tensor, Tensor]:
    """Attention of few queries over a long context, split into chunks merged by LSE.

    ``q`` (B, Hq, Nq, D), ``k``/``v`` (B, Hkv, Nk, D|Dv); ``allowed`` a bool mask broadcastable
    to (B, Hq, Nq, Nk) (True = attend), ``bias`` an additive bias broadcastable to the same,
    ``score_mod`` a FlexAttention-style score modification. Returns ``(out, lse)``.
    The context is cut into ``num_splits`` chunks (default: up to ``max_splits``, none shorter than
    ``min_split`` keys), computed as one batched matmul (the parallel split), then merged.
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    # as many chunks as useful for parallelism, none shorter than ``min_split`` keys
    splits = num_splits or max(1, min(max_splits, nk // min_split))
    chunk = -(-nk // splits)
    pad = splits * chunk - nk
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kp = torch.nn.functional.pad(k.to(cdt), (0, 0, 0, pad)).view(b, hkv, splits, chunk, d)
    vp = torch.nn.functional.pad(v.to(cdt), (0, 0, 0, pad)).view(b, hkv, splits, chunk, dv)
    rows = (q.to(cdt) * scale).reshape(b, hkv, 1, g * nq, d)  # the G query heads of a KV head share its chunks
    s = torch.matmul(rows, kp.transpose(-1, -2))  # (B, Hkv, C, G*Nq, chunk)

    def to_chunks(x: Tensor) -> Tensor:  # (B, Hq, Nq, C*chunk) -> (B, Hkv, C, G*Nq, chunk)
        x = x.expand(b, hq, nq, splits * chunk).reshape(b, hkv, g, nq, splits, chunk)
        return x.permute(0, 1, 4, 2, 3, 5).reshape(b, hkv, splits, g * nq, chunk)

    if bias is not None or score_mod is not None:
        flat = s.view(b, hkv, splits, g, nq, chunk).permute(0, 1, 3, 4, 2, 5).reshape(b, hq, nq, splits * chunk)
        if bias is not None:
            flat = flat + torch.nn.functional.pad(bias.to(cdt).expand(*bias.shape[:-1], nk), (0, pad))
        if score_mod is not None:
            bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
            hi = torch.arange(hq, device=q.device).view(1, hq, 1, 1)
            qi = torch.arange(nq, device=q.device).view(1, 1, nq, 1)
            ki = torch.arange(splits * chunk, device=q.device).clamp(max=nk - 1).view(1, 1, 1, -1)
            flat = score_mod(flat, bi, hi, qi, ki)
        s = to_chunks(flat)
    keep = (torch.arange(splits * chunk, device=q.device) < nk).view(splits, 1, chunk)
    if allowed is not None:
        keep = keep & to_chunks(torch.nn.functional.pad(allowed.expand(*allowed.shape[:-1], nk), (0, pad)))
    s = s.masked_fill(~keep, float("-inf"))
    p, lse_c = stable_softmax_lse(s)  # each chunk on its own: (B, Hkv, C, G*Nq, chunk)
    o_c = torch.matmul(p, vp)  # (B, Hkv, C, G*Nq, Dv)
    out, lse = merge_attention_states(o_c.movedim(2, 0), lse_c.movedim(2, 0))
    out = out.reshape(b, hq, nq, dv)
    lse = lse.reshape(b, hq, nq)
    return out.to(q.dtype), lse
