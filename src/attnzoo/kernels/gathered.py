"""Gathered attention: softmax attention where each query attends the keys a table names.

A *neighbor table* ``index`` (Nq, K) int64 lists, for every query, the K keys it attends
(-1: an empty slot). Patterns with few keys per query (neighborhood attention 1D/2D/3D with
dilation, stride and causal axes: 9 to a few hundred keys) waste most of every tile on the
tiled engine, because a 2D or 3D window is scattered over many rows of the flattened tokens;
a table has no waste and costs O(Nq * K) memory::

    s_it = scale * q_i . k_index[i,t] + bias[i, t],   out_i = sum_t softmax_t(s_i) v_index[i,t]

Two implementations with one interface, :func:`gathered_attention` (out and LSE, forward and
backward, gradient for the bias too):

* ``native``: a C++ CPU kernel (``csrc/gathered_attention.cpp``) built on first use with
  :mod:`torch.utils.cpp_extension` (needs a C++ compiler and ninja; about a minute once, then
  cached). It reads the keys in place (no gather), fuses scores, softmax and the weighted sum
  per query, and in the backward scatters into dK/dV through the inverse table (per key row,
  so no atomics). Set ``ATTNZOO_NATIVE=0`` to disable it.
* ``torch``: the same algorithm in PyTorch over chunks of queries (gather, batched matmul),
  on any device; the fallback when the native kernel is not built, and the GPU path.

Cost: O(Nq * K * D) time, O(Nq * K + (Nq + Nk) * D) memory (the torch path also holds one
chunk's gathered keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ._native import load_kernel

__all__ = ["NeighborTable", "gathered_attention", "native_available", "native_usable"]

#: The torch path gathers keys for this many (query, slot) pairs per chunk at most.
_TORCH_CHUNK_PAIRS = 1 << 18


@dataclass(frozen=True)
class NeighborTable:
    """A neighbor table with its inverse, built once per pattern and reused.

    ``index`` (Nq, K): the key of each query's slot, -1 for none. ``inv_ptr`` (Nk + 1) and
    ``inv_pos`` (nnz): the inverse in CSR form, the flat slots ``i * K + t`` naming key j are
    ``inv_pos[inv_ptr[j]:inv_ptr[j + 1]]`` (the backward's scatter, one key row at a time).
    """

    index: Tensor
    inv_ptr: Tensor
    inv_pos: Tensor
    n_keys: int

    @classmethod
    def build(cls, index: Tensor, n_keys: int) -> "NeighborTable":
        if index.dim() != 2 or index.dtype != torch.int64:
            raise ValueError(f"index: expected an (Nq, K) int64 tensor, got {tuple(index.shape)} {index.dtype}")
        index = index.contiguous()
        flat = index.flatten()
        named = flat >= 0
        if bool((flat[named] >= n_keys).any()):
            raise ValueError(f"index: entries must be < the number of keys {n_keys}")
        positions = torch.nonzero(named).flatten()
        keys = flat[positions]
        order = torch.argsort(keys, stable=True)
        counts = torch.bincount(keys, minlength=n_keys)
        inv_ptr = torch.zeros(n_keys + 1, dtype=torch.int64, device=index.device)
        inv_ptr[1:] = counts.cumsum(0)
        return cls(index, inv_ptr, positions[order].contiguous(), n_keys)

    @property
    def slots(self) -> int:
        return self.index.shape[1]


# --------------------------------------------------------------------------------------------
# the native kernel
# --------------------------------------------------------------------------------------------
def _native() -> Optional[Any]:
    """The compiled kernel module, or None (disabled, or no toolchain: a warning says why)."""
    return load_kernel("gathered_attention", "gathered-attention")


def native_available() -> bool:
    """Whether the C++ kernel is (or can be) built on this machine; builds it on first call."""
    return _native() is not None


def native_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C++ kernel runs inputs of this device and dtype (building it if needed).

    float64 stays on the PyTorch path: the kernel accumulates in float32.
    """
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and _native() is not None


def _use_native(q: Tensor, v: Tensor) -> bool:
    return v.shape[-1] == q.shape[-1] and native_usable(q.device, q.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# the PyTorch path
# --------------------------------------------------------------------------------------------
def _chunks(nq: int, slots: int) -> list[slice]:
    step = max(1, _TORCH_CHUNK_PAIRS // max(1, slots))
    return [slice(s, min(s + step, nq)) for s in range(0, nq, step)]


def _gather_rows(x: Tensor, idx: Tensor, group: int) -> Tensor:
    """x (B, Hk, N, D) rows named by idx (c, K), per query head: (B, Hk * group, c, K, D)."""
    rows = x[:, :, idx.clamp(min=0)]
    return rows.repeat_interleave(group, dim=1) if group > 1 else rows


def _chunk_scores(q: Tensor, keys: Tensor, idx: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
    cdt = _compute_dtype(q)
    s = torch.einsum("bhcd,bhckd->bhck", q.to(cdt), keys.to(cdt)) * scale
    if bias is not None:
        s = s + bias
    return s.masked_fill(idx < 0, float("-inf"))


def _torch_forward(q: Tensor, k: Tensor, v: Tensor, table: NeighborTable, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    b, h, nq, _ = q.shape
    group = h // k.shape[1]
    out = q.new_empty(b, h, nq, v.shape[-1])
    cdt = _compute_dtype(q)
    lse = torch.empty(b, h, nq, dtype=cdt, device=q.device)
    for rows in _chunks(nq, table.slots):
        idx = table.index[rows]
        s = _chunk_scores(q[:, :, rows], _gather_rows(k, idx, group), idx, None if bias is None else bias[:, :, rows], scale)
        m = s.amax(-1, keepdim=True).clamp(min=torch.finfo(cdt).min)  # empty rows: no NaN
        p = torch.exp(s - m)
        total = p.sum(-1, keepdim=True)
        o = torch.einsum("bhck,bhckd->bhcd", p, _gather_rows(v, idx, group).to(cdt)) / total.clamp(min=1e-30)
        out[:, :, rows] = o.to(out.dtype)
        lse[:, :, rows] = (m + total.log()).squeeze(-1)
    return out, lse


def _torch_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    table: NeighborTable,
    bias: Optional[Tensor],
    scale: float,
    bias_grad: bool,
    dlse: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    b, h, nq, _ = q.shape
    hk = k.shape[1]
    group = h // hk
    cdt = _compute_dtype(q)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(b, h, k.shape[2], k.shape[3], dtype=cdt, device=q.device)
    dv = torch.zeros(b, h, v.shape[2], v.shape[3], dtype=cdt, device=q.device)
    dbias = torch.zeros(b, h, nq, table.slots, dtype=cdt, device=q.device) if bias_grad else None
    for rows in _chunks(nq, table.slots):
        idx = table.index[rows]
        keys, values = _gather_rows(k, idx, group).to(cdt), _gather_rows(v, idx, group).to(cdt)
        s = _chunk_scores(q[:, :, rows], keys, idx, None if bias is None else bias[:, :, rows], scale)
        p = torch.exp(s - lse[:, :, rows, None])  # -inf lse (empty row): s is -inf too -> nan
        p = torch.nan_to_num(p, nan=0.0)
        dp = torch.einsum("bhcd,bhckd->bhck", do[:, :, rows].to(cdt), values)
        delta = (p * dp).sum(-1, keepdim=True)  # rowsum(dO * O) = sum_t p_t dp_t
        if dlse is not None:  # d lse / d s_t = p_t: the LSE's gradient g adds g p_t to ds_t
            delta = delta - dlse[:, :, rows, None].to(cdt)
        ds = p * (dp - delta)
        if dbias is not None:
            dbias[:, :, rows] = ds
        dq[:, :, rows] = torch.einsum("bhck,bhckd->bhcd", ds, keys) * scale
        flat = idx.clamp(min=0).flatten()
        dk.index_add_(2, flat, (torch.einsum("bhck,bhcd->bhckd", ds * scale, q[:, :, rows].to(cdt))).flatten(2, 3))
        dv.index_add_(2, flat, torch.einsum("bhck,bhcd->bhckd", p, do[:, :, rows].to(cdt)).flatten(2, 3))
    if group > 1:  # GQA: the query heads of a group share their kv head
        dk, dv = (x.view(b, hk, group, *x.shape[2:]).sum(2) for x in (dk, dv))
    return dq, dk, dv, dbias


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
class _Gathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], table: NeighborTable, scale: float) -> tuple[Tensor, Tensor]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        bias_f = None if bias is None else bias.to(_compute_dtype(q)).contiguous()
        if _use_native(q, v):
            out, lse = _native().forward(q, k, v, table.index, _or_empty(bias_f, q), scale)
        else:
            out, lse = _torch_forward(q, k, v, table, bias_f, scale)
        ctx.save_for_backward(q, k, v, bias_f, lse)  # not out: the caller may edit it in place
        ctx.table, ctx.scale = table, scale
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.set_materialize_grads(False)  # an unused LSE costs nothing in the backward
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Optional[Tensor], dlse: Optional[Tensor]) -> tuple[Any, ...]:
        q, k, v, bias, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dout = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device) if dout is None else dout.contiguous()
        if dlse is not None:
            dlse = dlse.masked_fill(lse == float("-inf"), 0.0)  # a query with no key has no LSE gradient
        if dlse is None and _use_native(q, v):  # the C++ backward forms rowsum(dO * O) itself: no LSE gradient
            dq, dk, dv, dbias = _native().backward(dout, q, k, v, lse, ctx.table.index, ctx.table.inv_ptr, ctx.table.inv_pos, _or_empty(bias, q), ctx.scale, bias_grad)
        else:
            dq, dk, dv, dbias = _torch_backward(dout, q, k, v, lse, ctx.table, bias, ctx.scale, bias_grad, dlse)
        if bias_grad:  # reduce over the axes the bias broadcast
            dbias = dbias.sum_to_size(ctx.bias_shape)
        else:
            dbias = None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None, None


def _or_empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    return x if x is not None else torch.empty(0, device=like.device)


def gathered_attention(
    q: Tensor, k: Tensor, v: Tensor, table: NeighborTable, *, scale: float, bias: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Attention of each query over the keys its table row names: ``(out, lse)``.

    Args:
        q: (B, H, Nq, D); k, v: (B, Hk, Nk, D) with H a multiple of Hk (GQA); v's head dim
            must equal D on the native kernel (the PyTorch path takes any).
        table: a :class:`NeighborTable` over Nq queries and Nk keys.
        scale: multiplies q . k. bias: (B|1, H|1, Nq, K) added to the scores of the slots,
            differentiable.

    Returns out (B, H, Nq, Dv) and lse (B, H, Nq) in float32 (-inf for a query with no key,
    whose output is 0).
    """
    if table.index.shape[0] != q.shape[2] or table.n_keys != k.shape[2]:
        raise ValueError(f"table: built for {table.index.shape[0]} queries and {table.n_keys} keys, got {q.shape[2]} and {k.shape[2]}")
    if bias is not None and (bias.dim() != 4 or bias.shape[2:] != table.index.shape):
        raise ValueError(f"bias: expected (B|1, H|1, {q.shape[2]}, {table.slots}), got {tuple(bias.shape)}")
    return _Gathered.apply(q, k, v, bias, table, scale)
