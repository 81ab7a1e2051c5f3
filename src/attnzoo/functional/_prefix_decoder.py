"""Decoding for causal mechanisms that have no recurrent state of their own (catalog K1).

A causal mechanism whose output at position i depends only on the tokens up to i (the conformance
suite's prefix check) decodes by keeping what it has seen and calling its own forward again:

* ``queries="new"`` (mechanisms with bottom-right causal cross-attention, e.g. ``topk``): the
  state is a KV cache; a step attends the new queries to every key seen. O(T * N) per step.
* ``queries="all"`` (causal self-attention only, e.g. ``moba``, ``nsa``): the state also keeps the
  queries; a step runs the causal forward over everything seen and returns the new rows. O(cost of
  the forward over N) per step: exact, for generation with any such mechanism and for testing its
  fast paths token by token, not a serving-speed decoder.

Tensor parameters are sized by the sequence (gates per token, labels, score tables) and cannot be
bound across a growing one: they are refused, naming the parameter. Key padding is not read while
decoding (as for softmax's decoder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import ParameterError
from ..registry import DecodingState, Problem, get
from ._kv_cache import KVState

__all__ = ["PrefixDecoder", "PrefixState", "READS_AHEAD"]

#: The decoder refusal of a mechanism whose selection reads ahead (``Mechanism.causal_block``).
READS_AHEAD = "its selection reads tokens after the query (whole query blocks or the last queries, see causal_block), so no step-by-step output can equal the forward's"


@dataclass
class PrefixState(DecodingState):
    """The KV cache and, for ``queries="all"``, every query seen (B, Hq, length, D)."""

    kv: KVState = dataclasses.field(default_factory=KVState)
    q: Optional[Tensor] = None

    def tensors(self) -> dict[str, Tensor]:
        out = dict(self.kv.tensors())
        if self.q is not None:
            out["q"] = self.q
        return out

    def clone(self) -> "PrefixState":
        return dataclasses.replace(self, kv=self.kv.clone(), q=None if self.q is None else self.q.clone())


class PrefixDecoder:
    """Incremental decoding by the mechanism's own causal forward (see the module docstring)."""

    per_step = frozenset({"key_padding_mask", "return_lse", "causal", "causal_alignment"})

    def __init__(
        self,
        mechanism: str,
        queries: str,
        fit: Optional[Callable[[dict[str, Any], int], dict[str, Any]]] = None,
        required: Optional[dict[str, str]] = None,
    ):
        """``fit(params, keys_seen)``: the parameters for a forward over the keys seen so far, where
        one is bounded by the keys (``topk``'s k: the full forward's early queries keep all of
        theirs, which a short cache would otherwise refuse). ``required``: parameters whose default
        depends on the call's length (name -> why), which decoding needs given."""
        if queries not in ("new", "all"):
            raise ValueError(f"PrefixDecoder: queries: expected 'new' or 'all', got {queries!r}")
        self.mechanism, self.queries, self.fit, self.required = mechanism, queries, fit, required or {}

    def _check(self, params: dict[str, Any]) -> None:
        for name, why in self.required.items():
            if params.get(name) is None:
                raise ParameterError(f"{self.mechanism}: {name}: {why}", argument=name)
        for name, value in params.items():
            if name == "key_padding_mask" and value is not None:
                raise ParameterError(f"{self.mechanism}: key_padding_mask: not supported while decoding (pass None)", argument=name)
            tensor = isinstance(value, Tensor) or (isinstance(value, (tuple, list)) and any(isinstance(x, Tensor) for x in value))
            if name != "key_padding_mask" and tensor:
                raise ParameterError(
                    f"{self.mechanism}: {name}: a tensor sized by the sequence cannot be bound while decoding (decode without it)", argument=name
                )

    def init_state(self, problem: Problem, **params: Any) -> PrefixState:
        self._check(params)
        return PrefixState()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: PrefixState, **params: Any) -> tuple[Any, PrefixState]:
        self._check(params)
        copy = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        kv = state.kv.append(k, v, copy=copy)
        mech = get(self.mechanism)
        call = {name: value for name, value in params.items() if name != "key_padding_mask"}
        names = {p.name for p in mech.params}
        if "causal" in names:
            call["causal"] = True
        if "causal_alignment" in names:
            call["causal_alignment"] = "bottom_right"
        if self.fit is not None:
            call = self.fit(call, kv.length)
        if self.queries == "new":
            return mech(q, kv.k, kv.v, **call), dataclasses.replace(state, kv=kv)
        queries = q if state.q is None else torch.cat([state.q, q], dim=2)
        result = mech(queries, kv.k, kv.v, **call)
        new = q.shape[2]
        out = tuple(r[:, :, -new:] for r in result) if isinstance(result, tuple) else result[:, :, -new:]
        return out, dataclasses.replace(state, kv=kv, q=queries)
