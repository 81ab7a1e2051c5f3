"""Causal linear-family attention over a sequence split across ranks, the recurrent state passed along.

Causal linear attention is a recurrence over a state ``S_t = gamma S_(t-1) + phi(k_t)^T [v_t, 1]``
(F x Dv' numbers per head; ``gamma = 1`` for ``linear``, RetNet's per-head decay for
``retention``), and every output reads only the state before it plus its own chunk. So for a
sequence split over W ranks (contiguous layout, n tokens each):

1. each rank computes, in parallel, the state of its own tokens from zero,
   ``L_r = sum_j gamma^(n-1-j) phi(k_j)^T [v_j, 1]`` (``O(n F Dv)``, no attention);
2. the prefix states go along the ranks: rank r receives ``S_in(r)`` from rank r - 1 and sends
   ``S_in(r + 1) = gamma^n S_in(r) + L_r`` to rank r + 1 (W - 1 messages of ``B H F Dv'`` numbers,
   a chain: its latency grows with W, its volume does not grow with N);
3. each rank runs the mechanism's own decoding step on its chunk from ``S_in(r)`` (the chunked
   Lightning Attention-2 form of :mod:`attnzoo.kernels.linear_scan`, exact): the local output
   plus the contribution of the prefix state, with the positions (``seen = r n``) that
   position-dependent normalizations (retention's ``normalize_decay``) need.

Bidirectional (``causal=False``, mechanisms without decay such as ``linear``): every query reads
the state of all N keys, ``sum_r L_r``: one all-reduce of ``B H F Dv'`` numbers, then
``phi(q) S`` locally.

The backward runs the chain the other way: rank r receives ``dS_in(r + 1)``, which is the
gradient of its ``L_r`` and adds ``gamma^n dS_in(r + 1)`` to its own ``dS_in(r)`` before sending
that to rank r - 1. Exact against one process (gradients included).

Works for every mechanism whose decoder is the linear family's state decoder (``linear``,
``retention`` and the others of :mod:`attnzoo.functional.linear` that decode with a state);
others are refused naming ``mechanism``. torch has no counterpart (its context parallel covers
softmax SDPA / FlexAttention only).

Example::

    q, k, v = (shard_sequence(x) for x in (q_full, k_full, v_full))      # contiguous layout
    out = state_passing_attention(q, k, v, "retention")                   # causal
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ParameterError, ShapeError
from ..functional.linear._shared import ScanDecoder
from ..kernels.linear_scan import append_ones, prefix_state
from ..registry import get
from ._comm import STATE_TAG, Ring, ring_of

__all__ = ["state_passing_attention"]


class _PassState(torch.autograd.Function):
    """``S_in`` of this rank from every earlier rank's local state ``L`` (a chain along the ranks)."""

    @staticmethod
    def forward(ctx, local, decay, ring: Ring):
        ctx.ring, ctx.decay = ring, decay
        if ring.rank == 0:
            start = torch.zeros_like(local)
        else:
            start = ring.exchange(None, local, to="next", tag=STATE_TAG).wait()  # from the previous rank
        if ring.rank < ring.world - 1:
            after = local + (start if decay is None else decay * start)
            ring.exchange(after, None, to="next", tag=STATE_TAG).wait()
        return start

    @staticmethod
    def backward(ctx, dstart):
        ring: Ring = ctx.ring
        if ring.rank < ring.world - 1:
            dafter = ring.exchange(None, dstart, to="prev", tag=STATE_TAG).wait()  # from the next rank
        else:
            dafter = torch.zeros_like(dstart)
        if ring.rank > 0:
            total = dstart + (dafter if ctx.decay is None else ctx.decay * dafter)
            ring.exchange(total, None, to="prev", tag=STATE_TAG).wait()
        return dafter, None, None


class _SumStates(torch.autograd.Function):
    """The sum of every rank's state (one all-reduce); its gradient is the all-reduce of the gradients."""

    @staticmethod
    def forward(ctx, local, ring: Ring):
        ctx.ring = ring
        total = local.clone()
        dist.all_reduce(total, group=ring.group)
        return total

    @staticmethod
    def backward(ctx, dtotal):
        grad = dtotal.clone()
        dist.all_reduce(grad, group=ctx.ring.group)
        return grad, None


def state_passing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "linear",
    *,
    group: Optional[dist.ProcessGroup] = None,
    **params: Any,
) -> Tensor:
    """Causal ``mechanism`` of the linear family on a sequence split over ranks (module docstring).

    Args:
        q, k, v: this rank's tokens in the contiguous layout (rank r holds tokens
            ``[r n, (r + 1) n)``), (B, Hq, n, D), (B, Hkv, n, D), (B, Hkv, n, Dv); every rank
            holds the same n.
        mechanism: a registered mechanism decoding with the linear family's state (``linear``,
            ``retention``, ...).
        params: the mechanism's parameters; no ``key_padding_mask``. ``causal`` defaults to
            True; ``causal=False`` (mechanisms without decay, e.g. ``linear``) sums every rank's
            state with one all-reduce instead of the chain (its backward: one more).

    Returns the output of this rank's tokens, exactly the mechanism on the whole sequence.
    """
    what = "state_passing_attention"
    ring = ring_of(group, what)
    mech = get(mechanism)
    if not isinstance(mech.decoder, ScanDecoder):
        raise ParameterError(f"{what}: mechanism: {mechanism!r} keeps no linear state to pass (expected one of the linear family "
                             "that decodes with a state, e.g. 'linear', 'retention'); use ring_attention or ulysses_attention", argument="mechanism")
    causal = params.get("causal", True)
    if not isinstance(causal, bool):
        raise ParameterError(f"{what}: causal: expected a bool, got {causal!r}", argument="causal")
    if params.get("key_padding_mask") is not None:
        raise ParameterError(f"{what}: key_padding_mask: not supported (give every rank real tokens only)", argument="key_padding_mask")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ShapeError(f"{what}: {name}: expected a (B, H, n, D) tensor (this rank's tokens)", argument=name)
    n = q.shape[2]
    if k.shape[2] != n or v.shape[2] != n:
        raise ShapeError(f"{what}: k: expected q, k, v of the same local length {n}, got {k.shape[2]} and {v.shape[2]}", argument="k")
    params = {**params, "causal": causal}
    bound = mech.bind(mech.describe(q, k, v), params)
    ops = mech.decoder.operands(q, k, v, bound)
    values = append_ones(ops.v) if ops.normalizer else ops.v
    local = prefix_state(ops.k, values, ops.log_decay)  # (B, H, F, Dv'): this rank's tokens from zero
    if not causal:
        if ops.log_decay is not None:
            raise ParameterError(f"{what}: causal: False is supported for mechanisms without decay (a bidirectional decay "
                                 f"gamma^|i-j| is no sum of per-rank states); {mechanism!r} has one", argument="causal")
        total = _SumStates.apply(local, ring)  # every key of every rank
        out = ops.q @ total
        out = out if ops.scale == 1.0 else out * ops.scale
        return mech.decoder.finish(out, bound, n, n * ring.world).to(ops.dtype)
    state = mech.init_state(q, k, v, **params)
    decay = None if ops.log_decay is None else torch.exp(ops.log_decay.to(local.dtype) * n).view(-1, 1, 1)
    start = _PassState.apply(local, decay, ring)
    state = dataclasses.replace(state, kv=start, seen=ring.rank * n)
    per_step = {key: value for key, value in params.items() if key in mech.decoder.per_step}
    out, _ = mech.step(q, k, v, state, **per_step)
    return out
