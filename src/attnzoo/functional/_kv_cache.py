"""A growing KV cache as an immutable decoding state, shared by the mechanisms that decode by
attending everything seen so far (softmax, the score-level variants)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..registry import DecodingState

__all__ = ["KVBuffer", "KVState"]


class KVBuffer:
    """Storage shared by the KV states of one decoding history: ``k``, ``v`` (B, Hkv, capacity,
    D), of which the first ``written`` rows are filled. A state of length ``written`` is the
    newest owner and may append in place; rows past a state's length belong to other states."""

    __slots__ = ("k", "v", "written")

    def __init__(self, k: Tensor, v: Tensor, written: int):
        self.k, self.v, self.written = k, v, written

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@dataclass
class KVState(DecodingState):
    """The decoding state of softmax attention: the first ``length`` rows of a :class:`KVBuffer`.

    Appending is copy-on-write, so a state is never changed by a later step: the newest state of
    a history writes its new rows past its own length, where no other state looks, and doubles
    the capacity when full (amortized O(1) per token, O(log n) reallocations over n steps); an
    older state (a branch point) first copies its rows into a fresh buffer. Under autograd every
    append copies (``torch.cat``), so the rows an earlier output saved for its backward are never
    written again.
    """

    length: int = 0
    buffer: Optional[KVBuffer] = None

    @property
    def k(self) -> Optional[Tensor]:
        """The cached keys (B, Hkv, length, D), a view of the buffer; None before the first step."""
        return None if self.buffer is None else self.buffer.k[:, :, : self.length]

    @property
    def v(self) -> Optional[Tensor]:
        return None if self.buffer is None else self.buffer.v[:, :, : self.length]

    def tensors(self) -> dict[str, Tensor]:
        return {} if self.buffer is None else {"k": self.k, "v": self.v}

    def clone(self) -> "KVState":
        if self.buffer is None:
            return dataclasses.replace(self)
        return dataclasses.replace(self, buffer=KVBuffer(self.k.clone(), self.v.clone(), self.length))

    def append(self, k: Tensor, v: Tensor, copy: bool = False) -> "KVState":
        """The state after the new keys/values (B, Hkv, T, D); ``copy``: into new tensors (autograd)."""
        n = self.length + k.shape[2]
        if self.buffer is None and copy:
            return dataclasses.replace(self, length=n, buffer=KVBuffer(k, v, n))
        if copy:
            keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            return dataclasses.replace(self, length=n, buffer=KVBuffer(keys, values, n))
        buffer = self.buffer
        if buffer is None or buffer.written != self.length or n > buffer.capacity:
            buffer = self._grown(k, v, max(16, n, 2 * self.length))
        buffer.k[:, :, self.length : n] = k
        buffer.v[:, :, self.length : n] = v
        buffer.written = n
        return dataclasses.replace(self, length=n, buffer=buffer)

    def _grown(self, k: Tensor, v: Tensor, capacity: int) -> KVBuffer:
        """A fresh buffer of ``capacity`` rows holding this state's rows (the only copy an append makes)."""
        new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
        new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
        if self.length:
            new_k[:, :, : self.length] = self.k
            new_v[:, :, : self.length] = self.v
        return KVBuffer(new_k, new_v, self.length)
