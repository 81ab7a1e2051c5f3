"""HyperAttention (catalog S5; Han et al., "HyperAttention: Long-context Attention in Near-Linear
Time", ICLR 2024, arXiv 2310.05869, Alg. 1-4; insuhan/hyper-attn).

An *estimate* of softmax attention (``exact=False``) in two parts, merged by their log-sum-exps:

1. **sortLSH** (Alg. 1, Sec. 3.1): an angular LSH with ``lsh_num_projs`` = r random Gaussian
   directions hashes each query and key to the r sign bits ``c = sum_t [x . w_t > 0] 2^t``, and
   the bucket is the Gray code of c, ``g(c) = c ^ (c >> 1)`` (the code's ``perm`` table, whose
   neighbours differ in one bit). Queries and keys are sorted by bucket (stable) and cut into
   ``num_blocks = ceil(Nk / block_size)`` blocks (keys: ``block_size`` each; queries:
   ``ceil(Nq / num_blocks)``); each query attends exactly the keys of its block (the block
   diagonal of the sorted matrix).
2. **residual by uniform sampling** (Alg. 2-3, Sec. 3.2): ``sample_size`` = m key positions
   drawn uniformly with replacement from the sorted keys; their scores get the LSE correction
   log(Nk / m) (each sample stands for Nk / m keys); a sample inside the query's own block is
   masked (already counted exactly).

So query i's output is a weighted softmax ``out_i = sum_j W_ij e^{s_ij} v_j / sum_j W_ij e^{s_ij}``
with W_ij = 1 on its block, (Nk / m) x (times j was drawn) on the samples outside it, 0 elsewhere;
the returned LSE is ``log sum_j W_ij e^{s_ij}``, the estimate of the row's log-partition.

**Causal** (Alg. 4, Sec. 3.3): the N x N causal matrix is split into two causal diagonal halves
(recursively) and one unmasked off-diagonal block (queries of the second half against keys of
the first half, by 1.-2.); below ``min_seq_len`` a causal block is exact. A non-causal call is
exact when Nq < ``min_seq_len`` (the code's conditions, both kept).

Determinism: the projections and every sample come from one ``torch.Generator`` seeded by
``seed``, drawn on the CPU in a fixed order (projections, then the calls of the recursion in
order), so every backend and device sees the same plan; the same ``seed`` gives the same result.
The plan (hashes, sort orders, samples) is made once by :func:`hyper_plan`; the backends differ
in how they compute from it.

Choices where the code does something else: an odd causal block is split at ceil(n / 2) (the code
pads a zero row, which joins the LSH sort of the queries); sorted sequences that do not fill the
last block leave its slots empty (the code pads zero keys, which are then attended with score 0).
Key padding is refused: the buckets, blocks and samples are drawn over all N keys, so a padded
batch cannot equal each sequence alone. The output at i depends on later tokens through the sort
and the split (``causal_block`` = whole sequence), never through their values' attention.

Cost: O(N (block_size + sample_size) D) per non-causal call, O(N log N) sort; causal: that times
log(N / min_seq_len) plus O(N min_seq_len D) for the exact leaves. Memory O(N (block_size + m)).

Backends: ``reference`` (the plan as a dense N x N weight matrix W, built call by call, one
weighted softmax); ``blocked`` (each call computed on its own: sorted blocks batched, the samples
as one N x m product, exact leaves in 256-row chunks, all partials merged by LSE; no N x N tensor).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, materialized_attention, stable_softmax_lse
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import key_padding_param
from ._params import WHOLE_SEQUENCE, int_at_least, positive_int, sample_options
from ._select import merge_partials
from .._prefix_decoder import READS_AHEAD

__all__ = ["hyper_attention", "HYPER", "gray_code", "lsh_buckets", "hyper_plan"]

NEG_INF = float("-inf")
ROWS = 256  # query rows per chunk of an exact leaf in the blocked backend


def _check_seed(value: Any, p: Problem) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        return "an int in [0, 2**63) (seeds the projections and the samples)"
    return None


def _check_projs(value: Any, p: Problem) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 30:
        return "an int in [1, 30] (random projections of the angular LSH)"
    return None


def _check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound["causal"] and p.q_len != p.kv_len:
        return "causal", f"causal HyperAttention splits one square causal matrix: needs Nq == Nk, got {p.q_len} and {p.kv_len}"
    return None


HYPER_PARAMS = (
    Param("lsh_num_projs", 7, "r: random projections of the angular LSH (2^r buckets; the paper's 7)", _check_projs, (0, 31, 2.0, "7"), "int"),
    Param("block_size", 256, "keys per block of the sorted block diagonal (the paper's 256)", positive_int("keys per block"), (0, -1, 1.5, "256"), "int"),
    Param("sample_size", 256, "m: keys sampled uniformly for the residual (0: none; the paper's 256)", int_at_least(0, "sampled keys"), (-1, 1.5, "256"), "int"),
    Param("min_seq_len", 4096, "below this length a call is exact attention (the paper's 4096)", positive_int("tokens"), (0, -1, 1.5, "4096"), "int"),
    Param("seed", 0, "seeds the projections and the samples (torch.Generator)", _check_seed, (-1, 1.5, "0", True), "int"),
    flag("causal", False, "causal self-attention by the recursive split (Nq == Nk)"),
    key_padding_param("HyperAttention's buckets, blocks and samples are drawn over all N keys, so a padded batch cannot equal each sequence alone"),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the estimated log-sum-exp of each row, (B, H, Nq)"),
)


# --------------------------------------------------------------------------------------------
# the hash and the plan (shared by every backend: the random part)
# --------------------------------------------------------------------------------------------
def gray_code(c: Tensor) -> Tensor:
    """The reflected binary Gray code of each integer: ``c ^ (c >> 1)``."""
    return torch.bitwise_xor(c, c >> 1)


def lsh_buckets(x: Tensor, projections: Tensor) -> Tensor:
    """Angular LSH bucket of each row of ``x`` (.., n, D): the Gray code of the sign bits of
    ``x . w_t`` (bit t), ``projections`` (D, r). Computed in float64."""
    bits = (torch.matmul(x.detach().double(), projections.to(x.device, torch.float64)) > 0).long()
    weights = 2 ** torch.arange(projections.shape[1], device=x.device)
    return gray_code((bits * weights).sum(-1))


@dataclass
class ExactCall:
    """Exact attention of query rows [q0, q0 + nq) on keys [k0, k0 + nk) (causal: square, lower triangle)."""

    q0: int
    nq: int
    k0: int
    nk: int
    causal: bool


@dataclass
class LshCall:
    """The sorted block diagonal and the residual samples of a non-causal call."""

    q0: int
    nq: int
    k0: int
    nk: int
    q_order: Tensor  # (B, H, nq): local query index at each sorted position
    k_order: Tensor  # (B, H, nk)
    block: int  # keys per block
    q_block: int  # queries per block
    samples: Optional[Tensor]  # (B, H, m) sorted key positions, or None


def hyper_plan(q: Tensor, k: Tensor, *, lsh_num_projs: int, block_size: int, sample_size: int, min_seq_len: int, seed: int, causal: bool) -> list:
    """Every call of the algorithm (the recursion unrolled), with its sort orders and samples."""
    gen = torch.Generator().manual_seed(seed)
    projections = torch.randn(q.shape[-1], lsh_num_projs, generator=gen, dtype=torch.float64)
    q_hash, k_hash = lsh_buckets(q, projections), lsh_buckets(k, projections)
    b, h = q.shape[:2]
    calls: list = []

    def non_causal(q0: int, nq: int, k0: int, nk: int) -> None:
        if min_seq_len > nq:
            calls.append(ExactCall(q0, nq, k0, nk, False))
            return
        q_order = torch.sort(q_hash[:, :, q0 : q0 + nq], dim=-1, stable=True).indices
        k_order = torch.sort(k_hash[:, :, k0 : k0 + nk], dim=-1, stable=True).indices
        n_blocks = -(-nk // block_size)
        q_block = -(-nq // n_blocks)
        samples = None
        if sample_size > 0 and nq > q_block and nk > block_size:
            samples = torch.randint(nk, (b, h, sample_size), generator=gen).to(q.device)
        calls.append(LshCall(q0, nq, k0, nk, q_order, k_order, block_size, q_block, samples))

    def causal_call(a: int, n: int) -> None:
        if n <= min_seq_len:
            calls.append(ExactCall(a, n, a, n, True))
            return
        half = -(-n // 2)
        causal_call(a, half)
        causal_call(a + half, n - half)
        non_causal(a + half, n - half, a, half)

    if causal:
        causal_call(0, q.shape[2])
    else:
        non_causal(0, q.shape[2], 0, k.shape[2])
    return calls


def _plan(q, k, lsh_num_projs, block_size, sample_size, min_seq_len, seed, causal):
    return hyper_plan(q, k, lsh_num_projs=lsh_num_projs, block_size=block_size, sample_size=sample_size, min_seq_len=min_seq_len, seed=seed, causal=causal)


# --------------------------------------------------------------------------------------------
# reference: the plan as a dense weight matrix
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, lsh_num_projs, block_size, sample_size, min_seq_len, seed, causal, key_padding_mask, scale, return_lse):
    """W (B, H, Nq, Nk) built call by call (1 on exact pairs and on each query's sorted block,
    Nk/m per draw on the samples outside it), then ``softmax(s + log W) @ v``: the spec."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    weight = torch.zeros(b, h, nq, nk, dtype=cdt, device=q.device)
    for call in _plan(q, k, lsh_num_projs, block_size, sample_size, min_seq_len, seed, causal):
        rows, cols = slice(call.q0, call.q0 + call.nq), slice(call.k0, call.k0 + call.nk)
        if isinstance(call, ExactCall):
            ones = torch.ones(call.nq, call.nk, dtype=cdt, device=q.device)
            weight[:, :, rows, cols] += ones.tril() if call.causal else ones
            continue
        for bi in range(b):
            for hi in range(h):
                q_rows = call.q0 + call.q_order[bi, hi]  # global row of each sorted query
                k_cols = call.k0 + call.k_order[bi, hi]
                q_blk = torch.arange(call.nq, device=q.device) // call.q_block
                for blk in range(-(-call.nk // call.block)):
                    r = q_rows[q_blk == blk]
                    c = k_cols[blk * call.block : (blk + 1) * call.block]
                    weight[bi, hi, r[:, None], c[None, :]] += 1.0
                if call.samples is not None:
                    drawn = call.samples[bi, hi]
                    outside = q_blk[:, None] != (drawn // call.block)[None, :]  # (nq, m)
                    r_idx, t_idx = outside.nonzero(as_tuple=True)
                    value = torch.full((r_idx.shape[0],), call.nk / drawn.shape[0], dtype=cdt, device=q.device)
                    weight[bi, hi].index_put_((q_rows[r_idx], k_cols[drawn[t_idx]]), value, accumulate=True)
    # softmax(s + log W): log 0 = -inf leaves out the pairs the plan never visits
    out, lse = materialized_attention(q, k, v, scale=scale, bias=torch.log(weight))
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# blocked: each call on its own, partials merged by LSE
# --------------------------------------------------------------------------------------------
def _blocked(q, k, v, *, lsh_num_projs, block_size, sample_size, min_seq_len, seed, causal, key_padding_mask, scale, return_lse):
    """Sorted blocks batched (B, H, blocks, q_block x block), the samples as one (Nq x m) product,
    exact leaves in chunks of 256 rows; every call's partial (out, lse) per row merged by LSE."""
    b, h, nq, d = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    sc = default_scale(q, scale)
    qq, kk, vv = q.to(cdt), k.to(cdt), v.to(cdt)
    base = (torch.arange(b * h, device=q.device) * nq).view(b, h, 1)  # flat row offset of (b, h)
    outs, lses, rows_all = [], [], []

    def emit(out: Tensor, lse: Tensor, rows: Tensor) -> None:  # out (B, H, r, Dv), rows (B, H, r) global rows
        outs.append(out.reshape(-1, out.shape[-1]))
        lses.append(lse.reshape(-1))
        rows_all.append((base + rows).reshape(-1))

    for call in _plan(q, k, lsh_num_projs, block_size, sample_size, min_seq_len, seed, causal):
        if isinstance(call, ExactCall):
            keys, values = kk[:, :, call.k0 : call.k0 + call.nk], vv[:, :, call.k0 : call.k0 + call.nk]
            for r0 in range(0, call.nq, ROWS):
                r1 = min(call.nq, r0 + ROWS)
                s = torch.matmul(qq[:, :, call.q0 + r0 : call.q0 + r1], keys.transpose(-1, -2)) * sc
                if call.causal:
                    visible = torch.arange(call.nk, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
                    s = s.masked_fill(~visible, NEG_INF)
                p, lse = stable_softmax_lse(s)
                emit(torch.matmul(p, values), lse, torch.arange(call.q0 + r0, call.q0 + r1, device=q.device).expand(b, h, -1))
            continue
        _lsh_call(qq, kk, vv, call, sc, emit)
    out, lse = merge_partials(torch.cat(outs), torch.cat(lses), torch.cat(rows_all), b * h * nq)
    out, lse = out.view(b, h, nq, -1).to(q.dtype), lse.view(b, h, nq)
    return (out, lse) if return_lse else out


def _gather_rows(x: Tensor, order: Tensor) -> Tensor:
    return torch.gather(x, 2, order[..., None].expand(-1, -1, -1, x.shape[-1]))


def _lsh_call(qq: Tensor, kk: Tensor, vv: Tensor, call: LshCall, sc: float, emit) -> None:
    b, h = qq.shape[:2]
    pad = torch.nn.functional.pad
    qs = _gather_rows(qq[:, :, call.q0 : call.q0 + call.nq], call.q_order)
    ks = _gather_rows(kk[:, :, call.k0 : call.k0 + call.nk], call.k_order)
    vs = _gather_rows(vv[:, :, call.k0 : call.k0 + call.nk], call.k_order)
    n_blocks = -(-call.nk // call.block)
    q_pad, k_pad = n_blocks * call.q_block - call.nq, n_blocks * call.block - call.nk
    qb = pad(qs, (0, 0, 0, q_pad)).view(b, h, n_blocks, call.q_block, -1)
    kb = pad(ks, (0, 0, 0, k_pad)).view(b, h, n_blocks, call.block, -1)
    vb = pad(vs, (0, 0, 0, k_pad)).view(b, h, n_blocks, call.block, -1)
    s = torch.matmul(qb, kb.transpose(-1, -2)) * sc
    slot_ok = (torch.arange(n_blocks * call.block, device=qq.device) < call.nk).view(n_blocks, 1, call.block)
    p, lse = stable_softmax_lse(s.masked_fill(~slot_ok, NEG_INF))
    out_blk = torch.matmul(p, vb).flatten(2, 3)[:, :, : call.nq]
    rows = call.q0 + call.q_order  # (B, H, nq): the global row of each sorted query
    emit(out_blk, lse.flatten(2, 3)[:, :, : call.nq], rows)
    if call.samples is not None:
        m = call.samples.shape[-1]
        k_sub, v_sub = _gather_rows(ks, call.samples), _gather_rows(vs, call.samples)
        s = torch.matmul(qs, k_sub.transpose(-1, -2)) * sc  # (B, H, nq, m)
        own = (torch.arange(call.nq, device=qq.device) // call.q_block)[None, None, :, None] == (call.samples // call.block)[:, :, None, :]
        p, lse = stable_softmax_lse(s.masked_fill(own, NEG_INF))
        emit(torch.matmul(p, v_sub), lse + math.log(call.nk / m), rows)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    causal = pattern.startswith("causal")
    if rng is None:
        return {"causal": causal, "block_size": 256, "sample_size": 256, "min_seq_len": 4096 if causal else 256}
    params: dict[str, Any] = {
        "causal": causal,
        "lsh_num_projs": rng.randint(1, 8),
        "block_size": rng.randint(1, 40),
        "sample_size": rng.choice((0, 1, 5, 17, 64)),
        "min_seq_len": rng.randint(1, 60),
        "seed": rng.randrange(1000),
    }
    params = sample_options(params, p, rng)
    params.pop("key_padding_mask", None)  # refused: see the module docstring
    return params


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    """Block + samples of about ``share`` of the keys (half each); share 1: one block of every key (softmax)."""
    n = p.kv_len
    if share >= 1:
        return {"block_size": n, "sample_size": 0, "min_seq_len": 1}
    keys = max(2, round(share * n))
    return {"block_size": max(1, keys // 2), "sample_size": max(1, keys - keys // 2), "min_seq_len": 1}


HYPER = register(
    Mechanism(
        name="hyper",
        family="sparse",
        catalog=("S5",),
        paper="HyperAttention: Long-context Attention in Near-Linear Time (Han et al., ICLR 2024, arXiv 2310.05869), Alg. 1-4",
        formula="out_i = sum_j W_ij e^{s_ij} v_j / sum_j W_ij e^{s_ij}; W = 1 on the sortLSH block of i, Nk/m per uniform sample outside it; causal by recursive halving",
        cost="O(N (block_size + sample_size) D + N log N) non-causal; x log(N / min_seq_len) + O(N min_seq_len D) causal",
        summary="HyperAttention: angular-LSH sorted block diagonal plus a uniformly sampled residual (LSE-corrected), causal by recursive splitting",
        patterns=frozenset({"noncausal_self", "causal_self", "noncausal_cross"}),
        params=HYPER_PARAMS,
        exact=False,
        sample_params=_sample_params,
        check_params=_check_params,
        causal_block=lambda bound: WHOLE_SEQUENCE,  # the sort and the split read every row
        sparsity_params=_sparsity_params,
    )
)
HYPER.add_backend(Backend("reference", _reference, doc="the plan as a dense weight matrix W, one weighted softmax: the spec", priority=-100, materializes_scores=True))
HYPER.add_backend(Backend("blocked", _blocked, doc="sorted blocks batched, samples as one N x m product, exact leaves chunked, LSE merge; no N x N tensor", priority=10))


def hyper_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    lsh_num_projs: int = 7,
    block_size: int = 256,
    sample_size: int = 256,
    min_seq_len: int = 4096,
    seed: int = 0,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """HyperAttention (catalog S5): sortLSH block diagonal + uniformly sampled residual, LSE-merged.

    Queries and keys sorted by an angular-LSH bucket (Gray code of ``lsh_num_projs`` sign bits)
    attend exactly within their block of ``block_size`` keys; ``sample_size`` uniformly sampled
    keys outside the block estimate the rest (weight Nk / m). ``causal=True`` splits the causal
    matrix recursively into causal halves and an unmasked block, exact below ``min_seq_len``.
    An approximation: deterministic for a given ``seed``.

    Args:
        q: (B, H, Nq, D). k: (B, H, Nk, D). v: (B, H, Nk, Dv). causal needs Nq == Nk.
        lsh_num_projs, block_size, sample_size, min_seq_len: the paper's 7, 256, 256, 4096.
        seed: seeds the projections and the samples. key_padding_mask: refused (ParameterError).
        scale: defaults to ``D ** -0.5``. return_lse: also return the estimated LSE (B, H, Nq).

    Cost: O(N (block_size + sample_size) D) per level, near-linear. Paper: Han et al., ICLR 2024.

    Example::

        >>> q = k = v = torch.randn(1, 4, 8192, 64)
        >>> out = hyper_attention(q, k, v, causal=True)
    """
    return HYPER(
        q, k, v, backend=backend, lsh_num_projs=lsh_num_projs, block_size=block_size, sample_size=sample_size, min_seq_len=min_seq_len,
        seed=seed, causal=causal, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


HYPER.function = hyper_attention
HYPER.decoder_refusal = READS_AHEAD
