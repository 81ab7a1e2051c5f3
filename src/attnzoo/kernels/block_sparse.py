"""Block-sparse attention on CPU: FlashAttention-2 over the 64 x 64 blocks a plan lists.

A :class:`SparsePlan` says, for every query block of 64 rows, which key blocks of 64 keys it
visits (CSR, ascending) and, for the blocks a pattern covers only partly, the element mask
(64 words of 64 bits). The C++ kernel (``csrc/block_sparse_attention.cpp``) runs the FA2
forward and backward over exactly those blocks: work is proportional to the visited blocks,
and partly covered blocks pay one masked pass. Consecutive key blocks of a query block run
as one GEMM (up to 512 keys), through the BLAS PyTorch links (MKL on x86 wheels, which uses
AVX-512 where the CPU has it); the exponentials are 16-lane AVX-512 vectors where the build
machine has them, 8-lane otherwise (:func:`kernel_path` says which ran).

Plans come from a mask predicate (:meth:`SparsePlan.from_mask`: the closed-form tile grids of
the built-in patterns, evaluated element by element only on partly covered blocks) or from a
block mask (:meth:`SparsePlan.from_block_mask`: data-dependent block lists such as a content
router's). Plans are per pattern head and batch entry when the pattern depends on them.

Cost: O(visited blocks * 64 * 64 * D) time; memory O((Nq + Nk) * D) plus the plan
(O(visited blocks) ints and 512 bytes per partly covered block).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._native import load_kernel
from .reference import default_scale

__all__ = ["BLOCK", "FUSED_CAPABILITIES", "SparsePlan", "block_sparse_attention", "decline_reason", "gathered_rows_attention", "native_usable", "kernel_path"]

#: Query and key block size (one 64-bit mask word per query row of a block).
BLOCK = 64
#: Elements of the predicate evaluated at once while planning.
_EVAL_CHUNK = 1 << 22


def _native() -> Optional[Any]:
    return load_kernel("block_sparse_attention", "block-sparse attention")


def native_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C++ kernel runs inputs of this device and dtype (builds it on first call).

    float64 is declined (the kernel computes in float32); bfloat16/float16 are computed in float32.
    """
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and _native() is not None


#: What a backend on this kernel declares (``Backend(**FUSED_CAPABILITIES)``): CPU, float32 and
#: the 16-bit types (computed in float32), above the tiled engine and the band/gathered kernels.
FUSED_CAPABILITIES: dict[str, Any] = dict(
    devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}), priority=35, traceable=False
)


def decline_reason(problem: Any) -> Optional[str]:
    """Why the kernel cannot take this call here, or None (every fused backend's ``accepts``)."""
    if not native_usable(problem.device, problem.dtype):
        return "the C++ block-sparse kernel is not built here (no C++ toolchain, or ATTNZOO_NATIVE=0)"
    return None


def kernel_path() -> str:
    """Which SIMD width and GEMM the built kernel uses ("not built" without a toolchain)."""
    module = _native()
    return "not built" if module is None else module.path()


def _n_blocks(length: int) -> int:
    return -(-length // BLOCK)


def _pack_bits(allowed: Tensor) -> Tensor:
    """(..., 64) bool -> (...) int64 with bit c set where ``allowed[..., c]``."""
    shifts = torch.arange(BLOCK, dtype=torch.int64, device=allowed.device)
    # distinct powers of two: the sum is the bitwise OR (bit 63 is INT64_MIN, no overflow)
    return (allowed.to(torch.int64) << shifts).sum(-1)


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """The visited 64 x 64 blocks of a pattern, in CSR, with element masks for partial blocks.

    ``ptr`` (Pb, Ph, n_q_blocks + 1) int32: entries of query block i of plan (b, h) are
    ``ptr[b, h, i]:ptr[b, h, i + 1]``, with Pb in {1, B} and Ph in {1, H} (1: shared).
    ``kv_block`` (nnz,) int32: each entry's key block, ascending within a query block.
    ``mask_id`` (nnz,) int32: -1 when every pair of the block is inside the pattern, else the
    row of ``bits`` (n_masks, 64) int64 whose word r has bit c set when query r of the block
    may attend key c of the block.
    """

    q_len: int
    kv_len: int
    ptr: Tensor
    kv_block: Tensor
    mask_id: Tensor
    bits: Tensor

    @property
    def n_q_blocks(self) -> int:
        return _n_blocks(self.q_len)

    @property
    def n_kv_blocks(self) -> int:
        return _n_blocks(self.kv_len)

    @property
    def blocks(self) -> int:
        """Visited (query block, key block) pairs over all plans."""
        return int(self.kv_block.numel())

    @property
    def density(self) -> float:
        """Fraction of the blocks visited (averaged over the plan's batch entries and heads)."""
        plans = self.ptr.shape[0] * self.ptr.shape[1]
        return self.blocks / max(1, plans * self.n_q_blocks * self.n_kv_blocks)

    def pairs(self) -> int:
        """The (query, key) pairs the pattern allows, summed over the plan's batch entries and
        heads (the kernel computes ``blocks * 64 * 64`` minus the edges; this is the useful part)."""
        per_plan = self.ptr[:, :, 1:] - self.ptr[:, :, :-1]
        q_block = torch.arange(self.n_q_blocks).expand_as(per_plan).flatten().repeat_interleave(per_plan.flatten().long())
        rows = (self.q_len - q_block * BLOCK).clamp(max=BLOCK)
        keys = (self.kv_len - self.kv_block.long() * BLOCK).clamp(max=BLOCK)
        partial = self.mask_id >= 0
        total = int((rows * keys)[~partial].sum())
        if partial.any():
            words = self.bits[self.mask_id[partial].long()]  # (P, 64): a row per query of the block
            bit = (words.unsqueeze(-1) >> torch.arange(BLOCK)) & 1  # (P, 64, 64)
            inside = (torch.arange(BLOCK) < rows[partial, None])[:, :, None] & (torch.arange(BLOCK) < keys[partial, None])[:, None, :]
            total += int((bit.bool() & inside).sum())
        return total

    # ----------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, q_len: int, kv_len: int) -> "SparsePlan":
        """Every block (dense attention through the kernel: its LSE and backward), cached per shape."""
        return _dense_plan(q_len, kv_len)

    @classmethod
    def from_block_mask(cls, block_mask: Tensor, q_len: int, kv_len: int) -> "SparsePlan":
        """A plan visiting whole blocks: ``block_mask`` (n_q_blocks, n_kv_blocks), (Ph, ., .) or
        (Pb, Ph, ., .) bool, True = visit (every pair of the block attends)."""
        grid = _as_4d(block_mask, "block_mask")
        _check_grid(grid, q_len, kv_len, "block_mask")
        return cls._from_grids(grid, grid, q_len, kv_len, None)

    @classmethod
    def from_mask(cls, mask_mod: Callable, q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1) -> "SparsePlan":
        """The plan of a predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's).

        Patterns that depend on the batch entry or head (``batch_head_dependent``; per head
        only: ``head_dependent_only``) get one plan per (b, h) of ``batch`` x ``heads``. The
        built-in patterns' tile grids are closed-form (O(blocks)); other predicates are
        evaluated on the element grid in chunks (O(Nq * Nk) once; cacheable ones are cached).
        """
        pb, ph = _plan_extent(mask_mod, batch, heads)
        if getattr(mask_mod, "cacheable", False):
            return _cached_plan(mask_mod, q_len, kv_len, pb, ph)
        return _plan_from_mask(mask_mod, q_len, kv_len, pb, ph)

    @classmethod
    def _from_grids(cls, visit: Tensor, full: Tensor, q_len: int, kv_len: int, mask_mod: Optional[Callable], bits: Optional[Tensor] = None) -> "SparsePlan":
        """CSR from (Pb, Ph, nqb, nkb) grids; element masks of the partial blocks from ``bits``
        (given in the entries' order) or by evaluating ``mask_mod`` on them."""
        visit = visit.bool()
        full = full.bool() & visit
        # entries are numbered across all plans: plan p's query-block starts are one window of
        # the running count (each window shares its last start with the next one's first)
        nqb = visit.shape[2]
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), visit.sum(-1).flatten().cumsum(0)])
        ptr = starts.unfold(0, nqb + 1, nqb)
        entries = visit.nonzero()  # (nnz, 4) in (b, h, qb, kb) order: the CSR order
        partial = ~full[visit]
        mask_id = torch.full((entries.shape[0],), -1, dtype=torch.int64)
        mask_id[partial] = torch.arange(int(partial.sum()))
        if bits is None:
            bits = _partial_bits(mask_mod, entries[partial], q_len, kv_len) if partial.any() else torch.zeros(0, BLOCK, dtype=torch.int64)
        return cls(
            q_len,
            kv_len,
            ptr.view(visit.shape[0], visit.shape[1], -1).to(torch.int32).contiguous(),
            entries[:, 3].to(torch.int32).contiguous(),
            mask_id.to(torch.int32),
            bits.contiguous(),
        )


def _as_4d(grid: Tensor, name: str) -> Tensor:
    if grid.dtype != torch.bool or grid.dim() not in (2, 3, 4):
        raise ValueError(f"{name}: expected a bool tensor (n_q_blocks, n_kv_blocks), (H, ., .) or (B, H, ., .), got {grid.dtype} {tuple(grid.shape)}")
    while grid.dim() < 4:
        grid = grid.unsqueeze(0)
    return grid.cpu()


def _check_grid(grid: Tensor, q_len: int, kv_len: int, name: str) -> None:
    want = (_n_blocks(q_len), _n_blocks(kv_len))
    if tuple(grid.shape[-2:]) != want:
        raise ValueError(f"{name}: expected {want} blocks of {BLOCK} for Nq={q_len}, Nk={kv_len}, got {tuple(grid.shape[-2:])}")


def _plan_extent(mask_mod: Callable, batch: int, heads: int) -> tuple[int, int]:
    if not getattr(mask_mod, "batch_head_dependent", True):
        return 1, 1
    if getattr(mask_mod, "head_dependent_only", False):
        return 1, heads
    return batch, heads


def _block_index(first_blocks: Tensor, length: int) -> Tensor:
    """Element indices of blocks (P,) -> (P, 64), clamped into the length (rows past it are unused)."""
    return (first_blocks[:, None] * BLOCK + torch.arange(BLOCK)).clamp(max=length - 1)


def _partial_bits(mask_mod: Optional[Callable], entries: Tensor, q_len: int, kv_len: int) -> Tensor:
    """Element masks of the listed (b, h, qb, kb) blocks, packed: (P, 64) int64."""
    if mask_mod is None:
        raise ValueError("partial blocks need the predicate that masks them")
    out = torch.empty(entries.shape[0], BLOCK, dtype=torch.int64)
    step = max(1, _EVAL_CHUNK // (BLOCK * BLOCK))
    for start in range(0, entries.shape[0], step):
        e = entries[start : start + step]
        b, h = e[:, 0].view(-1, 1, 1), e[:, 1].view(-1, 1, 1)
        q_idx = _block_index(e[:, 2], q_len)[:, :, None]
        kv_idx = _block_index(e[:, 3], kv_len)[:, None, :]
        allowed = torch.as_tensor(mask_mod(b, h, q_idx, kv_idx)).bool().expand(e.shape[0], BLOCK, BLOCK)
        out[start : start + step] = _pack_bits(allowed)
    return out


def _closed_form_grids(mask_mod: Callable, q_len: int, kv_len: int, ph: int) -> Optional[tuple[Tensor, Tensor]]:
    """(1, Ph, nqb, nkb) grids from a built-in pattern's closed form, or None.

    Per-head patterns give theirs through ``head_tile_grids`` (one grid per pattern head)."""
    from .. import masks

    qf, ql = masks._tile_bounds(q_len, BLOCK)
    kf, kl = masks._tile_bounds(kv_len, BLOCK)
    per_head = getattr(mask_mod, "head_tile_grids", None)
    if per_head is not None and getattr(mask_mod, "head_dependent_only", False):
        visit, full = per_head(qf, ql, kf, kl)
        if visit.shape[0] == ph:
            return visit.unsqueeze(0), full.unsqueeze(0)
    if not isinstance(mask_mod, masks.MaskMod) or mask_mod.batch_head_dependent:
        return None
    grid = mask_mod._tile_grid(qf, ql, kf, kl)
    if grid is None:
        return None
    visit, full = grid
    return visit.view(1, 1, *visit.shape), full.view(1, 1, *full.shape)


def _plan_from_mask(mask_mod: Callable, q_len: int, kv_len: int, pb: int, ph: int) -> SparsePlan:
    grids = _closed_form_grids(mask_mod, q_len, kv_len, ph)
    if grids is not None:
        return SparsePlan._from_grids(*grids, q_len, kv_len, mask_mod)
    return _plan_by_evaluation(mask_mod, q_len, kv_len, pb, ph)


@functools.lru_cache(maxsize=64)
def _dense_plan(q_len: int, kv_len: int) -> SparsePlan:
    grid = torch.ones(1, 1, _n_blocks(q_len), _n_blocks(kv_len), dtype=torch.bool)
    return SparsePlan._from_grids(grid, grid, q_len, kv_len, None)


@functools.lru_cache(maxsize=64)
def _cached_plan(mask_mod: Any, q_len: int, kv_len: int, pb: int, ph: int) -> SparsePlan:
    return _plan_from_mask(mask_mod, q_len, kv_len, pb, ph)


def _plan_by_evaluation(mask_mod: Callable, q_len: int, kv_len: int, pb: int, ph: int) -> SparsePlan:
    """Grids and element masks in one pass over the element grid, a few query blocks at a time."""
    nqb, nkb = _n_blocks(q_len), _n_blocks(kv_len)
    b = torch.arange(pb).view(pb, 1, 1, 1)
    h = torch.arange(ph).view(1, ph, 1, 1)
    kv = torch.arange(nkb * BLOCK).clamp(max=kv_len - 1).view(1, 1, 1, -1)
    inside_kv = (torch.arange(nkb * BLOCK) < kv_len).view(nkb, BLOCK)
    step = max(1, _EVAL_CHUNK // (pb * ph * BLOCK * nkb * BLOCK))
    visit = torch.zeros(pb, ph, nqb, nkb, dtype=torch.bool)
    full = torch.zeros_like(visit)
    words = torch.zeros(pb, ph, nqb, nkb, BLOCK, dtype=torch.int64)
    for start in range(0, nqb, step):
        stop = min(nqb, start + step)
        q = _block_index(torch.arange(start, stop), q_len).view(1, 1, -1, 1)
        m = torch.as_tensor(mask_mod(b, h, q, kv)).bool().expand(pb, ph, q.shape[2], kv.shape[3])
        m = m.reshape(pb, ph, stop - start, BLOCK, nkb, BLOCK) & inside_kv.view(1, 1, 1, 1, nkb, BLOCK)
        visit[:, :, start:stop] = m.any(dim=(3, 5))
        full[:, :, start:stop] = (m | ~inside_kv.view(1, 1, 1, 1, nkb, BLOCK)).all(dim=(3, 5))
        words[:, :, start:stop] = _pack_bits(m.transpose(3, 4))
    partial = visit & ~full
    return SparsePlan._from_grids(visit, full, q_len, kv_len, mask_mod, bits=words[partial])


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _float32(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous()


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, plan: SparsePlan, scale: float, key_bias: Tensor) -> tuple[Tensor, Tensor]:
        qf, kf, vf = _float32(q), _float32(k), _float32(v)
        out, lse = _native().forward(qf, kf, vf, plan.ptr, plan.kv_block, plan.mask_id, plan.bits, key_bias, scale)
        # the float32 output, not the rounded one: rowsum(dO * O) cancels against dP (see tiled)
        ctx.save_for_backward(qf, kf, vf, out, lse, key_bias)
        ctx.plan, ctx.scale, ctx.dtypes = plan, scale, (q.dtype, k.dtype, v.dtype)
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]) -> tuple[Any, ...]:
        qf, kf, vf, out, lse, key_bias = ctx.saved_tensors
        plan = ctx.plan
        dout = torch.zeros_like(out) if grad_out is None else _float32(grad_out)
        delta = (dout * out).sum(-1)
        if grad_lse is not None:  # d lse_i / d s_ij = P_ij: the LSE's gradient enters as D_i - g_i
            delta = delta - grad_lse.float().masked_fill(lse == float("-inf"), 0.0)
        batch, kv_heads = kf.shape[:2]
        group = qf.shape[1] // kv_heads
        # a task owns a key head (no extra memory) unless that leaves threads idle
        own = group == 1 or batch * kv_heads >= torch.get_num_threads()
        dq, dk, dv = _native().backward(
            dout, qf, kf, vf, lse, delta.contiguous(), plan.ptr, plan.kv_block, plan.mask_id, plan.bits, key_bias, ctx.scale, own
        )
        if not own:
            dk = dk.view(batch, kv_heads, group, *dk.shape[2:]).sum(2)
            dv = dv.view(batch, kv_heads, group, *dv.shape[2:]).sum(2)
        qd, kd, vd = ctx.dtypes
        return dq.to(qd), dk.to(kd), dv.to(vd), None, None, None


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: SparsePlan,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Exact softmax attention over the blocks of ``plan``; returns ``(out, lse)``.

    ``q`` (B, H, Nq, D), ``k`` (B, Hkv, Nk, D), ``v`` (B, Hkv, Nk, Dv), CPU, float32 (bfloat16
    and float16 are computed in float32), H a multiple of Hkv (GQA without copying K/V).
    ``key_padding_mask`` (B, Nk) bool, True = ignore the key. A query that sees no key outputs
    0 with LSE -inf. ``lse`` is float32 (B, H, Nq). Differentiable in q, k, v (and through the
    LSE, as merging partial results needs).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"block_sparse_attention: {name}: expected (B, H, N, D), got shape {tuple(x.shape)}")
    if not native_usable(q.device, q.dtype):
        raise RuntimeError(f"block_sparse_attention: the C++ kernel does not run {q.dtype} on {q.device} here (see native_usable)")
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    if (plan.q_len, plan.kv_len) != (nq, nk):
        raise ValueError(f"block_sparse_attention: plan: made for Nq={plan.q_len}, Nk={plan.kv_len}; inputs have Nq={nq}, Nk={nk}")
    if plan.ptr.shape[0] not in (1, b) or plan.ptr.shape[1] not in (1, h):
        raise ValueError(f"block_sparse_attention: plan: {tuple(plan.ptr.shape[:2])} (batch, heads) plans for inputs of B={b}, H={h}")
    key_bias = _key_bias(key_padding_mask, b, nk, "block_sparse_attention")
    return _BlockSparseAttention.apply(q, k, v, plan, float(default_scale(q, scale)), key_bias)


def _key_bias(key_padding_mask: Optional[Tensor], batch: int, kv_len: int, caller: str) -> Tensor:
    """The kernels' key padding: (B, Nk) float32, -inf on a padded key (empty: no padding)."""
    if key_padding_mask is None:
        return torch.empty(0)
    if tuple(key_padding_mask.shape) != (batch, kv_len):
        raise ValueError(f"{caller}: key_padding_mask: expected ({batch}, {kv_len}), got {tuple(key_padding_mask.shape)}")
    return torch.zeros(batch, kv_len).masked_fill_(key_padding_mask.bool().cpu(), float("-inf"))


# --------------------------------------------------------------------------------------------
# gathered rows: each selected (query row, key range) pair, grouped by key range
# --------------------------------------------------------------------------------------------
class _GatheredRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, limit: Tensor, gptr: Tensor, meta: Tensor, key_bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        qf, kf, vf = _float32(q), _float32(k), _float32(v)
        out, lse = _native().gathered_forward(qf, kf, vf, rows, limit, gptr, meta, key_bias, scale)
        ctx.save_for_backward(qf, kf, vf, out, lse, rows, limit, gptr, meta, key_bias)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype)
        ctx.set_materialize_grads(False)
        return out.to(v.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]) -> tuple[Any, ...]:
        qf, kf, vf, out, lse, rows, limit, gptr, meta, key_bias = ctx.saved_tensors
        dout = torch.zeros_like(out) if grad_out is None else _float32(grad_out)
        delta = (dout * out).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.float().masked_fill(lse == float("-inf"), 0.0)
        dq_e, dk, dv = _native().gathered_backward(dout, qf, kf, vf, lse, delta.contiguous(), rows, limit, gptr, meta, key_bias, ctx.scale)
        dq = torch.zeros(qf.shape[0] * qf.shape[1] * qf.shape[2], qf.shape[3]).index_add_(0, rows, dq_e).view(qf.shape)
        qd, kd, vd = ctx.dtypes
        return dq.to(qd), dk.to(kd), dv.to(vd), None, None, None, None, None, None


def gathered_rows_attention(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, limit: Tensor, gptr: Tensor, meta: Tensor, *, scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Softmax of gathered query rows over one key range per group: ``(out_e (E, Dv), lse_e (E,))``.

    Group g (``meta[g] = (b, h, key0, length)``) holds the entries ``gptr[g]:gptr[g + 1]``; entry e
    is query row ``rows[e]`` (flat over (B, H, Nq)) attending keys ``key0 .. key0 + length - 1``
    of its key head up to ``limit[e]`` (absolute, inclusive). Merge a row's entries by their LSEs
    (``functional.sparse._select.merge_partials``). Differentiable in q, k, v and through the LSE.
    All index tensors int64 on the CPU.
    """
    if not native_usable(q.device, q.dtype):
        raise RuntimeError(f"gathered_rows_attention: the C++ kernel does not run {q.dtype} on {q.device} here (see native_usable)")
    key_bias = _key_bias(key_padding_mask, k.shape[0], k.shape[2], "gathered_rows_attention")
    return _GatheredRows.apply(q, k, v, rows, limit, gptr, meta, key_bias, float(default_scale(q, scale)))


def useful_pairs(plan: SparsePlan) -> int:
    """Upper bound of the (query, key) pairs the kernel computes: visited blocks x 64 x 64."""
    return plan.blocks * BLOCK * BLOCK
