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

from .reference import default_scale, index_grids, stable_softmax_lse

__all__ = ["merge_attention_states", "split_kv_attention"]


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
    scale: Optional[float] = None,
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
    Chunks are views of k and v: nothing is copied for float32/float64 inputs (bf16/fp16 are
    read into float32 once).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    # as many chunks as useful for parallelism, none shorter than ``min_split`` keys
    splits = max(1, min(num_splits or max_splits, nk // min_split if num_splits is None else nk))
    chunk = nk // splits
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = (q.to(cdt) * default_scale(q, scale)).reshape(b, hkv, 1, (hq // hkv) * nq, d)  # a KV head's G query heads share its chunks
    mods = _ScoreMods(q.shape, nk, allowed, bias, score_mod)
    # Whole chunks are views of k and v (no copy: this kernel is bound by reading them once);
    # the keys left over, fewer than a chunk, form one more part of the merge.
    parts = [_chunk_states(rows, k, v, 0, splits, chunk, mods, cdt)]
    if splits * chunk < nk:
        parts.append(_chunk_states(rows, k, v, splits * chunk, 1, nk - splits * chunk, mods, cdt))
    o_c = torch.cat([o for o, _ in parts], dim=2)  # (B, Hkv, C, G*Nq, Dv)
    lse_c = torch.cat([lse for _, lse in parts], dim=2)
    out, lse = merge_attention_states(o_c.movedim(2, 0), lse_c.movedim(2, 0))
    return out.reshape(b, hq, nq, v.shape[-1]).to(q.dtype), lse.reshape(b, hq, nq)


class _ScoreMods:
    """The bias, mask and score_mod of a call, applied to the scores of one key range."""

    def __init__(self, q_shape: torch.Size, nk: int, allowed: Optional[Tensor], bias: Optional[Tensor], score_mod: Optional[Callable]):
        self.b, self.hq, self.nq = q_shape[0], q_shape[1], q_shape[2]
        self.nk, self.allowed, self.bias, self.score_mod = nk, allowed, bias, score_mod

    def active(self) -> bool:
        return self.allowed is not None or self.bias is not None or self.score_mod is not None

    def apply(self, s: Tensor, first: int) -> Tensor:
        """``s`` (B, Hq, Nq, L) holds the scores of keys first .. first + L - 1."""
        length = s.shape[-1]

        def cols(x: Tensor) -> Tensor:
            return x.expand(*x.shape[:-1], self.nk)[..., first : first + length]

        if self.bias is not None:
            s = s + cols(self.bias).to(s.dtype)
        if self.score_mod is not None:
            s = self.score_mod(s, *index_grids(self.b, self.hq, self.nq, length, s.device, kv_first=first))
        if self.allowed is not None:
            s = s.masked_fill(~cols(self.allowed), float("-inf"))
        return s


def _chunk_states(
    rows: Tensor, k: Tensor, v: Tensor, first: int, n_chunks: int, chunk: int, mods: _ScoreMods, cdt: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per-chunk ``(out, lse)`` of keys first .. first + n_chunks * chunk - 1, chunks side by side.

    ``rows`` (B, Hkv, 1, G*Nq, D); returns (B, Hkv, C, G*Nq, Dv) and (B, Hkv, C, G*Nq).
    """
    b, hkv, _, gn, d = rows.shape
    span = n_chunks * chunk
    kc = k[:, :, first : first + span].to(cdt).view(b, hkv, n_chunks, chunk, d)
    vc = v[:, :, first : first + span].to(cdt).view(b, hkv, n_chunks, chunk, v.shape[-1])
    s = torch.matmul(rows, kc.transpose(-1, -2))  # (B, Hkv, C, G*Nq, chunk)
    if mods.active():
        g, nq = gn // mods.nq, mods.nq
        flat = s.view(b, hkv, n_chunks, g, nq, chunk).permute(0, 1, 3, 4, 2, 5).reshape(b, hkv * g, nq, span)
        flat = mods.apply(flat, first)
        s = flat.reshape(b, hkv, g, nq, n_chunks, chunk).permute(0, 1, 4, 2, 3, 5).reshape(b, hkv, n_chunks, gn, chunk)
    p, lse = stable_softmax_lse(s)  # each chunk on its own
    return torch.matmul(p, vc), lse
