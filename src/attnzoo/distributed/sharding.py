"""How a sequence is split over the ranks: the layouts, and the helpers to shard and unshard.

``"contiguous"``: rank r holds tokens ``[r n, (r + 1) n)`` (n = N / world).
``"zigzag"``: the sequence is cut into ``2 world`` chunks and rank r holds chunks ``r`` and
``2 world - 1 - r`` (in that order). Under a causal mask every rank then does the same work
(the early chunk sees little, the late one much): the head-tail load balancing of
ring-flash-attention's ``zigzag_ring_flash_attn`` and of Megatron-LM / torch's context parallel
(``_HeadTailLoadBalancer``).

Lengths that do not divide are refused (:class:`~attnzoo.errors.ShapeError` naming the
argument), never padded silently: pad the sequence and mask the pads yourself if you must.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ParameterError, ShapeError
from ._comm import all_gather, ring_of

__all__ = ["LAYOUTS", "chunk_ids", "local_positions", "shard_sequence", "unshard_sequence", "check_layout"]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str, what: str) -> None:
    if layout not in LAYOUTS:
        raise ParameterError(f"{what}: layout: expected one of {LAYOUTS}, got {layout!r}", argument="layout")


def chunk_ids(rank: int, world: int, layout: str) -> tuple[int, ...]:
    """The global chunk indices a rank holds, in local order (chunks of N / world tokens for
    ``contiguous``, N / (2 world) for ``zigzag``)."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)


def _divisor(world: int, layout: str) -> int:
    return world if layout == "contiguous" else 2 * world


def local_positions(n_local: int, rank: int, world: int, layout: str = "contiguous", device: Optional[torch.device] = None) -> Tensor:
    """The global positions (int64, (n_local,)) of a rank's tokens: what RoPE or a mask needs."""
    check_layout(layout, "local_positions")
    ids = chunk_ids(rank, world, layout)
    size = n_local // len(ids)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in ids])


def shard_sequence(x: Tensor, *, group: Optional[dist.ProcessGroup] = None, layout: str = "contiguous", dim: int = 2,
                   rank: Optional[int] = None, world: Optional[int] = None) -> Tensor:
    """This rank's part of the full sequence ``x`` (the tokens along ``dim``, default 2 of (B, H, N, D)).

    ``rank``/``world`` default to the group's. ShapeError (argument ``x``) when N is not a
    multiple of ``world`` (``contiguous``) or of ``2 world`` (``zigzag``).

    Example::

        q_local = shard_sequence(q, layout="zigzag")   # rank r: chunks r and 2W-1-r of 2W
    """
    check_layout(layout, "shard_sequence")
    if rank is None or world is None:
        ring = ring_of(group, "shard_sequence")
        rank, world = ring.rank, ring.world
    n = x.shape[dim]
    div = _divisor(world, layout)
    if n % div:
        raise ShapeError(
            f"shard_sequence: x: expected a length along dim {dim} divisible by {div} "
            f"({'world' if layout == 'contiguous' else '2 * world'} for the {layout} layout, world = {world}), got {n}; "
            "pad the sequence (and mask the pads) to a multiple",
            argument="x",
        )
    chunks = x.chunk(div, dim=dim)
    return torch.cat([chunks[c] for c in chunk_ids(rank, world, layout)], dim=dim)


def unshard_sequence(x: Tensor, *, group: Optional[dist.ProcessGroup] = None, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full sequence from every rank's part (one all-gather; no gradient): the inverse of
    :func:`shard_sequence`."""
    check_layout(layout, "unshard_sequence")
    ring = ring_of(group, "unshard_sequence")
    with torch.no_grad():
        parts = all_gather(x.detach(), ring)  # (world, ...)
    per = len(chunk_ids(0, ring.world, layout))
    chunks: list[Optional[Tensor]] = [None] * (per * ring.world)
    for r in range(ring.world):
        for i, c in enumerate(chunk_ids(r, ring.world, layout)):
            chunks[c] = parts[r].chunk(per, dim=dim)[i]
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]
