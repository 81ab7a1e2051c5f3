"""The few communication patterns the distributed attentions use, over plain torch.distributed.

Every call goes through ``torch.distributed``'s module attributes at call time (``dist.isend``,
``dist.all_gather_single`` ...), so a test can wrap them to count the collectives. Works with
gloo (CPU) and NCCL (CUDA): the ring exchange posts its send and its receive together
(``batch_isend_irecv`` under NCCL, where separate non-blocking calls can deadlock; plain
``isend``/``irecv`` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ParameterError

__all__ = ["Ring", "ring_of", "all_gather", "reduce_scatter", "all_to_all"]

#: Tags of the point-to-point messages (K/V and their gradients travel at once between a pair).
KV_TAG, GRAD_TAG, STATE_TAG, HALO_TAG = 11, 12, 13, 14


@dataclass(frozen=True)
class Ring:
    """A process group seen as a ring: this rank, the world size, and the global ranks of the
    next and previous members (point-to-point calls take global ranks)."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world: int
    next: int
    prev: int
    nccl: bool

    def global_rank(self, r: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return r
        return dist.get_global_rank(self.group, r)

    def exchange(self, send: Optional[Tensor], recv_like: Optional[Tensor], *, to: str = "next", tag: int = KV_TAG) -> "Exchange":
        """Post ``send`` to the ``to`` neighbour ("next" or "prev") and a receive from the other one.

        Either side may be None (the first or last rank of a chain). Returns a handle whose
        ``wait()`` gives the received tensor (or None)."""
        if self.world == 1:  # to ourselves: gloo has no self pair
            return Exchange([], send if recv_like is not None else None, None)
        dst, src = (self.next, self.prev) if to == "next" else (self.prev, self.next)
        received = None if recv_like is None else torch.empty_like(recv_like, memory_format=torch.contiguous_format)
        send = None if send is None else send.contiguous()
        if self.nccl:
            ops = []
            if send is not None:
                ops.append(dist.P2POp(dist.isend, send, dst, self.group, tag))
            if received is not None:
                ops.append(dist.P2POp(dist.irecv, received, src, self.group, tag))
            works = dist.batch_isend_irecv(ops) if ops else []
        else:
            works = []
            if send is not None:
                works.append(dist.isend(send, dst, group=self.group, tag=tag))
            if received is not None:
                works.append(dist.irecv(received, src, group=self.group, tag=tag))
        return Exchange(works, received, send)


class Exchange:
    """Pending point-to-point messages; ``wait()`` returns the received tensor (or None)."""

    def __init__(self, works: list, received: Optional[Tensor], sent: Optional[Tensor]):
        self.works, self.received, self._sent = works, received, sent  # keep the send buffer alive

    def wait(self) -> Optional[Tensor]:
        for w in self.works:
            if w is not None:
                w.wait()
        self.works = []
        return self.received


def ring_of(group: Optional[dist.ProcessGroup], what: str) -> Ring:
    """The :class:`Ring` of ``group`` (default: the world); ParameterError naming ``group`` when
    torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise ParameterError(
            f"{what}: group: torch.distributed is not initialized (call torch.distributed.init_process_group "
            "with 'gloo' on CPU or 'nccl' on CUDA first)",
            argument="group",
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ring = Ring(group, rank, world, 0, 0, dist.get_backend(group) == "nccl")
    return Ring(group, rank, world, ring.global_rank((rank + 1) % world), ring.global_rank((rank - 1) % world), ring.nccl)


def all_gather(x: Tensor, ring: Ring) -> Tensor:
    """(world, *x.shape): every rank's ``x``, in rank order (one collective)."""
    out = x.new_empty(ring.world * x.numel())  # flat: gloo wants (world * numel,) or (world * dim 0, ...)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous().view(-1), group=ring.group)
    return out.view(ring.world, *x.shape)


def reduce_scatter(x: Tensor, ring: Ring) -> Tensor:
    """``x`` (world, ...) summed over the ranks, entry ``rank`` kept (one collective)."""
    out = x.new_empty(x[0].numel())
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x.contiguous().view(-1), group=ring.group)
    return out.view(x.shape[1:])


def all_to_all(x: Tensor, ring: Ring) -> Tensor:
    """``x`` (world, ...): entry j goes to rank j; returns (world, ...) whose entry j came from rank j."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x.contiguous(), group=ring.group)
    return out
