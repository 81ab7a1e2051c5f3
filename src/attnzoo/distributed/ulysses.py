"""Head-parallel (DeepSpeed-Ulysses) attention: any registered mechanism over a sequence split across ranks.

Algorithm (Jacobs et al., 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training
of Extreme Long Sequence Transformer Models", Sec. 3): each rank holds all H heads of its n = N / W
tokens. One all-to-all per tensor turns this into H / W heads of all N tokens (rank g gets heads
``[g H / W, (g + 1) H / W)``); the mechanism runs unchanged on the whole sequence for those heads
(``attnzoo.attention(q, k, v, mechanism, **params)``: any registered mechanism, causal or not,
its backward included); one all-to-all brings the output back to sequence shards. The backward
is the same two all-to-alls the other way (the transpose of an all-to-all is an all-to-all).

Cost per rank: communication 4 all-to-alls in the forward (q, k, v, out), each moving
``(W - 1) / W`` of the rank's ``B H n D`` tensor, so the volume per link stays constant when N
and W grow together (the paper's claim); 4 more in the backward. Memory and compute are the
mechanism's own on (B, H / W, N, D). Constraint: H (and the key/value heads of GQA) must be a
multiple of W (refused otherwise, :class:`~attnzoo.errors.ParameterError` naming ``q`` or ``k``);
past W = H, combine with :func:`~attnzoo.distributed.ring_attention` (USP, Fang & Zhao, 2024).

Mechanisms whose parameters depend on the head (retention's per-head decays, ALiBi-like slopes,
a per-head bias) must see their own heads' values: give such a parameter for all H heads in
``per_head`` and each rank receives its slice (its first dimension). A mechanism that mixes heads
(talking heads) is not head-parallel and gives a different result; every other mechanism is
exact against one process.

Example::

    q, k, v = (shard_sequence(x) for x in (q_full, k_full, v_full))           # (B, H, N / W, D)
    out = ulysses_attention(q, k, v, "retention", per_head={"gamma": retnet_gamma(H)})
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ParameterError, ShapeError
from ..registry import get
from ._comm import Ring, all_to_all, ring_of
from .sharding import check_layout, chunk_ids

__all__ = ["ulysses_attention", "seq_to_heads", "heads_to_seq"]


def _order(world: int, layout: str, n: int, device: torch.device) -> Optional[Tensor]:
    """Index giving global order from rank order (None for contiguous)."""
    if layout == "contiguous":
        return None
    per = len(chunk_ids(0, world, layout))
    size = n // (per * world)  # tokens per chunk of the full sequence
    rank_order = torch.cat([torch.arange(c * size, (c + 1) * size) for r in range(world) for c in chunk_ids(r, world, layout)])
    return torch.argsort(rank_order).to(device)  # position p of the global order is at rank-order index order[p]


def _seq_to_heads(x: Tensor, ring: Ring, order: Optional[Tensor]) -> Tensor:
    b, h, n = x.shape[:3]
    rest = x.shape[3:]
    w = ring.world
    send = x.reshape(b, w, h // w, n, *rest).transpose(0, 1)  # chunk j: heads of rank j
    got = all_to_all(send, ring)  # (W, B, h/W, n, ...): entry j = rank j's tokens of our heads
    y = got.movedim(0, 2).reshape(b, h // w, w * n, *rest)
    return y if order is None else y.index_select(2, order)


def _heads_to_seq(y: Tensor, ring: Ring, order: Optional[Tensor]) -> Tensor:
    b, hh, total = y.shape[:3]
    rest = y.shape[3:]
    w = ring.world
    if order is not None:
        y = y.index_select(2, torch.argsort(order))  # back to rank order
    send = y.reshape(b, hh, w, total // w, *rest).movedim(2, 0)  # chunk j: rank j's tokens
    got = all_to_all(send, ring)  # (W, B, hh, n, ...): entry j = heads of rank j
    return got.transpose(0, 1).reshape(b, w * hh, total // w, *rest)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ring, order):
        ctx.ring, ctx.order = ring, order
        return _seq_to_heads(x, ring, order)

    @staticmethod
    def backward(ctx, dy):
        return _heads_to_seq(dy, ctx.ring, ctx.order), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, ring, order):
        ctx.ring, ctx.order = ring, order
        return _heads_to_seq(y, ring, order)

    @staticmethod
    def backward(ctx, dx):
        return _seq_to_heads(dx, ctx.ring, ctx.order), None, None


def seq_to_heads(x: Tensor, *, group: Optional[dist.ProcessGroup] = None, layout: str = "contiguous") -> Tensor:
    """(B, H, n, ...) sequence shard -> (B, H / W, N, ...) head shard, in global token order (one all-to-all; differentiable)."""
    ring = ring_of(group, "seq_to_heads")
    check_layout(layout, "seq_to_heads")
    _check_heads("seq_to_heads", "x", x, ring.world)
    return _SeqToHeads.apply(x, ring, _order(ring.world, layout, ring.world * x.shape[2], x.device))


def heads_to_seq(y: Tensor, *, group: Optional[dist.ProcessGroup] = None, layout: str = "contiguous") -> Tensor:
    """The inverse of :func:`seq_to_heads`: (B, H / W, N, ...) -> (B, H, N / W, ...)."""
    ring = ring_of(group, "heads_to_seq")
    check_layout(layout, "heads_to_seq")
    if y.dim() < 3 or y.shape[2] % ring.world:
        raise ShapeError(f"heads_to_seq: y: expected (B, H / W, N, ...) with N divisible by world = {ring.world}, got {tuple(y.shape)}", argument="y")
    return _HeadsToSeq.apply(y, ring, _order(ring.world, layout, y.shape[2], y.device))


def _check_heads(what: str, name: str, x: Any, world: int) -> None:
    if not isinstance(x, Tensor) or x.dim() < 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{what}: {name}: expected a (B, H, n, ...) tensor (this rank's tokens), got {got}", argument=name)
    if x.shape[1] % world:
        raise ParameterError(
            f"{what}: {name}: expected a head count divisible by the world size {world} (each rank takes H / world heads), "
            f"got {x.shape[1]} heads; use ring_attention (sequence-parallel) or a group of a size that divides the heads",
            argument=name,
        )


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "softmax",
    *,
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "contiguous",
    per_head: Optional[Mapping[str, Any]] = None,
    backend: Optional[str] = None,
    **params: Any,
) -> Any:
    """Any registered ``mechanism`` on a sequence split over ranks, by head parallelism (module docstring).

    Args:
        q, k, v: this rank's tokens, (B, Hq, n, D), (B, Hkv, n, D), (B, Hkv, n, Dv), split as
            ``layout`` says; every rank holds the same n; Hq and Hkv multiples of the world size.
        mechanism, backend, params: as for :func:`attnzoo.attention` (the call on the whole
            sequence of this rank's heads).
        per_head: parameters given for all Hq heads (first dimension), sliced to this rank's heads.
        group, layout: the process group (default the world) and the sequence layout.

    Returns what the mechanism returns with every (B, H / W, N, ...) tensor of it brought back
    to (B, H, n, ...) (the output; the LSE with ``return_lse=True``).
    """
    what = "ulysses_attention"
    ring = ring_of(group, what)
    check_layout(layout, what)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_heads(what, name, x, ring.world)
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ShapeError(f"{what}: k: expected q, k, v of the same local length {q.shape[2]}, got {k.shape[2]} and {v.shape[2]}", argument="k")
    hq = q.shape[1]
    for name, value in (per_head or {}).items():
        if name in params:
            raise ParameterError(f"{what}: per_head: {name!r} given twice (in per_head and as a parameter)", argument="per_head")
        if len(value) != hq:
            raise ParameterError(f"{what}: per_head: {name!r}: expected {hq} entries (one per query head), got {len(value)}", argument="per_head")
        h = hq // ring.world
        params[name] = value[ring.rank * h : (ring.rank + 1) * h]
    order = _order(ring.world, layout, ring.world * q.shape[2], q.device)
    qh, kh, vh = (_SeqToHeads.apply(x, ring, order) for x in (q, k, v))
    result = get(mechanism)(qh, kh, vh, backend=backend, **params)
    full = qh.shape[2]

    def back(x: Any) -> Any:
        if isinstance(x, Tensor) and x.dim() >= 3 and x.shape[0] == q.shape[0] and x.shape[1] == qh.shape[1] and x.shape[2] == full:
            return _HeadsToSeq.apply(x, ring, order)
        return x

    return tuple(back(x) for x in result) if isinstance(result, tuple) else back(result)
