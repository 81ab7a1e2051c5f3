"""Ring (context-parallel) softmax attention: the sequence split over ranks, exact forward and backward.

Algorithm (Ring Attention, Liu, Zaharia & Abbeel, 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context", Sec. 3; the blockwise softmax of FlashAttention):
every rank holds the queries, keys and values of its part of the sequence. In ``world`` steps
each rank attends its queries to one rank's keys and values, giving a partial output ``o_s`` and
its log-sum-exp ``lse_s``, and the partials are combined exactly by
:func:`attnzoo.merge_attention_states`:

    lse = log sum_s exp(lse_s),    out = sum_s exp(lse_s - lse) o_s.

The keys and values reach the ranks in one of two ways (``comm``):

* ``"p2p"``: the ring proper. At step s rank r holds the K/V of rank ``r - s`` and passes them to
  ``r + 1`` (``isend``/``irecv``) while it computes, so communication hides behind compute when a
  block's attention takes longer than moving it. Per step each rank sends and receives one
  block: ``B Hkv n (D + Dv)`` numbers, ``world - 1`` times in the forward; memory stays at two
  K/V blocks.
* ``"allgather"``: one all-gather of every rank's K/V before computing (the ``"allgather"``
  rotate method of torch's context parallel, the choice of Llama 3's training): one collective
  instead of ``world - 1`` messages, for ``world`` K/V blocks of memory on every rank.

``p2p`` is the default for its memory: per-rank peak of the causal zigzag forward at N = 2048,
H 8, D 64 on CPU processes (``attnzoo bench distributed``), world 4: 12.3 MiB (p2p) against
20.5 MiB (allgather); times were within the noise of a shared 2-core machine, where nothing can
overlap (the all-gather's one collective should win on slow links with few ranks; measure).

Backward: the ring backward of ring-flash-attention (zhuzilin/ring-flash-attention), written
out: with the final ``out`` and ``lse`` saved, the gradient of a block needs only that block
(``P = exp(S - lse)``, ``dS = P (dP - rowsum(dO out) + dlse)``), so each step computes ``dQ`` for
its queries and ``dK, dV`` of the visiting block; ``dK, dV`` travel with the K/V around the ring
and reach their owner after ``world`` hops (``p2p``: ``world - 1`` K/V messages and ``world``
gradient messages), or are summed and sent home by one reduce-scatter (``allgather``: one
all-gather and one reduce-scatter). The gradient of the returned ``lse`` is included. A block's
gradients come from torch's CPU flash-attention backward
(``aten._scaled_dot_product_flash_attention_for_cpu_backward``, given the final out and lse) on
CPU in float32/64 when the LSE is not differentiated, else from the materialized form here.

Causal masking and load balance: with the ``"zigzag"`` layout
(:mod:`attnzoo.distributed.sharding`; rank r holds chunks r and 2W-1-r of 2W, the head-tail
balancing of ring-flash-attention's ``zigzag_ring_flash_attn`` and of Megatron-LM / torch's
context parallel), step 0 is causal on the rank's own tokens, a step whose visitor comes from an
earlier rank attends every query to the visitor's first chunk, one from a later rank attends
the rank's second chunk to the whole visitor: every rank does the same work at every step. With
``"contiguous"`` causal attention is exact too, but rank r skips ``world - 1 - r`` steps while
rank ``world - 1`` works at every one.

Costs per rank, sequence N over W ranks, n = N / W: compute ``O(N n D)`` (non-causal; half under
a causal mask); memory ``O(n (D + Dv))`` for ``p2p`` plus one (B, Hq, rows, n) score block
per call, chunked to bound it; communication ``(W - 1) B Hkv n (D + Dv)`` numbers sent per rank
in the forward, about three times that in forward + backward. GQA/MQA: the Hkv key/value
heads travel, not Hq.

Relation to torch: ``torch.distributed.tensor.experimental.context_parallel`` does the same on
CUDA with SDPA's flash / memory-efficient / cuDNN kernels (and FlexAttention): prefer it there
for plain softmax training. It does not run on CPU (no sharding rule for the CPU flash op; its
math path mixes Tensor and DTensor, measured on torch 2.13). attnzoo's runs on CPU with gloo and
on CUDA with NCCL, returns the LSE, and merges through attnzoo's own kernels; the other
distributed forms of this package (head-parallel around any mechanism, linear-attention state
passing, sliding-window halos) have no torch counterpart.

Example::

    torch.distributed.init_process_group("gloo")
    q, k, v = (shard_sequence(x, layout="zigzag") for x in (q_full, k_full, v_full))
    out, lse = ring_attention(q, k, v, causal=True, layout="zigzag", return_lse=True)
    out.sum().backward()          # dq, dk, dv of this rank's tokens
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import DTypeError, ParameterError, ShapeError
from ..kernels.split_kv import merge_attention_states
from ..registry import get
from ._comm import GRAD_TAG, KV_TAG, Ring, all_gather, reduce_scatter, ring_of
from .sharding import check_layout, chunk_ids

__all__ = ["ring_attention", "COMMS", "ring_plan"]

COMMS = ("p2p", "allgather")

#: Score elements of one backward piece (rows x keys x query heads of a KV head): bounds memory.
_PIECE = 1 << 22

Task = tuple[slice, slice, bool]  # (query rows, key rows, causal on this block)


def ring_plan(rank: int, owner: int, world: int, n: int, causal: bool, layout: str) -> list[Task]:
    """The blocks rank ``rank`` computes against the K/V of rank ``owner``: (query rows, key rows, causal).

    Non-causal: everything. Causal, own tokens: one block, causal (the local order of the chunks
    is increasing in global position, so top-left causal on the concatenation is exact). Causal,
    another rank: for each of our chunks, the visitor's chunks that come strictly before it, all
    visible; neighbouring chunks are merged into one block and chunks with the same keys share a
    block.
    """
    every = slice(0, n)
    if not causal:
        return [(every, every, False)]
    if owner == rank:
        return [(every, every, True)]
    qids, kids = chunk_ids(rank, world, layout), chunk_ids(owner, world, layout)
    qsize, ksize = n // len(qids), n // len(kids)
    rows: list[tuple[int, int, tuple[int, int]]] = []  # (q start, q end, key range)
    for i, qc in enumerate(qids):
        visible = [j for j, kc in enumerate(kids) if kc < qc]
        if not visible:
            continue
        assert visible == list(range(visible[0], visible[-1] + 1))  # chunk ids increase locally
        keys = (visible[0] * ksize, (visible[-1] + 1) * ksize)
        if rows and rows[-1][2] == keys and rows[-1][1] == i * qsize:
            rows[-1] = (rows[-1][0], (i + 1) * qsize, keys)
        else:
            rows.append((i * qsize, (i + 1) * qsize, keys))
    return [(slice(a, b), slice(*keys), False) for a, b, keys in rows]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of one block through attnzoo's softmax (its fastest backend for the inputs)."""
    out, lse = get("softmax")(q, k, v, causal=causal, scale=scale, return_lse=True)
    cdt = _compute_dtype(q.dtype)
    return out.to(cdt), lse.to(cdt)


def _block_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, delta: Tensor,
                    causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``dq`` (B, Hq, m, D), ``dk`` (B, Hkv, nk, D), ``dv`` of one block given the FINAL lse and
    ``delta = rowsum(dout * out) - dlse`` (FlashAttention-2's backward, Dao 2023, Alg. 2, with the
    LSE's own gradient), in the compute dtype, in pieces of query rows."""
    b, hq, m, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = out.dtype
    q5 = q.to(cdt).reshape(b, hkv, g, m, d)
    do5 = dout.reshape(b, hkv, g, m, -1)
    lse5, delta5 = lse.reshape(b, hkv, g, m, 1), delta.reshape(b, hkv, g, m, 1)
    kt, vt = k.to(cdt).unsqueeze(2), v.to(cdt).unsqueeze(2)  # (B, Hkv, 1, nk, .)
    dq = torch.empty(b, hkv, g, m, d, dtype=cdt, device=q.device)
    dk = torch.zeros(b, hkv, nk, d, dtype=cdt, device=q.device)
    dv = torch.zeros(b, hkv, nk, v.shape[-1], dtype=cdt, device=q.device)
    step = max(1, _PIECE // max(1, b * hq * nk))
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        qs = q5[:, :, :, r0:r1]
        s = torch.matmul(qs, kt.transpose(-1, -2)).mul_(scale)  # (B, Hkv, G, r, nk)
        if causal:
            rows = torch.arange(r0, r1, device=q.device).view(-1, 1)
            s = s.masked_fill(torch.arange(nk, device=q.device).view(1, -1) > rows, float("-inf"))
        p = torch.exp(s - lse5[:, :, :, r0:r1])
        dos = do5[:, :, :, r0:r1]
        dv += torch.matmul(p.transpose(-1, -2), dos).sum(2)
        dp = torch.matmul(dos, vt.transpose(-1, -2))
        ds = p.mul_(dp.sub_(delta5[:, :, :, r0:r1]))
        dq[:, :, :, r0:r1] = torch.matmul(ds, kt).mul_(scale)
        dk += torch.matmul(ds.transpose(-1, -2), qs).sum(2).mul_(scale)
    return dq.reshape(b, hq, m, d), dk, dv


def _flash_backward_usable(q: Tensor, k: Tensor, v: Tensor, dlse: Optional[Tensor]) -> bool:
    """torch's CPU flash-attention backward takes the block: CPU, float32/64, D = Dv, no LSE gradient."""
    return (
        dlse is None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and k.shape[-1] == v.shape[-1]
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )


def _block_backward_flash(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
                          causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_block_backward` by ``aten._scaled_dot_product_flash_attention_for_cpu_backward``
    (given the final out and lse it computes exactly the block's share; 1.6-2.6x faster than the
    materialized form at n = 1024, measured on the 2-core CPU). GQA: K/V expanded, dK/dV summed."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    ke, ve = (x.repeat_interleave(g, dim=1) if g > 1 else x for x in (k, v))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q.contiguous(), ke.contiguous(), ve.contiguous(), out.contiguous(), lse.contiguous(),
        0.0, causal, attn_mask=None, scale=scale,
    )
    if g > 1:
        dk = dk.view(b, hkv, g, *dk.shape[2:]).sum(2)
        dv = dv.view(b, hkv, g, *dv.shape[2:]).sum(2)
    return dq, dk, dv


def _pack(k: Tensor, v: Tensor) -> Tensor:
    return torch.cat([k, v.to(k.dtype)], dim=-1)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, ring, layout, comm):  # noqa: D401
        ctx.set_materialize_grads(False)
        b, hq, n, _ = q.shape
        dk_, cdt = k.shape[-1], _compute_dtype(q.dtype)
        out = torch.zeros(b, hq, n, v.shape[-1], dtype=cdt, device=q.device)
        lse = torch.full((b, hq, n), float("-inf"), dtype=cdt, device=q.device)

        def attend(owner: int, kv: Tensor) -> None:
            for qs, ks, c in ring_plan(ring.rank, owner, ring.world, n, causal, layout):
                o_b, l_b = _block_forward(q[:, :, qs], kv[:, :, ks, :dk_], kv[:, :, ks, dk_:], c, scale)
                merged, total = merge_attention_states([out[:, :, qs], o_b], [lse[:, :, qs], l_b])
                out[:, :, qs], lse[:, :, qs] = merged, total

        kv = _pack(k, v)
        if comm == "allgather":
            every = all_gather(kv, ring)
            for s in range(ring.world):
                owner = (ring.rank - s) % ring.world
                attend(owner, every[owner])
        else:
            for s in range(ring.world):
                pending = ring.exchange(kv, kv, tag=KV_TAG) if s < ring.world - 1 else None
                attend((ring.rank - s) % ring.world, kv)
                if pending is not None:
                    kv = pending.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.ring, ctx.layout, ctx.comm = causal, scale, ring, layout, comm
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring: Ring = ctx.ring
        n, dk_, cdt = q.shape[2], k.shape[-1], out.dtype
        dout = torch.zeros_like(out) if dout is None else dout.to(cdt)
        delta = (dout * out).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(cdt)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        flash = _flash_backward_usable(q, k, v, dlse)

        def grads(owner: int, kv: Tensor, dkv: Tensor) -> None:
            for qs, ks, c in ring_plan(ring.rank, owner, ring.world, n, ctx.causal, ctx.layout):
                if flash:
                    dq_b, dk_b, dv_b = _block_backward_flash(
                        q[:, :, qs], kv[:, :, ks, :dk_], kv[:, :, ks, dk_:], out[:, :, qs], dout[:, :, qs], lse[:, :, qs], c, ctx.scale,
                    )
                else:
                    dq_b, dk_b, dv_b = _block_backward(
                        q[:, :, qs], kv[:, :, ks, :dk_], kv[:, :, ks, dk_:], out[:, :, qs], dout[:, :, qs],
                        lse[:, :, qs], delta[:, :, qs], c, ctx.scale,
                    )
                dq[:, :, qs] += dq_b
                dkv[:, :, ks, :dk_] += dk_b
                dkv[:, :, ks, dk_:] += dv_b

        kv = _pack(k, v)
        if ctx.comm == "allgather":
            every = all_gather(kv, ring)
            dkv_all = torch.zeros(every.shape, dtype=cdt, device=q.device)
            for s in range(ring.world):
                owner = (ring.rank - s) % ring.world
                grads(owner, every[owner], dkv_all[owner])
            dkv = reduce_scatter(dkv_all, ring)
        else:
            dkv = torch.zeros(kv.shape, dtype=cdt, device=q.device)  # the accumulator of the visiting block
            for s in range(ring.world):
                pending = ring.exchange(kv, kv, tag=KV_TAG) if s < ring.world - 1 else None
                local = torch.zeros_like(dkv)
                grads((ring.rank - s) % ring.world, kv, local)
                dkv = dkv + local
                # the accumulator follows its block to the next rank; after the last step it reaches home
                dkv = ring.exchange(dkv, dkv, tag=GRAD_TAG).wait()
                if pending is not None:
                    kv = pending.wait()
        return (dq.to(q.dtype), dkv[..., :dk_].to(k.dtype), dkv[..., dk_:].to(v.dtype), None, None, None, None, None)


def _check(q: Any, k: Any, v: Any, layout: str, comm: str, world: int) -> None:
    what = "ring_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{what}: {name}: expected a (B, H, n, D) tensor (this rank's tokens), got {got}", argument=name)
        if not x.is_floating_point():
            raise DTypeError(f"{what}: {name}: expected a floating dtype, got {x.dtype}", argument=name)
    if comm not in COMMS:
        raise ParameterError(f"{what}: comm: expected one of {COMMS}, got {comm!r}", argument="comm")
    check_layout(layout, what)
    b, hq, n, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[2] != n or v.shape[2] != n:
        raise ShapeError(f"{what}: k: expected k and v with q's batch {b} and local length {n} (one sequence split the same way), "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}", argument="k")
    if k.shape[-1] != d or v.shape[1] != k.shape[1]:
        raise ShapeError(f"{what}: k: expected head dim {d} and as many heads as v, got k {tuple(k.shape)}, v {tuple(v.shape)}", argument="k")
    if hq % k.shape[1]:
        raise ShapeError(f"{what}: k: expected key/value heads dividing the {hq} query heads (GQA), got {k.shape[1]}", argument="k")
    if layout == "zigzag" and n % 2:
        raise ShapeError(f"{what}: q: the zigzag layout holds two equal chunks per rank: expected an even local length, got {n} "
                         f"(the full length must be a multiple of 2 * world = {2 * world})", argument="q")


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    layout: str = "contiguous",
    comm: str = "p2p",
    group: Optional[dist.ProcessGroup] = None,
    return_lse: bool = False,
) -> Any:
    """Exact softmax attention of a sequence split over the ranks of ``group`` (see the module docstring).

    Args:
        q, k, v: this rank's tokens, (B, Hq, n, D), (B, Hkv, n, D), (B, Hkv, n, Dv), split as
            ``layout`` says (:func:`~attnzoo.distributed.shard_sequence`); every rank holds the
            same n. Hkv divides Hq (GQA/MQA).
        causal: each query sees the keys at or before its global position.
        scale: multiplies q.k; default D ** -0.5.
        layout: ``"contiguous"`` or ``"zigzag"`` (causal load balance; n even).
        comm: ``"p2p"`` (ring of isend/irecv) or ``"allgather"`` (one all-gather, a
            reduce-scatter in the backward).
        group: the process group (default: the world).
        return_lse: also return the log-sum-exp of each row, (B, Hq, n), float32 (float64 for
            float64 inputs); differentiable.

    Returns ``out`` (B, Hq, n, Dv) in q's dtype, or ``(out, lse)``. Exact against one process
    holding the whole sequence: in float32 with gloo at world 2 and 4, max |error| 4e-7 for the
    output and LSE and 2e-6 for dq, dk, dv (tests/unit/test_distributed.py, B2-Hq4-Hkv2-N64-D16).
    """
    ring = ring_of(group, "ring_attention")
    _check(q, k, v, layout, comm, ring.world)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = _RingAttention.apply(q, k, v, bool(causal), scale, ring, layout, comm)
    return (out, lse) if return_lse else out
