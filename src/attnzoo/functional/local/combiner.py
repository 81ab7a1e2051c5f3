"""Combiner: full attention through region abstractions (catalog L11; Ren et al., NeurIPS 2021,
arXiv 2107.05768).

Attention is a conditional expectation ``A(x_i) = E_{p(j|i)}[v_j]`` (the paper's Eq. 3).
Combiner partitions the keys ``Omega_i`` a query may see into a *direct* part ``Omega_i^0`` and
regions ``Omega_i^1..Omega_i^R``, and factorizes (Sec. 3, the "local factorization"):

    p(j | i) = p(j | i)                              j in Omega_i^0     (direct expectation)
    p(j | i) = p(Omega_i^r | i) * q(j | Omega_i^r)   j in Omega_i^r     (local expectation)

with one normalizer over the direct keys and the region abstractions,

    Z_i = sum_{j in Omega_i^0} exp(s q_i.k_j) + sum_r exp(s q_i.kbar_r),
    p(j | i) = exp(s q_i.k_j) / Z_i,     p(Omega_i^r | i) = exp(s q_i.kbar_r) / Z_i,

and the region's inner distribution a local softmax that does not depend on i:
``q(j | Omega^r) = softmax_{j in Omega^r}(s qbar_r.k_j)``. The output is

    out_i = sum_{j in Omega_i^0} p(j|i) v_j + sum_r p(Omega_i^r|i) vbar_r,
    vbar_r = sum_{j in Omega^r} q(j|Omega^r) v_j.

``p(.|i)`` is a proper distribution over every key of ``Omega_i`` (rows sum to 1) and every key
gets positive mass: full coverage in one layer, the paper's point. The abstractions ``qbar_r``,
``kbar_r`` pool the region's queries / keys (``pooling="max"`` or ``"mean"``), the choice of the
official implementation (google-research ``combiner``, ``sqrt_fixed_full``: ``pooling_summary``
over the span's queries gives the query of the span's local softmax, over its keys the span's key).
``s`` is ``scale`` (default ``D ** -0.5``) on every product.

Variants (the paper's Sec. 4, Fig. 1; ``block_size`` = the paper's segment length ``s``):

* ``"fixed"`` (Combiner-Fixed, from the Sparse Transformer's fixed pattern): segments of
  ``block_size`` tokens from position 0. Direct: i's own segment (up to i when causal). Regions:
  the other segments (causal: the earlier ones), one abstraction per segment, shared by all
  queries. Cost O(N * (block + N / block)) = O(N sqrt N) at ``block ~ sqrt N``.
* ``"axial"`` (Combiner-Axial): the sequence laid out row-major in rows of ``block_size``; query
  (row s, column u). Causal: direct = its row up to itself and its column above it; regions = for
  each other column u', the cells of that column above row s (``block_size - 1`` regions).
  Non-causal: direct = its whole row and the rest of its column; regions = each other column
  without row s. Cost O(N * (2 * block + N / block)).
* ``"logsparse"`` (Combiner-Logsparse, from the LogSparse Transformer; causal only; no
  ``block_size``): direct = i itself; regions = the dyadic spans
  ``[((i >> l) - 1) << l, (i >> l) << l)`` for each set bit l of i, which tile ``[0, i)`` in
  O(log i) spans (a Fenwick decomposition). This is the reading of the official code
  (``_SelfAttLogn`` in google-research ``combiner/jax/model/layer.py``: spans of 2^l aligned at
  multiples of 2^l, query i reads the span just before its own at level l when bit l of i is
  set). Span abstractions are shared by every query: O(N log N) time and memory.

Choices where the paper leaves room (stated here): the partition is disjoint (in the
non-causal fixed variant the official code also lets the own segment's abstraction compete with
its direct keys; the paper's Sec. 3 partition is disjoint, and we follow the paper); pooling of
queries and keys uses the same operator; a region holding no real key (padding, the first row)
is dropped. Axial: the causal partition is Fig. 1(F)'s (the direct row prefix and column, and
per other column the cells above row s, whose abstraction is the column's running max /
mean: the official ``axial_mixture_unidir``'s "previous row" regions, without the extra
row-summary regions that code's mixture variant adds); the non-causal partition is its mirror
(every other row instead of the rows above), disjoint like the causal one, where the official
bidirectional code sums four overlapping directional summaries.

Backends: ``reference`` (the distribution ``p(j|i)`` materialized as a (B, H, N, N) matrix from
region membership tensors, then ``P @ v``: the spec); ``factorized`` (the O(N sqrt N) form: a
joint softmax over each query's direct scores and its region scores, no N x N tensor; O(N log N)
for logsparse).
Key padding: a padded key is excluded everywhere (direct scores, pooling, local softmaxes). Each
sequence is first rolled so that its first real token sits at position 0 (segments, rows and
spans are placed from there, as for the sequence alone), and the output rolled back: a left- or
right-padded batch equals each sequence run alone; pads inside a sequence are just excluded keys.
A causal query ahead of its sequence's first real token sees no key and outputs 0.
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...kernels.reference import default_scale
from ...registry import Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from .._padding import real_keys, sample_padding
from ._shared import key_padding_param, key_spans
from .._prefix_decoder import PrefixDecoder

__all__ = ["combiner_attention", "COMBINER", "combiner_weights"]

_NEG = float("-inf")


def _positive_int(value: Any, p: Problem) -> Optional[str]:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else "a positive int (tokens per segment / row), or None for variant='logsparse'"


def _check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    """block_size goes with fixed / axial; logsparse has its own (dyadic) spans and is causal only."""
    if bound["variant"] == "logsparse":
        if bound["block_size"] is not None:
            return "block_size", "expected None for variant='logsparse' (its regions are the dyadic spans of the binary expansion of i)"
        if not bound["causal"]:
            return "variant", "'logsparse' is autoregressive only (Combiner-Logsparse): pass causal=True"
    elif bound["block_size"] is None:
        return "block_size", f"required for variant={bound['variant']!r}: the segment length / row width (a positive int)"
    return None


COMBINER_PARAMS = (
    Param("block_size", None, "the segment length (fixed) or row width (axial), required there; ~sqrt(N) gives O(N sqrt N); None for logsparse", _positive_int, (0, -4, 2.5, "8"), "int | None"),
    choice("variant", ("fixed", "axial", "logsparse"), "fixed", "the sparse pattern the factorization comes from (Combiner-Fixed, -Axial, -Logsparse)"),
    flag("causal", False, "autoregressive: each query's support is the keys up to itself"),
    choice("pooling", ("max", "mean"), "max", "how a region's queries and keys are pooled into its abstraction"),
    key_padding_param(),
    positive_number("scale", "multiplies every q.k product; default head_dim ** -0.5"),
)


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _masked_softmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the allowed entries of the last axis; a row with none gives zeros (and a
    zero gradient, never NaN)."""
    x = logits.masked_fill(~allowed, _NEG)
    m = x.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    z = e.sum(-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))


def _roll_plan(key_padding_mask: Optional[Tensor], b: int, n: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """``(to_rolled, back, before)``, or None when no sequence starts with pads: position p of the
    rolled sequence b is position ``to_rolled[b, p]`` (B, N) of the input (its first real token at
    0), ``back`` undoes it, ``before`` (B, N) bool marks the pads ahead of the first real token
    (rolled to the end; a causal query there sees no key and outputs 0). One host sync."""
    if key_padding_mask is None:
        return None
    first, _ = key_spans(key_padding_mask.reshape(b, n))
    if not bool(first.any()):
        return None
    pos = torch.arange(n, device=first.device)[None, :]
    return (pos + first[:, None]) % n, (pos - first[:, None]) % n, pos < first[:, None]


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, N, ...) with its positions (dim 2) re-ordered by index (B, N)."""
    shape = index.shape[:1] + (1,) + index.shape[1:] + (1,) * (x.dim() - 3)
    return x.gather(2, index.view(shape).expand(x.shape[0], x.shape[1], -1, *x.shape[3:]))


# --------------------------------------------------------------------------------------------
# the reference: the partition as membership tensors, p(j|i) materialized
# --------------------------------------------------------------------------------------------
def _partition(n: int, block: int, variant: str, causal: bool, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(direct (B, N, N), member (B, G, N), uses (N, G))``: the direct keys of each query, the
    real keys of each region, and the regions each query's support is split into."""
    dev = real.device
    i = torch.arange(n, device=dev)
    if variant == "fixed":
        seg = i // block
        groups = torch.arange(-(-n // block), device=dev)
        direct = seg[:, None] == seg[None, :]
        if causal:
            direct = direct & (i[None, :] <= i[:, None])
        member = seg[None, :] == groups[:, None]  # (G, N)
        uses = (groups[None, :] < seg[:, None]) if causal else (groups[None, :] != seg[:, None])
    elif variant == "logsparse":  # direct: i itself; regions: the dyadic spans of i's binary expansion
        direct = i[:, None] == i[None, :]
        spans = [(level, c) for level in range(_levels(n)) for c in range(-(-n // 2**level))]
        g_level = torch.tensor([lv for lv, _ in spans], device=dev, dtype=torch.long)
        g_start = torch.tensor([c * 2**lv for lv, c in spans], device=dev, dtype=torch.long)
        member = (i[None, :] >= g_start[:, None]) & (i[None, :] < g_start[:, None] + 2 ** g_level[:, None])
        # query i uses span (level l, c) iff bit l of i is set and c = (i >> l) - 1
        uses = (((i[:, None] >> g_level[None, :]) & 1) == 1) & (g_start[None, :] == ((i[:, None] >> g_level[None, :]) - 1) << g_level[None, :])
    else:  # axial: rows of `block`; region g = (row s, column c) = column c without / above row s
        row, col = i // block, i % block
        rows = -(-n // block)
        g_row = torch.arange(rows, device=dev).repeat_interleave(block)  # (G,) G = rows * block
        g_col = torch.arange(block, device=dev).repeat(rows)
        same_row, same_col = row[:, None] == row[None, :], col[:, None] == col[None, :]
        if causal:
            direct = (same_row & (col[None, :] <= col[:, None])) | (same_col & (row[None, :] < row[:, None]))
            in_rows = row[None, :] < g_row[:, None]
        else:
            direct = same_row | same_col
            in_rows = row[None, :] != g_row[:, None]
        member = (col[None, :] == g_col[:, None]) & in_rows  # (G, N)
        uses = (g_row[None, :] == row[:, None]) & (g_col[None, :] != col[:, None])  # (N, G)
    direct = direct[None] & real[:, None, :]
    member = member[None] & real[:, None, :]
    return direct, member, uses


def combiner_weights(q: Tensor, k: Tensor, *, block_size: Optional[int], variant: str = "fixed", causal: bool = False, pooling: str = "max",
                     key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """The (B, H, N, N) matrix ``p(j|i)`` of the factorization (the module docstring), in the
    compute dtype (float32, float64 for float64): each row is a distribution over the query's
    support; ``out = P @ v``. Materializes N x N: for small N (the spec and the hooks)."""
    b, h, n, d = q.shape
    cdt = _compute_dtype(q)
    qf, kf = q.to(cdt), k.to(cdt)
    sc = default_scale(q, scale)
    real = real_keys(key_padding_mask, b, n, q.device)
    plan = _roll_plan(key_padding_mask, b, n)
    if plan is not None:  # each sequence's first real token at 0; the matrix is rolled back at the end
        qf, kf, real = _take(qf, plan[0]), _take(kf, plan[0]), real.gather(1, plan[0])
    direct, member, uses = _partition(n, block_size, variant, causal, real)
    has = member.any(-1)  # (B, G)
    uses = uses[None] & has[:, None, :]  # (B, N, G)
    mem = member[:, None, :, :, None]  # (B, 1, G, N, 1)
    if pooling == "max":  # (regions in chunks: the masked copy is (B, H, chunk, N, D))
        qbar = torch.cat([qf[:, :, None].masked_fill(~m, _NEG).amax(-2) for m in mem.split(16, dim=2)], 2)
        kbar = torch.cat([kf[:, :, None].masked_fill(~m, _NEG).amax(-2) for m in mem.split(16, dim=2)], 2)
        qbar = torch.where(has[:, None, :, None], qbar, torch.zeros_like(qbar))
        kbar = torch.where(has[:, None, :, None], kbar, torch.zeros_like(kbar))
    else:
        w = member.to(cdt)[:, None]  # (B, 1, G, N)
        count = w.sum(-1, keepdim=True).clamp_min(1.0)
        qbar, kbar = (w @ qf) / count, (w @ kf) / count
    s_direct = sc * qf @ kf.transpose(-1, -2)  # (B, H, N, N)
    s_region = sc * qf @ kbar.transpose(-1, -2)  # (B, H, N, G)
    joint = _masked_softmax(torch.cat([s_direct, s_region], -1), torch.cat([direct, uses], -1)[:, None])
    p_direct, p_region = joint[..., :n], joint[..., n:]
    inner = _masked_softmax(sc * qbar @ kf.transpose(-1, -2), member[:, None])  # (B, H, G, N): q(j | region)
    p = p_direct + p_region @ inner
    if plan is not None:  # rows and columns back to the input's positions
        p = _take(p, plan[1])
        p = p.gather(3, plan[1][:, None, None, :].expand(b, h, n, n))
        if causal:
            p = p.masked_fill(plan[2][:, None, :, None], 0.0)
    return p


def _reference(q, k, v, *, block_size, variant, causal, pooling, key_padding_mask, scale):
    """``p(j|i)`` materialized from membership tensors, then ``P @ v``: the spec."""
    p = combiner_weights(q, k, block_size=block_size, variant=variant, causal=causal, pooling=pooling, key_padding_mask=key_padding_mask, scale=scale)
    return (p @ v.to(p.dtype)).to(q.dtype)


def _weights(q, k, v, *, block_size, variant, causal, pooling, key_padding_mask, scale, **_):
    return combiner_weights(q, k, block_size=block_size, variant=variant, causal=causal, pooling=pooling, key_padding_mask=key_padding_mask, scale=scale), True


# --------------------------------------------------------------------------------------------
# the factorized form: O(N sqrt N), no N x N tensor
# --------------------------------------------------------------------------------------------
def _pool(x: Tensor, real: Tensor, pooling: str) -> tuple[Tensor, Tensor]:
    """Pool x (..., m, D) over its real rows (real (..., m) broadcastable): (..., D), has (...)."""
    has = real.any(-1)
    r = real[..., None]
    if pooling == "max":
        out = x.masked_fill(~r, _NEG).amax(-2)
        return torch.where(has[..., None], out, torch.zeros_like(out)), has
    count = r.sum(-2).clamp_min(1).to(x.dtype)
    return (x * r).sum(-2) / count, has


def _shift(x: Tensor, dim: int, fill: float) -> Tensor:
    """x moved one step forward along ``dim`` (entry t holds x[t - 1]; entry 0 holds ``fill``)."""
    head = torch.full_like(x.narrow(dim, 0, 1), fill)
    return torch.cat([head, x.narrow(dim, 0, x.shape[dim] - 1)], dim)


def _exclusive_pool(x: Tensor, real: Tensor, causal: bool, pooling: str) -> tuple[Tensor, Tensor]:
    """For each position t along dim -2 of x (..., R, D): the pool of the real rows before t
    (causal) or of every real row but t: (..., R, D), has (..., R)."""
    r = real[..., None]
    if pooling == "max":
        xm = x.masked_fill(~r, _NEG)
        out = _shift(torch.cummax(xm, dim=-2).values, -2, _NEG)
        if not causal:
            suffix = _shift(torch.cummax(xm.flip(-2), dim=-2).values, -2, _NEG).flip(-2)
            out = torch.maximum(out, suffix)
        count = _shift(real.long().cumsum(-1), -1, 0) if causal else real.long().sum(-1, keepdim=True) - real.long()
        has = count > 0
        return torch.where(has[..., None], out, torch.zeros_like(out)), has
    xr = x * r
    total = xr.cumsum(-2) - xr if causal else xr.sum(-2, keepdim=True) - xr
    count = real.long().cumsum(-1) - real.long() if causal else real.long().sum(-1, keepdim=True) - real.long()
    return total / count.clamp_min(1)[..., None].to(x.dtype), count > 0


def _fixed_factorized(q: Tensor, k: Tensor, v: Tensor, real: Tensor, block: int, causal: bool, pooling: str, sc: float) -> Tensor:
    b, h, n, d = q.shape
    segs = -(-n // block)
    extra = segs * block - n
    rp = F.pad(real, (0, extra), value=False)
    qp, kp, vp = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
    qb, kb, vb = (t.reshape(b, h, segs, block, t.shape[-1]) for t in (qp, kp, vp))
    rb = rp.view(b, 1, segs, block)
    # direct: the own segment
    local = (qb * sc) @ kb.transpose(-1, -2)  # (B, H, S, block, block)
    allow_local = rb[:, :, :, None, :].expand(b, 1, segs, block, block)
    if causal:
        allow_local = allow_local & torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    # abstractions of every segment: its pooled key, and its local-softmax summary of values
    qbar, has = _pool(qb, rb, pooling)  # (B, H, S, D), has (B, 1, S)
    kbar, _ = _pool(kb, rb, pooling)
    inner = _masked_softmax(torch.einsum("bhsd,bhstd->bhst", qbar * sc, kb), rb)  # (B, H, S, block)
    vbar = torch.einsum("bhst,bhstd->bhsd", inner, vb)
    region = (qp * sc) @ kbar.transpose(-1, -2)  # (B, H, Np, S)
    seg = torch.arange(segs * block, device=q.device) // block
    groups = torch.arange(segs, device=q.device)
    which = (groups[None, :] < seg[:, None]) if causal else (groups[None, :] != seg[:, None])
    allow_region = which[None, None] & has[:, :, None, :]
    joint = _masked_softmax(
        torch.cat([local.reshape(b, h, segs * block, block), region], -1),
        torch.cat([allow_local.reshape(b, 1, segs * block, block), allow_region], -1),
    )
    p_local = joint[..., :block].reshape(b, h, segs, block, block)
    out = (p_local @ vb).reshape(b, h, segs * block, -1) + joint[..., block:] @ vbar
    return out[:, :, :n]


def _axial_factorized(q: Tensor, k: Tensor, v: Tensor, real: Tensor, block: int, causal: bool, pooling: str, sc: float) -> Tensor:
    b, h, n, d = q.shape
    rows = -(-n // block)
    extra = rows * block - n
    rp = F.pad(real, (0, extra), value=False)
    qg, kg, vg = (F.pad(t, (0, 0, 0, extra)).reshape(b, h, rows, block, t.shape[-1]) for t in (q, k, v))  # [s, u]
    rg = rp.view(b, 1, rows, block)
    qc, kc, vc, rc = qg.transpose(2, 3), kg.transpose(2, 3), vg.transpose(2, 3), rg.transpose(2, 3)  # [u, s]
    dev = q.device
    cols_i = torch.arange(block, device=dev)
    rows_i = torch.arange(rows, device=dev)
    # direct: the own row (up to u when causal) and the own column (above s when causal, else all but s)
    s_row = (qg * sc) @ kg.transpose(-1, -2)  # (B, H, R, C, C) [s, u, u']
    allow_row = rg[:, :, :, None, :].expand(b, 1, rows, block, block)
    if causal:
        allow_row = allow_row & (cols_i[None, :] <= cols_i[:, None])
    s_col = ((qc * sc) @ kc.transpose(-1, -2)).transpose(2, 3)  # (B, H, R, C, R) [s, u, t]
    in_rows = (rows_i[None, :] < rows_i[:, None]) if causal else (rows_i[None, :] != rows_i[:, None])  # [s, t]
    allow_col = rc[:, :, None, :, :] & in_rows[:, None, :]  # (B, 1, R, C, R) [s, u, t]
    # regions: column u' above / without row s; abstraction pooled over those rows
    qbar, has = _exclusive_pool(qc, rc, causal, pooling)  # (B, H, C, R, D) [u', s], has (B, 1, C, R)
    kbar, _ = _exclusive_pool(kc, rc, causal, pooling)
    inner = _masked_softmax((qbar * sc) @ kc.transpose(-1, -2), rc[:, :, :, None, :] & in_rows)  # (B, H, C, R, R) [u', s, t]
    vbar = (inner @ vc).transpose(2, 3)  # (B, H, R, C, Dv) [s, u']
    s_region = (qg * sc) @ kbar.transpose(2, 3).transpose(-1, -2)  # (B, H, R, C, C) [s, u, u']
    allow_region = has.transpose(2, 3)[:, :, :, None, :] & (cols_i[None, :] != cols_i[:, None])
    joint = _masked_softmax(torch.cat([s_row, s_col, s_region], -1), torch.cat([allow_row, allow_col, allow_region.expand(b, 1, rows, block, block)], -1))
    p_row, p_col, p_region = joint[..., :block], joint[..., block : block + rows], joint[..., block + rows :]
    out = p_row @ vg + (p_col.transpose(2, 3) @ vc).transpose(2, 3) + p_region @ vbar
    return out.reshape(b, h, rows * block, -1)[:, :, :n]


def _levels(n: int) -> int:
    """Span levels 0..L-1 a query of a length-n sequence can use: L = bit length of n - 1."""
    return max(1, (n - 1).bit_length())


def _logsparse_factorized(q: Tensor, k: Tensor, v: Tensor, real: Tensor, pooling: str, sc: float) -> Tensor:
    """Combiner-Logsparse: query i's past [0, i) is the disjoint union of the spans
    ``[((i >> l) - 1) << l, (i >> l) << l)`` over the set bits l of i; each span is one region
    (pooled key, local-softmax summary); i itself is the direct part. O(N log N)."""
    b, h, n, d = q.shape
    pos = torch.arange(n, device=q.device)
    logits = [(q * k).sum(-1, keepdim=True) * sc]  # direct: i itself
    allowed = [real[:, None, :, None]]
    values = []
    for level in range(_levels(n)):
        size = 2**level
        spans = -(-n // size)
        extra = spans * size - n
        rb = F.pad(real, (0, extra), value=False).view(b, 1, spans, size)
        qb, kb, vb = (F.pad(t, (0, 0, 0, extra)).reshape(b, h, spans, size, t.shape[-1]) for t in (q, k, v))
        qbar, has = _pool(qb, rb, pooling)
        kbar, _ = _pool(kb, rb, pooling)
        inner = _masked_softmax(torch.einsum("bhsd,bhstd->bhst", qbar * sc, kb), rb)
        vbar = torch.einsum("bhst,bhstd->bhsd", inner, vb)  # (B, H, spans, Dv)
        # the queries of span c read span c - 1 (when bit `level` of their position is set): a shift, no gather
        k_prev, v_prev, has_prev = _shift(kbar, 2, 0.0), _shift(vbar, 2, 0.0), _shift(has, 2, False)
        scores = torch.einsum("bhstd,bhsd->bhst", qb * sc, k_prev).reshape(b, h, spans * size)[:, :, :n]
        use = ((pos >> level) & 1) == 1
        logits.append(scores[..., None])
        allowed.append((use & has_prev.repeat_interleave(size, dim=-1)[..., :n])[..., None])
        values.append(v_prev)
    p = _masked_softmax(torch.cat(logits, -1), torch.cat(allowed, -1))
    out = p[..., :1] * v
    for level, vals in enumerate(values):
        size = 2**level
        w = p[..., level + 1]  # (B, H, N)
        spans = vals.shape[2]
        w = F.pad(w, (0, spans * size - n)).view(b, h, spans, size, 1)
        out = out + (w * vals[:, :, :, None, :]).reshape(b, h, spans * size, -1)[:, :, :n]
    return out


def _factorized(q, k, v, *, block_size, variant, causal, pooling, key_padding_mask, scale):
    """The factorization evaluated segment by segment: a joint softmax over each query's direct
    scores and region scores; O(N sqrt N) time and memory at ``block_size ~ sqrt N``."""
    cdt = _compute_dtype(q)
    b, n = q.shape[0], q.shape[2]
    real = real_keys(key_padding_mask, b, n, q.device)
    qc, kc, vc, sc = q.to(cdt), k.to(cdt), v.to(cdt), default_scale(q, scale)
    plan = _roll_plan(key_padding_mask, b, n)
    if plan is not None:  # each sequence's first real token at 0 (rolled back below)
        qc, kc, vc, real = _take(qc, plan[0]), _take(kc, plan[0]), _take(vc, plan[0]), real.gather(1, plan[0])
    if variant == "logsparse":
        out = _logsparse_factorized(qc, kc, vc, real, pooling, sc)
    else:
        run = _fixed_factorized if variant == "fixed" else _axial_factorized
        out = run(qc, kc, vc, real, block_size, causal, pooling, sc)
    if plan is not None:
        out = _take(out, plan[1])
        if causal:
            out = out.masked_fill(plan[2][:, None, :, None], 0.0)
    return out.to(q.dtype)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    causal = pattern == "causal_self"
    if rng is None:
        return {"block_size": max(1, math.isqrt(max(1, p.kv_len))), "variant": "fixed", "causal": causal}
    variant = rng.choice(("fixed", "axial", "logsparse") if causal else ("fixed", "axial"))
    params: dict[str, Any] = {
        "block_size": None if variant == "logsparse" else rng.randint(1, max(1, p.kv_len + 1)),
        "variant": variant,
        "pooling": rng.choice(("max", "mean")),
        "causal": causal,
    }
    pad = sample_padding(p, rng)
    if pad is not None:
        params["key_padding_mask"] = pad
    return params


def _allowed_pairs(p: Problem, bound: dict) -> int:
    """Full coverage: every key of the support (all, or those up to i when causal)."""
    n = p.kv_len
    per_head = n * (n + 1) // 2 if bound["causal"] else n * n
    return p.batch * p.q_heads * per_head


COMBINER = register(
    Mechanism(
        name="combiner",
        family="local",
        catalog=("L11",),
        paper="Combiner: Full Attention Transformer with Sparse Computation Cost (Ren et al., NeurIPS 2021), Sec. 3 (Eq. 3 and its local factorization), Sec. 4 (Combiner-Fixed, Combiner-Axial)",
        formula="out_i = sum_{j in Omega_i^0} p(j|i) v_j + sum_r p(Omega_i^r|i) sum_{j in Omega_i^r} softmax_j(s qbar_r.k_j) v_j; p over direct keys and abstractions kbar_r in one softmax",
        cost="O(N * (block + N / block) * D) time and memory (fixed; axial O(N * (2 block + N / block) * D)): O(N sqrt N) at block ~ sqrt N; logsparse O(N log N * D)",
        summary="Combiner: full-coverage attention: direct softmax over a local part, region abstractions (pooled key, local-softmax value summary) for the rest",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=COMBINER_PARAMS,
        sample_params=_sample_params,
        check_params=_check_params,
        weights=_weights,
        allowed_pairs=_allowed_pairs,
    )
)
COMBINER.add_backend(Backend("reference", _reference, doc="p(j|i) materialized from region membership tensors, then P @ v: the spec", priority=-100, materializes_scores=True))
COMBINER.add_backend(Backend("factorized", _factorized, doc="joint softmax over direct and region scores per segment/row: O(N sqrt N), no N x N tensor", priority=20))


def combiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: Optional[int] = None,
    variant: str = "fixed",
    causal: bool = False,
    pooling: str = "max",
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Combiner (catalog L11): every key reached in one layer, directly or through a region abstraction.

    ``out_i = sum_{j in Omega_i^0} p(j|i) v_j + sum_r p(Omega_i^r|i) vbar_r`` with one softmax
    over the direct scores ``s q_i.k_j`` and the region scores ``s q_i.kbar_r``, and
    ``vbar_r = sum_{j in Omega^r} softmax_j(s qbar_r.k_j) v_j`` (Ren et al. 2021, Sec. 3; the
    partition of Sec. 4: ``variant="fixed"`` segments, ``"axial"`` rows and columns,
    ``"logsparse"`` dyadic spans).

    Args:
        q, k: (B, H, N, D). v: (B, H, N, Dv). Self-attention only (the partition is over positions).
        block_size: segment length (fixed) or row width (axial); ~sqrt(N) gives O(N sqrt N).
            None (and required None) for logsparse.
        variant: ``"fixed"`` (Combiner-Fixed), ``"axial"`` (Combiner-Axial) or ``"logsparse"``
            (Combiner-Logsparse, causal only: dyadic spans, O(N log N)).
        causal: the support of query i is the keys up to i.
        pooling: ``"max"`` or ``"mean"``: how a region's queries and keys give its abstraction.
        key_padding_mask: (B, N) bool, True = pad. Each sequence's partition starts at its first
            real token (a left- or right-padded batch equals each sequence alone).
        scale: defaults to ``D ** -0.5``.

    Cost: O(N * (block_size + N / block_size) * D) (logsparse: O(N log N * D)); the ``reference``
    backend materializes N x N.
    Paper: Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost",
    NeurIPS 2021.

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = combiner_attention(q, k, v, block_size=64, variant="axial", causal=True)
    """
    return COMBINER(q, k, v, backend=backend, block_size=block_size, variant=variant, causal=causal, pooling=pooling, key_padding_mask=key_padding_mask, scale=scale)


COMBINER.function = combiner_attention
COMBINER.decoder = PrefixDecoder("combiner", "all")
