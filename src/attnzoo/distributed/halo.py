"""Sliding-window attention over a sequence split across ranks: only the halo keys are exchanged.

A query at position i of ``sliding_window`` sees the keys ``i - left .. i + right``. With the
sequence split contiguously (n tokens per rank, ``left, right <= n``), rank r needs, besides its
own keys, the last ``left`` keys/values of rank r - 1 and the first ``right`` of rank r + 1: the
halos (the halo exchange of stencil codes; HaloNet's blocked local attention, Vaswani et al.,
2021, uses the same halo on an image). Each rank sends its edges to its two neighbours (at most
2 messages of ``B Hkv (left or right) (D + Dv)`` numbers each way, independent of W and N), then
runs attnzoo's ``sliding_window`` on its queries against ``[halo_left, own, halo_right]``; the
backward sends the halos' gradients back the same way. Exact against one process (values, LSE
and gradients); compute per rank ``O(n (left + right) D)``.

Not supported here: ``sinks`` (every rank would need the first tokens: a broadcast) and
``key_padding_mask``; windows wider than a rank's tokens (``left`` or ``right`` > n) are refused
(use :func:`~attnzoo.distributed.ring_attention` with a mask, or fewer ranks).

Example::

    q, k, v = (shard_sequence(x) for x in (q_full, k_full, v_full))
    out = halo_attention(q, k, v, window=(128, 0), causal=True)
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ParameterError, ShapeError
from ..registry import get
from ._comm import HALO_TAG, GRAD_TAG, Ring, ring_of

__all__ = ["halo_attention"]


def _swap(ring: Ring, to_prev: Optional[Tensor], to_next: Optional[Tensor], from_prev: Optional[Tensor], from_next: Optional[Tensor], tag: int):
    """Send to either neighbour and receive from either (None: no message; shapes of the receives
    given by the ``from_*`` templates). Messages towards the next rank carry ``tag + 100``, so the
    two directions stay apart when the previous and the next rank are the same (world 2)."""
    sends = [(x, dst, t) for x, dst, t in ((to_prev, ring.prev, tag), (to_next, ring.next, tag + 100)) if x is not None]
    got = {key: torch.empty_like(like, memory_format=torch.contiguous_format)
           for key, like in (("prev", from_prev), ("next", from_next)) if like is not None}
    recvs = [(got[key], src, t) for key, src, t in (("prev", ring.prev, tag + 100), ("next", ring.next, tag)) if key in got]
    if ring.nccl:  # NCCL wants the sends and receives as one batch
        ops = [dist.P2POp(dist.isend, x.contiguous(), dst, ring.group, t) for x, dst, t in sends]
        ops += [dist.P2POp(dist.irecv, x, src, ring.group, t) for x, src, t in recvs]
        works = dist.batch_isend_irecv(ops) if ops else []
    else:
        works = [dist.isend(x.contiguous(), dst, group=ring.group, tag=t) for x, dst, t in sends]
        works += [dist.irecv(x, src, group=ring.group, tag=t) for x, src, t in recvs]
    for w in works:
        w.wait()
    return got.get("prev"), got.get("next")


class _Halos(torch.autograd.Function):
    """(the previous rank's last ``left`` rows, the next rank's first ``right`` rows) of the packed
    K/V; the backward returns the halos' gradients to their owners and adds them to ``kv``'s."""

    @staticmethod
    def forward(ctx, kv, left, right, ring: Ring):
        n = kv.shape[2]
        first, last = ring.rank == 0, ring.rank == ring.world - 1
        ctx.n, ctx.left, ctx.right, ctx.ring = n, left, right, ring
        got_prev, got_next = _swap(
            ring,
            kv[:, :, :right] if right > 0 and not first else None,  # our head is the previous rank's right halo
            kv[:, :, n - left :] if left > 0 and not last else None,  # our tail is the next rank's left halo
            kv[:, :, n - left :] if left > 0 and not first else None,
            kv[:, :, :right] if right > 0 and not last else None,
            HALO_TAG,
        )
        empty = kv[:, :, :0]
        return (got_prev if got_prev is not None else empty.clone()), (got_next if got_next is not None else empty.clone())

    @staticmethod
    def backward(ctx, dbefore, dafter):
        ring: Ring = ctx.ring
        n, left, right = ctx.n, ctx.left, ctx.right
        first, last = ring.rank == 0, ring.rank == ring.world - 1
        like = dbefore if dbefore is not None else dafter
        dkv = like.new_zeros([*like.shape[:2], n, *like.shape[3:]])
        got_prev, got_next = _swap(
            ring,
            dbefore if left > 0 and not first else None,  # the previous rank's tail
            dafter if right > 0 and not last else None,  # the next rank's head
            dkv[:, :, :right] if right > 0 and not first else None,  # our head, used by the previous rank
            dkv[:, :, n - left :] if left > 0 and not last else None,  # our tail, used by the next rank
            GRAD_TAG,
        )
        if got_prev is not None:
            dkv[:, :, :right] += got_prev
        if got_next is not None:
            dkv[:, :, n - left :] += got_next
        return dkv, None, None, None


def _window(window: Any, causal: bool) -> tuple[int, int]:
    def ok(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if ok(window):
        left, right = window, window
    elif isinstance(window, (tuple, list)) and len(window) == 2 and all(ok(x) for x in window):
        left, right = window
    else:
        raise ParameterError(f"halo_attention: window: expected an int >= 0 or (left, right) ints >= 0 (bounded: the halo is finite), got {window!r}", argument="window")
    return left, 0 if causal else right


def halo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: Union[int, tuple[int, int]],
    causal: bool = False,
    scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    backend: Optional[str] = None,
    return_lse: bool = False,
) -> Any:
    """``sliding_window`` attention of a contiguously split sequence, exchanging only halos (module docstring).

    Args:
        q, k, v: this rank's tokens (contiguous layout), (B, Hq, n, D), (B, Hkv, n, D), (B, Hkv, n, Dv).
        window: ``(left, right)`` keys each side of the query, or an int for both; with
            ``causal`` the right extent is 0.
        scale, backend, return_lse: as for ``attnzoo.attention(..., "sliding_window")``.
    """
    what = "halo_attention"
    ring = ring_of(group, what)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ShapeError(f"{what}: {name}: expected a (B, H, n, D) tensor (this rank's tokens)", argument=name)
    n = q.shape[2]
    if k.shape[2] != n or v.shape[2] != n:
        raise ShapeError(f"{what}: k: expected q, k, v of the same local length {n}, got {k.shape[2]} and {v.shape[2]}", argument="k")
    left, right = _window(window, causal)
    if max(left, right) > n and ring.world > 1:
        raise ParameterError(f"{what}: window: the halo comes from the neighbours only: expected left and right <= the {n} tokens of a rank, "
                             f"got {(left, right)}", argument="window")
    dk_ = k.shape[-1]
    kv = torch.cat([k, v.to(k.dtype)], dim=-1)
    before, after = _Halos.apply(kv, left, right, ring)
    kv_all = torch.cat([before, kv, after], dim=2)
    hl, hr = before.shape[2], after.shape[2]
    q_all = torch.cat([q.new_zeros(*q.shape[:2], hl, q.shape[3]), q, q.new_zeros(*q.shape[:2], hr, q.shape[3])], dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    result = get("sliding_window")(
        q_all, kv_all[..., :dk_], kv_all[..., dk_:].to(v.dtype), window=(left, right), causal=causal, scale=scale,
        return_lse=return_lse, backend=backend,
    )
    if return_lse:
        out, lse = result
        return out[:, :, hl : hl + n], lse[:, :, hl : hl + n]
    return result[:, :, hl : hl + n]
