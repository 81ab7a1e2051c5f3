"""Linear attention with an optional per-head decay, in three exact forms (torch, and C++ on CPU).

The engine of the linear family (catalog F): the caller applies its feature map, scale and
normalizer first (a normalizer is one more column of ones in ``v``); this module computes, for
feature-mapped queries and keys ``q`` (B, H, Nq, F), ``k`` (B, H, Nk, F) and values ``v``
(B, H, Nk, Dv)::

    out_i = sum_j w_ij (q_i . k_j) v_j
    causal:         w_ij = gamma_h ** (p_i - j)  for j <= p_i, else 0;   p_i = i + Nk - Nq
    bidirectional:  w_ij = gamma_h ** |i - j|                            (Nq = Nk when decayed)

``gamma_h`` in (0, 1] is a per-head decay, passed as ``log_decay`` = log(gamma), shape (H,);
``None`` means gamma = 1 (plain linear attention). Every form takes ``scale``, a factor on each
``q_i . k_j`` (free in the chunked form: it rides on the GEMMs' alpha instead of a pass over
q). Causal queries are bottom-right aligned: the last query sees every key (the decoding
convention). The three forms agree to rounding:

* :func:`parallel_scores` / :func:`parallel_form`: the weights ``w`` times ``q k^T``
  materialized, then times ``v``. O(Nq Nk F) time, O(Nq Nk) memory: the spec.
* :func:`chunked_form`: Lightning Attention-2's tiling (Qin et al., 2024, Sec. 3, Algorithms 1
  and 2). The sequence is cut into chunks of L tokens; inside a chunk the masked quadratic form
  (L x L scores), across chunks a state ``S = sum_j gamma^(.) k_j^T v_j`` (F x Dv) carried from
  chunk to chunk. Forward *and* backward are tiled the same way (:class:`_ChunkedCausal`): the
  backward carries the state's gradient from the last chunk to the first. O(N (L F + F Dv))
  time, O(N L + N F Dv / L) memory. Non-causal without decay is ``q (k^T v)``, O(N F Dv); with
  decay it is a causal pass plus an anti-causal (strict) pass on the reversed sequence.
* :func:`recurrent_form`: ``S_t = gamma S_(t-1) + k_t^T v_t``, ``out_t = q_t S_t``, one token at
  a time (a Python loop: the form decoding uses, and the spec of the recurrence). O(N F Dv).

:func:`chunked_scan` is the causal chunked form with a state in and out (prefill, then steps of
any length); :func:`prefix_state` folds a prefix of keys into a state.

On float32 CPU inputs the causal chunked form runs in C++ (``csrc/linear_scan.cpp``, built on
first use; ``ATTNZOO_NATIVE=0`` turns it off): each (batch, head) row walks its chunks in order
with the state in cache, so nothing of size N F Dv / L is written. Without autograd it is the
forward alone (:func:`_native_causal`); with autograd, :class:`_NativeCausal`, whose backward is
three more passes of the same kernel. :func:`fused_causal_forward` also moves the feature map
(elu + 1, relu, Based's Taylor map) and the normalization inside, and reads bfloat16 and
float16 inputs too (one pass for a whole normalized linear attention). Elsewhere (CUDA,
float64, a starting state with autograd) the torch tiling :class:`_ChunkedCausal` runs; both
compute the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ._native import load_kernel

__all__ = [
    "append_ones",
    "fused_causal_forward",
    "native_scan_usable",
    "decay_weights",
    "parallel_scores",
    "parallel_form",
    "chunked_form",
    "chunked_scan",
    "recurrent_form",
    "prefix_state",
    "decay_row_sums",
]

DEFAULT_CHUNK = 64


def append_ones(v: Tensor) -> Tensor:
    """``[v, 1]``: with these values the last output column is ``sum_j w_ij s (q_i . k_j)``, the
    normalizer of a normalized linear attention (what every form's ``normalizer=True`` means)."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


# --------------------------------------------------------------------------------------------
# the spec: materialized weights
# --------------------------------------------------------------------------------------------
def decay_weights(nq: int, nk: int, *, causal: bool, log_decay: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """w_ij of the module docstring, (H|1, Nq, Nk) in the dtype of ``like``; None when every weight is 1."""
    if not causal and log_decay is None:
        return None
    i = torch.arange(nq, device=like.device).view(-1, 1) + (nk - nq if causal else 0)
    distance = i - torch.arange(nk, device=like.device).view(1, -1)
    if causal:
        visible = distance >= 0
        distance = distance.clamp(min=0)
    else:
        distance = distance.abs()
    if log_decay is None:
        return visible.to(like.dtype).unsqueeze(0)
    weights = torch.exp(distance.to(like.dtype) * log_decay.to(like.dtype).view(-1, 1, 1))
    return weights * visible if causal else weights


def parallel_scores(q: Tensor, k: Tensor, *, causal: bool, log_decay: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """The weighted scores ``w_ij s (q_i . k_j)``, (B, H, Nq, Nk): what every other form avoids holding."""
    scores = q @ k.transpose(-1, -2)
    if scale != 1.0:
        scores = scores * scale
    weights = decay_weights(q.shape[-2], k.shape[-2], causal=causal, log_decay=log_decay, like=q)
    return scores if weights is None else scores * weights


def parallel_form(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, log_decay: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """``parallel_scores(q, k) @ v``: the quadratic, materialized form (the reference)."""
    return parallel_scores(q, k, causal=causal, log_decay=log_decay, scale=scale) @ v


def decay_row_sums(nq: int, nk: int, *, causal: bool, log_decay: Optional[Tensor], device: torch.device) -> Tensor:
    """``sum_j w_ij`` for each query, (H|1, Nq, 1) in float64, in closed form (no Nq x Nk tensor).

    A causal query at position p sees ``sum_(t=0..p) gamma^t = expm1((p+1) log g) / expm1(log g)``
    (p + 1 when gamma = 1); a bidirectional one adds the keys after it. RetNet's decay
    normalization divides by the square root of this.
    """
    p = torch.arange(nq, device=device, dtype=torch.float64) + (nk - nq if causal else 0)
    lg = torch.zeros(1, device=device, dtype=torch.float64) if log_decay is None else log_decay.to(device, torch.float64)
    lg = lg.view(-1, 1)

    def geometric(count: Tensor) -> Tensor:  # sum_(t < count) gamma^t, count >= 0
        ratio = torch.expm1(count * lg) / torch.expm1(lg)
        return torch.where(lg == 0, count.expand_as(ratio), ratio)

    before = geometric((p + 1).clamp(min=0))
    if causal:
        return before.unsqueeze(-1)
    return (before + geometric(nk - p) - 1).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# the recurrent form
# --------------------------------------------------------------------------------------------
def _decay_power(log_decay: Optional[Tensor], steps: int, like: Tensor) -> Optional[Tensor]:
    """gamma ** steps per head, shaped (H, 1, 1) to scale a (B, H, F, Dv) state; None when gamma = 1."""
    if log_decay is None:
        return None
    return torch.exp(log_decay.to(like.dtype) * steps).view(-1, 1, 1)


def _recurrent_causal(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], state: Optional[Tensor], strict: bool) -> tuple[Tensor, Tensor]:
    """Nq = Nk: one token at a time; ``strict`` reads the state before adding the token."""
    b, h, n, f = q.shape
    s = q.new_zeros(b, h, f, v.shape[-1]) if state is None else state
    gamma = _decay_power(log_decay, 1, q)
    outs = []
    for t in range(n):
        s = s if gamma is None else gamma * s
        if strict:  # key t is not seen by query t: read before adding it
            outs.append(q[:, :, t : t + 1] @ s)
        s = torch.addcmul(s, k[:, :, t].unsqueeze(-1), v[:, :, t].unsqueeze(-2))
        if not strict:
            outs.append(q[:, :, t : t + 1] @ s)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, v.shape[-1])
    return out, s


def recurrent_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    log_decay: Optional[Tensor] = None,
    state: Optional[Tensor] = None,
    scale: float = 1.0,
    normalizer: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-token state updates; returns ``(out, final state)`` (state: (B, H, F, Dv)).

    Causal: ``S_t = gamma S_(t-1) + k_t^T v_t``, ``out_t = q_t S_t`` from ``state`` (or zeros),
    queries bottom-right aligned. Bidirectional: that forward pass plus a backward pass that
    excludes the token itself (``state`` must be None; the returned state is the forward one).
    ``normalizer``: the values are ``[v, 1]`` (:func:`append_ones`).
    """
    if normalizer:
        v = append_ones(v)
    if scale != 1.0:
        q = q * scale
    if causal:
        return _aligned_causal(q, k, v, log_decay, state, lambda q_, k_, v_, s_: _recurrent_causal(q_, k_, v_, log_decay, s_, False))
    if state is not None:
        raise ValueError("recurrent_form: a bidirectional pass starts from no state")
    if log_decay is None:  # every weight is 1: one state over all keys
        kv = k.transpose(-1, -2) @ v
        return q @ kv, kv
    forward, final = _recurrent_causal(q, k, v, log_decay, None, strict=False)
    backward, _ = _recurrent_causal(q.flip(2), k.flip(2), v.flip(2), log_decay, None, strict=True)
    return forward + backward.flip(2), final


# --------------------------------------------------------------------------------------------
# alignment of causal queries (bottom-right) and prefix states
# --------------------------------------------------------------------------------------------
def prefix_state(k: Tensor, v: Tensor, log_decay: Optional[Tensor] = None, state: Optional[Tensor] = None) -> Tensor:
    """The state after the keys ``k``, ``v`` (B, H, P, ·): ``sum_j gamma^(P-1-j) k_j^T v_j`` (+ gamma^P state)."""
    p = k.shape[2]
    if log_decay is not None:
        age = torch.arange(p - 1, -1, -1, device=k.device, dtype=k.dtype)
        k = k * torch.exp(log_decay.to(k.dtype).view(-1, 1, 1) * age.view(-1, 1))
    kv = k.transpose(-1, -2) @ v
    if state is None:
        return kv
    gamma = _decay_power(log_decay, p, k)
    return kv + (state if gamma is None else gamma * state)


def _aligned_causal(q, k, v, log_decay, state, run, normalizer=False):
    """Bottom-right causal alignment around ``run(q, k, v, state) -> (out, state)`` on Nq = Nk.

    More keys than queries: the first Nk - Nq keys are seen by every query, so they fold into
    the starting state. More queries than keys: the first Nq - Nk queries see nothing (zeros).
    """
    nq, nk = q.shape[2], k.shape[2]
    if nk > nq:
        prefix = v[:, :, : nk - nq]
        state = prefix_state(k[:, :, : nk - nq], append_ones(prefix) if normalizer else prefix, log_decay, state)
        k, v = k[:, :, nk - nq :], v[:, :, nk - nq :]
    if nq > nk:
        if state is not None:
            raise ValueError("more queries than keys with a starting state: the queries' positions are ambiguous")
        out, final = run(q[:, :, nq - nk :], k, v, None)
        blind = out.new_zeros(*out.shape[:2], nq - nk, out.shape[-1])
        return torch.cat([blind, out], dim=2), final
    return run(q, k, v, state)


# --------------------------------------------------------------------------------------------
# the chunked form (Lightning Attention-2)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ChunkDecay:
    """The decay inside one chunk of L tokens, per head (gamma = exp(log_decay)).

    ``mask`` (H, L, L): gamma^(i-j) where key j is visible from row i (j <= i, or j < i when
    strict), 0 elsewhere; ``query`` (H, 1, L, 1): gamma^(i+1), how much the state entering the
    chunk has decayed by row i; ``key`` (H, 1, L, 1): gamma^(L-1-j), how much key j has decayed
    by the chunk's end; ``log_chunk`` (H,): L log(gamma), the state's decay across a chunk.
    """

    mask: Tensor
    query: Tensor
    key: Tensor
    log_chunk: Tensor

    @staticmethod
    def of(log_decay: Tensor, length: int, strict: bool, like: Tensor) -> "_ChunkDecay":
        lg = log_decay.to(like.dtype).view(-1, 1, 1)
        pos = torch.arange(length, device=like.device, dtype=like.dtype)
        distance = pos.view(-1, 1) - pos.view(1, -1)
        visible = distance > 0 if strict else distance >= 0
        mask = torch.exp(distance.clamp(min=0) * lg) * visible
        query = torch.exp((pos + 1).view(-1, 1) * lg).unsqueeze(1)
        key = torch.exp((length - 1 - pos).view(-1, 1) * lg).unsqueeze(1)
        return _ChunkDecay(mask, query, key, length * lg.view(-1))


def _mask_scores_(scores: Tensor, decay: Optional[_ChunkDecay], strict: bool) -> Tensor:
    """Zero the invisible (future) keys of each chunk's L x L scores and apply the decay, in place."""
    if decay is not None:
        return scores.mul_(decay.mask.unsqueeze(1))
    return scores.tril_(-1 if strict else 0)


def _flat(x: Tensor) -> Tensor:
    """(..., r, c) -> (batch, r, c), a view for the contiguous chunk tensors used here."""
    return x.reshape(-1, *x.shape[-2:])


def _mm(a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``alpha * (a @ b)`` over chunks with the same leading dims, as one 3D GEMM (alpha is free)."""
    a3, b3 = _flat(a), _flat(b)
    out = torch.bmm(a3, b3) if alpha == 1.0 else torch.baddbmm(a3.new_empty(a3.shape[0], a3.shape[1], b3.shape[2]), a3, b3, beta=0, alpha=alpha)
    return out.view(*a.shape[:-1], b.shape[-1])


def _add_mm(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``out += alpha * (a @ b)`` in place, one baddbmm (no temporary for the product); ``out`` contiguous."""
    out.view(-1, *out.shape[-2:]).baddbmm_(_flat(a), _flat(b), alpha=alpha)
    return out


SCAN_BLOCK = 16  # chunks per block of the two-level scan


def _block_weights(size: int, log_step: Tensor, reverse: bool) -> Tensor:
    """(H|1, size + 1, size) weights of one block of chunks j, in the scan's direction.

    Rows i < size: the state entering chunk i from the block's earlier chunks, ``gamma^(i-1-j)``
    for j < i (reversed: ``gamma^(j-1-i)`` for j > i). Last row: the state leaving the block,
    ``gamma^(size-1-j)`` (reversed, leaving through its first chunk: ``gamma^j``).
    """
    cols = torch.arange(size, device=log_step.device, dtype=log_step.dtype)
    rows = torch.arange(size + 1, device=log_step.device, dtype=log_step.dtype)
    if reverse:
        rows[size] = -1  # "leaving backwards" sits before chunk 0
        ahead = cols.view(1, -1) - 1 - rows.view(-1, 1)
    else:
        ahead = rows.view(-1, 1) - 1 - cols.view(1, -1)
    return torch.exp(log_step.view(-1, 1, 1) * ahead.clamp(min=0)) * (ahead >= 0)


def _decay_powers(log_step: Tensor, powers: Tensor) -> Tensor:
    """gamma^p per head for each p: (H|1, P, 1)."""
    return torch.exp(log_step.view(-1, 1, 1) * powers.view(-1, 1))


def _scan(increments: Tensor, start: Optional[Tensor], log_step: Optional[Tensor], reverse: bool = False) -> tuple[Tensor, Tensor]:
    """Carry a state across chunks: ``states[c]`` enters chunk c, and ``S <- gamma S + inc[c]`` after it.

    ``increments`` (B, H, n, ...) (a state per chunk), ``log_step`` (H,) the log of the state's
    decay across one chunk (None: 1), ``start`` the state entering the first chunk (None:
    zeros); ``reverse`` runs from the last chunk to the first (the backward's gradient of the
    state). Returns ``(states, the state after the last chunk)``.

    Two levels instead of one op per chunk: inside blocks of SCAN_BLOCK chunks the prefix is one
    batched GEMM with the block's decay weights, the blocks' totals are scanned the same way
    (recursively), then added back, decayed, in one pass. A loop of one small op per chunk
    measured up to 60x slower on the 2-core CPU when the other core was busy: every op over more
    than 32768 numbers is an OpenMP region that waits for both cores (7.7 ms per add).
    """
    b, h, n = increments.shape[:3]
    x = increments.reshape(b, h, n, -1)
    if log_step is None:
        return _undecayed_scan(x, start, reverse, increments.shape)
    lg = log_step.to(x.dtype)
    if n <= SCAN_BLOCK:
        states = _block_weights(n, lg, reverse)[:, :n] @ x
        if start is not None:
            ages = torch.arange(n, device=x.device, dtype=x.dtype)
            states.addcmul_(_decay_powers(lg, ages.flip(0) if reverse else ages), start.reshape(b, h, 1, -1))
    else:
        blocks = -(-n // SCAN_BLOCK)
        pad = blocks * SCAN_BLOCK - n  # zero chunks where the scan ends, so they reach no real chunk
        padded = torch.nn.functional.pad(x, (0, 0, pad, 0) if reverse else (0, 0, 0, pad)) if pad else x
        padded = padded.view(b, h, blocks, SCAN_BLOCK, -1)
        weights = _block_weights(SCAN_BLOCK, lg, reverse).unsqueeze(1)  # (H|1, 1, G + 1, G)
        states = weights[:, :, :SCAN_BLOCK] @ padded  # (B, H, blocks, G, W), within each block
        carries, _ = _scan(weights[:, :, SCAN_BLOCK:] @ padded, start, lg * SCAN_BLOCK, reverse)  # entering each block
        ages = torch.arange(SCAN_BLOCK, device=x.device, dtype=x.dtype)
        states.addcmul_(carries, _decay_powers(lg, ages.flip(0) if reverse else ages).unsqueeze(1))  # in place: no second buffer
        states = states.view(b, h, blocks * SCAN_BLOCK, -1)
        if pad:
            states = states[:, :, pad:] if reverse else states[:, :, :n]
    last = 0 if reverse else n - 1
    end = torch.exp(lg).view(-1, 1) * states[:, :, last] + x[:, :, last]
    return states.reshape(increments.shape), end.reshape(increments.shape[:2] + increments.shape[3:])


def _undecayed_scan(x: Tensor, start: Optional[Tensor], reverse: bool, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """:func:`_scan` with every decay 1: an exclusive cumulative sum (one pass; the GEMM with a
    triangle of ones costs a K = 16 batched GEMM per block, memory-bound, for the same sums)."""
    b, h, n, w = x.shape
    if reverse:  # the scan of the flipped sequence, flipped back
        states, end = _undecayed_scan(x.flip(2), start, False, x.shape)
        return states.flip(2).reshape(shape), end.reshape(shape[:2] + shape[3:])
    # [start, x_0, ..., x_(n-2)], summed in place: two passes over the states, no temporary
    states = torch.empty_like(x)
    states[:, :, 0] = 0 if start is None else start.reshape(b, h, w)
    states[:, :, 1:] = x[:, :, :-1]
    states.cumsum_(2)
    end = states[:, :, -1] + x[:, :, -1]
    return states.reshape(shape), end.reshape(shape[:2] + shape[3:])


def _token_blocks(x: Tensor, length: int) -> list[tuple[int, int, Tensor]]:
    """(B, H, N, ·) -> ``(t0, t1, chunks)``: the full chunks (B, H, N // L, L, ·) and the tail
    (B, H, 1, N % L, ·), views, with the tokens [t0, t1) each covers."""
    b, h, n, d = x.shape
    full = n // length * length
    blocks = [(0, full, x[:, :, :full].view(b, h, n // length, length, d))] if full else []
    return blocks + ([(full, n, x[:, :, full:].unsqueeze(2))] if full < n else [])


PIECE_BYTES = 16 * 2**20  # the largest temporary of one piece of rows


def _row_pieces(rows: int, n: int, length: int, f: int, dv: int, itemsize: int) -> list[slice]:
    """Rows (batch x head) processed together, so that a piece's temporaries stay under PIECE_BYTES.

    At B H N D = 8 x 16384 x 64 in float32 every (B, H, N, D) tensor is 32 MiB, glibc's largest
    mmap threshold: each new one is mapped afresh and page-faulted (a multiply into a new tensor
    took 15.5 ms, into an existing one 2.7 ms). Pieces keep the scores, states and partial
    outputs under it, reused from the heap, and bound the memory whatever B x H.
    """
    per_row = n * max(length, f * dv // length + 1, f, dv) * itemsize
    size = max(1, min(rows, PIECE_BYTES // max(per_row, 1)))
    return [slice(r, min(r + size, rows)) for r in range(0, rows, size)]


def _block_forward(q, k, v, start, decay, strict, scale):
    """One run of chunks (B, H, n, L, ·): inter-chunk state plus intra-chunk masked scores.

    Returns ``(out, states entering each chunk, state after the last)``.
    """
    keys = k if decay is None else k * decay.key
    states, end = _scan(_mm(keys.transpose(-1, -2), v), start, None if decay is None else decay.log_chunk)
    out = _mm(q, states, scale)
    if decay is not None:
        out.mul_(decay.query)
    scores = _mask_scores_(_mm(q, k.transpose(-1, -2), scale), decay, strict)
    return _add_mm(out, scores, v), states, end


def _block_backward(q, k, v, states, dout, dend, decay, strict, scale):
    """Gradients of one run of chunks given d(out) and d(state after the last chunk).

    The state's gradient runs backwards: ``G[c]`` is the gradient reaching the state that leaves
    chunk c, ``G[c-1] = gamma^L G[c] + s (gamma^(i+1) q_c)^T dout_c``. Then, per chunk,
    ``dq = s (gamma^(i+1) dout S^T + dP k)``, ``dk = gamma^(L-1-j) v G^T + s dP^T q`` and
    ``dv = gamma^(L-1-j) k G + A^T dout``, with ``dP = mask(dout v^T)``, ``A = mask(s q k^T)``.
    Returns ``(dq, dk, dv, gradient of the state entering the first chunk)``.
    """
    log_chunk = None if decay is None else decay.log_chunk
    weighted_q = q if decay is None else q * decay.query
    leaving, dstart = _scan(_mm(weighted_q.transpose(-1, -2), dout, scale), dend, log_chunk, reverse=True)
    del weighted_q
    dp = _mask_scores_(_mm(dout, v.transpose(-1, -2)), decay, strict)
    dq = _mm(dout, states.transpose(-1, -2), scale)
    dk = _mm(v, leaving.transpose(-1, -2))
    dv = _mm(k, leaving)
    if decay is not None:
        dq.mul_(decay.query)
        dk.mul_(decay.key)
        dv.mul_(decay.key)
    _add_mm(dq, dp, k, scale)
    _add_mm(dk, dp.transpose(-1, -2), q, scale)
    del dp
    scores = _mask_scores_(_mm(q, k.transpose(-1, -2), scale), decay, strict)
    _add_mm(dv, scores.transpose(-1, -2), dout)
    return dq, dk, dv, dstart


class _ChunkedCausal(torch.autograd.Function):
    """Causal chunked linear attention (Nq = Nk) from a state, with a chunked backward.

    Inputs ``q, k`` (B, H, N, F), ``v`` (B, H, N, Dv), ``start`` (B, H, F, Dv) or None;
    outputs ``(out, state after the last token)``. Rows (batch x head) go through in pieces
    (:func:`_row_pieces`), each over the whole sequence. Saves q, k, v and the per-chunk states
    (N F Dv / L numbers a row); recomputes the L x L scores in the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, start, log_decay, length, strict, scale):
        ctx.set_materialize_grads(False)
        b, h, n, f = q.shape
        dv, rows = v.shape[-1], b * h
        q3, k3, v3 = (x.reshape(1, rows, n, x.shape[-1]) for x in (q, k, v))
        row_decay = None if log_decay is None else log_decay.to(q.dtype).repeat(b)  # rows are batch-major
        start3 = None if start is None else start.reshape(1, rows, f, dv)
        out, end = q.new_empty(1, rows, n, dv), q.new_empty(1, rows, f, dv)
        saved, pieces = [], _row_pieces(rows, n, length, f, dv, q.element_size())
        for r in pieces:
            state = None if start3 is None else start3[:, r]
            for (t0, t1, qb), (_, _, kb), (_, _, vb) in zip(_token_blocks(q3[:, r], length), _token_blocks(k3[:, r], length), _token_blocks(v3[:, r], length)):
                decay = None if row_decay is None else _ChunkDecay.of(row_decay[r], qb.shape[3], strict, q)
                block_out, states, state = _block_forward(qb, kb, vb, state, decay, strict, scale)
                out[:, r, t0:t1].copy_(block_out.flatten(2, 3))
                saved.append(states)
            end[:, r].copy_(state)
        ctx.save_for_backward(q, k, v, row_decay, *saved)
        ctx.length, ctx.strict, ctx.scale, ctx.pieces, ctx.has_start = length, strict, scale, pieces, start is not None
        return out.view(b, h, n, dv), end.view(b, h, f, dv)

    @staticmethod
    def backward(ctx, dout, dend):
        q, k, v, row_decay, *saved = ctx.saved_tensors
        b, h, n, f = q.shape
        dv, rows, length = v.shape[-1], b * h, ctx.length
        q3, k3, v3 = (x.reshape(1, rows, n, x.shape[-1]) for x in (q, k, v))
        dout3 = q.new_zeros(1, rows, n, dv) if dout is None else dout.reshape(1, rows, n, dv).contiguous()
        dend3 = None if dend is None else dend.reshape(1, rows, f, dv)
        dq, dk, dvalue = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
        dstart = q.new_empty(1, rows, f, dv) if ctx.has_start else None
        states_of = iter(saved)
        for r in ctx.pieces:
            blocks = [_token_blocks(x[:, r], length) for x in (q3, k3, v3, dout3)]
            blocks = [(*parts, next(states_of)) for parts in zip(*blocks)]
            dstate = None if dend3 is None else dend3[:, r]
            for (t0, t1, qb), (_, _, kb), (_, _, vb), (_, _, dob), states in reversed(blocks):  # gradients flow back in time
                decay = None if row_decay is None else _ChunkDecay.of(row_decay[r], qb.shape[3], ctx.strict, q)
                dqb, dkb, dvb, dstate = _block_backward(qb, kb, vb, states, dob, dstate, decay, ctx.strict, ctx.scale)
                for grad, block in ((dq, dqb), (dk, dkb), (dvalue, dvb)):
                    grad[:, r, t0:t1].copy_(block.flatten(2, 3))
            if dstart is not None:
                dstart[:, r].copy_(dstate)
        dstart = None if dstart is None else dstart.view(b, h, f, dv)
        return dq.view(q.shape), dk.view(k.shape), dvalue.view(v.shape), dstart, None, None, None, None


def _native_scan() -> Optional[object]:
    return load_kernel("linear_scan", "linear-attention scan")


def _native_takes(tensors: tuple[Optional[Tensor], ...], dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """CPU inputs whose q, k and v have one of ``dtypes`` (the state and decay may be anything on
    the CPU), and the kernel built. Never while torch.compile traces: the extension is opaque to it
    (a graph break), so compiled code takes the torch tiling."""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in present) or any(t.dtype not in dtypes for t in present[:3]):
        return False
    return _native_scan() is not None


#: What the fused forward reads: it computes in float32 and returns the inputs' dtype.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def native_scan_usable(*tensors: Optional[Tensor]) -> bool:
    """Whether the C++ forward (``csrc/linear_scan.cpp``) takes these inputs as they are: float32
    on the CPU, nothing that needs a gradient, and the kernel built."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return _native_takes(tensors)


#: The feature maps the C++ kernel applies itself (its ``map`` codes): elu (+ 1) and relu
#: pointwise, taylor Based's second-order map of ``feature_dim`` channels.
NATIVE_MAPS = {"identity": 0, "elu": 1, "relu": 2, "taylor": 3}


def _native_causal(
    q, k, v, log_decay, state, length, scale, strict, normalizer, feature_map="identity", query_scale=1.0, eps=None, reverse=False, feature_dim=None
):
    """The causal chunked forward in C++: one row (batch, head) per task, its state in cache.

    ``feature_map`` (a :data:`NATIVE_MAPS` name; taylor over ``feature_dim`` channels, None: all)
    is applied to ``query_scale * q`` and to ``k`` inside; ``eps`` (with ``normalizer``) divides
    by the normalizer inside and drops its column; ``reverse`` runs from the last token to the
    first (anti-causal).
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    empty = q.new_empty(0)
    state = empty if state is None else state
    log_decay = empty if log_decay is None else log_decay
    divide = eps is not None
    return _native_scan().causal_forward(  # type: ignore[union-attr]
        q, k, v, state, log_decay, float(scale), length, strict, normalizer, NATIVE_MAPS[feature_map], feature_dim or q.shape[-1],
        float(query_scale), divide, float(eps or 0.0), reverse,
    )


class _NativeCausal(torch.autograd.Function):
    """Causal chunked linear attention (Nq = Nk, from no state) in C++ both ways.

    The gradients of a causal linear attention are linear attentions themselves, so the backward
    is three more passes of the same kernel, two of them anti-causal (``reverse``)::

        dq_i = s sum_(j <= i) w_ij (dO_i . v_j) k_j       (q, k, v) <- (dO, v, k)
        dk_j = s sum_(i >= j) w_ij (v_j . dO_i) q_i       (q, k, v) <- (v, dO, q), reversed
        dv_j = s sum_(i >= j) w_ij (k_j . q_i) dO_i       (q, k, v) <- (k, q, dO), reversed

    (strict: j < i throughout), plus the final state's gradient dE when it is used:
    ``dk_j += gamma^(N-1-j) v_j dE^T``, ``dv_j += gamma^(N-1-j) k_j dE``. It saves q, k and v
    only: no per-chunk states (the torch tiling, :class:`_ChunkedCausal`, saves N F Dv / L numbers
    a row). With ``normalizer`` the values are ``[v, 1]``; the column's gradient is dropped.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, length, strict, scale, normalizer):
        ctx.set_materialize_grads(False)  # an unused final state gets no zero gradient to multiply
        out, end = _native_causal(q, k, v, log_decay, None, length, scale, strict, normalizer)
        ctx.save_for_backward(q, k, v, log_decay)
        ctx.length, ctx.strict, ctx.scale, ctx.normalizer = length, strict, scale, normalizer
        return out, end

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dend):
        q, k, v, log_decay = ctx.saved_tensors
        values = append_ones(v) if ctx.normalizer else v
        if dout is None:
            dout = values.new_zeros(*q.shape[:3], values.shape[-1])

        def run(a, b, c, reverse):
            return _native_causal(a, b, c, log_decay, None, ctx.length, ctx.scale, ctx.strict, False, reverse=reverse)[0]

        dq = run(dout, values, k, False)
        dk = run(values, dout, q, True)
        dvalues = run(k, q, dout, True)
        if dend is not None:  # end = sum_j gamma^(N-1-j) k_j^T v_j
            age = torch.arange(q.shape[2] - 1, -1, -1, device=q.device, dtype=q.dtype)
            weight = torch.ones_like(age).view(1, -1, 1) if log_decay is None else torch.exp(log_decay.to(q.dtype).view(-1, 1, 1) * age.view(-1, 1))
            dk.add_((values * weight) @ dend.transpose(-1, -2))
            dvalues.add_((k * weight) @ dend)
        dv = dvalues[..., : v.shape[-1]] if ctx.normalizer else dvalues
        return dq, dk, dv, None, None, None, None, None


def fused_causal_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: Any = "identity",
    query_scale: float = 1.0,
    scale: float = 1.0,
    log_decay: Optional[Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    eps: Optional[float] = None,
    feature_dim: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> Optional[Tensor]:
    """Causal self-attention (Nq = Nk) with the feature map and the normalization inside the C++
    kernel: one pass over q, k and v, no temporary. None when the kernel cannot take the inputs
    (CPU tensors of one of :data:`FUSED_DTYPES`, computed in float32, nothing that needs a
    gradient; other devices, dtypes or maps go through the other forms).

    ``out_i = sum_(j <= i) gamma^(i-j) s (phi(c q_i) . phi(k_j)) v_j``, divided by the same sum
    over ``[v_j = 1]`` plus ``eps`` when ``eps`` is given; ``phi`` one of :data:`NATIVE_MAPS` (any
    other map, a callable included, gives None)
    (``taylor`` over the first ``feature_dim`` channels, None: all), ``c = query_scale``,
    ``s = scale``. k and v may have fewer heads than q (GQA). The output comes in ``dtype``
    (None: the inputs'; float32 keeps the kernel's result unrounded for more work after it).
    """
    if not (isinstance(feature_map, str) and feature_map in NATIVE_MAPS) or q.shape[2] != k.shape[2] or q.shape[2] == 0 or len({q.dtype, k.dtype, v.dtype}) != 1:
        return None
    if (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))) or not _native_takes((q, k, v, log_decay), FUSED_DTYPES):
        return None
    length = min(chunk_size, q.shape[2])
    out, _ = _native_causal(q, k, v, log_decay, None, length, scale, False, eps is not None, feature_map, query_scale, eps, feature_dim=feature_dim)
    return out.to(dtype or q.dtype)


def _chunked_causal(q, k, v, log_decay, state, chunk_size, scale, strict=False, normalizer=False):
    if q.shape[2] == 0:
        cols = v.shape[-1] + normalizer
        empty = q.new_zeros(*q.shape[:3], cols)
        return empty, (q.new_zeros(*q.shape[:2], q.shape[-1], cols) if state is None else state)
    length = min(chunk_size, q.shape[2])
    if native_scan_usable(q, k, v, state, log_decay):
        return _native_causal(q, k, v, log_decay, state, length, scale, strict, normalizer)
    if state is None and _native_takes((q, k, v, log_decay)):  # autograd, C++ both ways (no gradient for the decay, as below)
        return _NativeCausal.apply(q, k, v, log_decay, length, strict, float(scale), normalizer)
    if normalizer:
        v = append_ones(v)
    return _ChunkedCausal.apply(q.contiguous(), k.contiguous(), v.contiguous(), state, log_decay, length, strict, float(scale))


def chunked_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_decay: Optional[Tensor] = None,
    state: Optional[Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    scale: float = 1.0,
    normalizer: bool = False,
) -> tuple[Tensor, Tensor]:
    """Causal chunked form from ``state`` (or zeros): ``(out, state after the last key)``.

    Queries are bottom-right aligned against the keys (Nk >= Nq when a state is given). Feeding
    a sequence in pieces, each starting from the previous state, equals one call on the whole.
    ``normalizer``: the values are ``[v, 1]`` (:func:`append_ones`), the column never built on
    the native path. Float32 CPU inputs that need no gradient run the C++ kernel
    (:func:`native_scan_usable`), the rest :class:`_ChunkedCausal`; both compute the same tiling.
    """

    def run(q_, k_, v_, s_):
        return _chunked_causal(q_, k_, v_, log_decay, s_, chunk_size, scale, normalizer=normalizer)

    return _aligned_causal(q, k, v, log_decay, state, run, normalizer)


def chunked_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    log_decay: Optional[Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    scale: float = 1.0,
    normalizer: bool = False,
) -> Tensor:
    """The chunked (Lightning Attention-2) form of the module docstring; ``chunk_size`` tokens per
    chunk; ``normalizer`` as in :func:`chunked_scan`."""
    if causal:
        return chunked_scan(q, k, v, log_decay=log_decay, chunk_size=chunk_size, scale=scale, normalizer=normalizer)[0]
    if normalizer and (log_decay is None or not native_scan_usable(q, k, v, log_decay)):
        v, normalizer = append_ones(v), False
    if log_decay is None:  # every weight is 1: attend to one state holding every key
        out = q @ (k.transpose(-1, -2) @ v)
        return out if scale == 1.0 else out * scale
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"chunked_form: a decayed bidirectional pass needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    forward, _ = _chunked_causal(q, k, v, log_decay, None, chunk_size, scale, normalizer=normalizer)
    backward, _ = _chunked_causal(q.flip(2), k.flip(2), v.flip(2), log_decay, None, chunk_size, scale, strict=True, normalizer=normalizer)
    return forward + backward.flip(2)
