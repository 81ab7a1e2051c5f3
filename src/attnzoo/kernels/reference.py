"""Materialized attention: the obviously-right spec every family's ``reference`` backend uses.

    s = score_mod(scale * q k^T + bias), masked to -inf where ``allowed`` is False,
    out = softmax(s) v,  lse = logsumexp(s)

computed in float32 (float64 for float64 inputs) with the ``Nq x Nk`` scores in memory. GQA is
expanded by repeating key/value heads. Rows with no allowed key give 0 and -inf, never NaN.
Cost: O(Nq * Nk * D) time, O(Nq * Nk) memory. :func:`stable_softmax_lse` (the NaN-free softmax
and log-sum-exp) and :func:`index_grids` (the broadcast b/h/q/kv indices a mask or score mod
receives) are shared by every materialized computation in the library.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["default_scale", "index_grids", "materialized_attention", "stable_softmax_lse"]

#: A tap on :func:`materialized_attention`, set only by ``attnzoo.hooks`` while it re-runs a
#: mechanism's reference to capture or edit its weights: ``tap.scores(s, k, v)`` sees the masked
#: scores (and the keys and values, to tell the mechanism's own from derived ones) and
#: ``tap.probs(p)`` the probabilities, each returning what the call goes on with. None (the
#: default) costs one test per call.
TAP = None


def default_scale(q: Tensor, scale: Optional[float]) -> float:
    """``scale``, or the library-wide default ``D ** -0.5`` when it is None."""
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def index_grids(
    batch: int, heads: int, q_len: int, kv_len: int, device: Optional[torch.device], *, kv_first: int = 0
) -> tuple[Tensor, ...]:
    """Broadcastable (b, h, q_idx, kv_idx) index tensors of shape (B,1,1,1) ... (1,1,1,Nk).

    The key indices run from ``kv_first`` (a slice of a longer context keeps its positions).
    """
    return (
        torch.arange(batch, device=device).view(batch, 1, 1, 1),
        torch.arange(heads, device=device).view(1, heads, 1, 1),
        torch.arange(q_len, device=device).view(1, 1, q_len, 1),
        torch.arange(kv_first, kv_first + kv_len, device=device).view(1, 1, 1, kv_len),
    )


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


def materialized_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    allowed: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    score_mod: Optional[Callable] = None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of masked softmax attention; ``allowed`` broadcastable to (B, Hq, Nq, Nk)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kk = k.to(cdt).repeat_interleave(group, dim=1)
    vv = v.to(cdt).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(cdt), kk.transpose(-1, -2)) * default_scale(q, scale)
    if bias is not None:
        s = s + bias.to(cdt)
    if score_mod is not None:
        s = score_mod(s, *index_grids(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device))
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if TAP is not None:
        s = TAP.scores(s, k, v)
    p, lse = stable_softmax_lse(s)
    if TAP is not None:
        p = TAP.probs(p)
    return torch.matmul(p, vv).to(q.dtype), lse
