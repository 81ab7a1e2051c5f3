"""MoBA: Mixture of Block Attention (catalog S2; Lu et al., Moonshot AI, arXiv 2502.13189).

The keys are cut into blocks of ``block_size`` from position 0. Query i scores each block by the
parameter-free gate of Sec. 2.2 (Eq. 5-6): ``g_ib = q_i . mean(K_b)``; blocks after i's own are
excluded, i's own block is always selected (gate +inf: "the current block must be attended"),
and the ``top_k`` highest gates (own block included, as the paper's Eq. 6 and its code do) give
the blocks i attends. The own block is causal inside, the past blocks are attended whole:

    out_i = sum_{j in U_i, j <= i} softmax_j(scale q_i . k_j) v_j,   U_i = union of the selected blocks

Selection: gates in float64 in every backend, exactly ``top_k`` blocks per query (fewer when
fewer exist), ties to the lowest block index (:func:`._select.top_k_mask`). Key padding: a block's
mean is over its real keys (a block with none is never selected); only right padding is exact
(blocks are placed from position 0). Gradients flow through the attention, not the gate (the
paper's gate has no parameters and the selection is discrete).

Backends: ``reference`` (the gate block by block, stable-sort top-k, dense mask);
``gathered`` (each selected (query, block) pair once, grouped by block, on the C++ gathered-rows
kernel, partial softmaxes merged by LSE: work = the selected pairs, whatever their layout);
``grouped`` (the same in PyTorch, MoBA's ``moba_efficient``: own blocks batched, each past block
against the queries that chose it; any device and dtype);
``fused`` (the selection as a 64 x 64 block plan on the C++ kernel) and ``tiled`` (the PyTorch FA2
engine): these visit every tile some query of a 64-query tile chose, which per-query gates
spread wide (on random data at 10% density, most tiles), so ``gathered`` ranks first.
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import real_keys, refuse_unless_right_padded
from ._params import PADDING_PARAM, native_backend, positive_int, sample_options
from ._select import NEG_INF, merge_partials, attend_row_blocks, attend_selected, block_means, dense_selection, gate_top_k_mask, softmax_lse, sorted_top_k_mask
from .._prefix_decoder import PrefixDecoder

__all__ = ["moba_attention", "MOBA"]

_PADDING_WHY = "MoBA's blocks start at position 0, so pads before a sequence would move its blocks"


MOBA_PARAMS = (
    Param("block_size", None, "required: keys per block (the paper's chunk size; multiples of 64 run fastest)", positive_int("keys per block"), (None, 0, -64, 1.5, "64"), "int"),
    Param("top_k", None, "required: blocks each query attends, its own block included", positive_int("blocks per query"), (None, 0, -1, 2.0, "3"), "int"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


# --------------------------------------------------------------------------------------------
# the gate and the selection
# --------------------------------------------------------------------------------------------
def _own_block(nq: int, nk: int, block_size: int, device: torch.device) -> Tensor:
    """(Nq,) the block holding each query's position (bottom-right: query i sits at key i + Nk - Nq)."""
    return (torch.arange(nq, device=device) + nk - nq) // block_size


def _gate_bias(own: Tensor, has_keys: Tensor, n_blocks: int) -> Tensor:
    """(B, 1, Nq, n_blocks) float64: -inf on future and empty blocks, +inf on the own block (always
    selected), 0 elsewhere; added to the gates (finite or NaN, which stays NaN)."""
    blocks = torch.arange(n_blocks, device=own.device)
    bias = torch.zeros(own.shape[0], n_blocks, dtype=torch.float64, device=own.device)
    bias = bias.masked_fill(blocks > own[:, None], NEG_INF).masked_fill(blocks == own[:, None], float("inf"))
    return bias.masked_fill(~has_keys[:, :, None, :] & (blocks != own[:, None]), NEG_INF)


def moba_selection(q: Tensor, k: Tensor, block_size: int, top_k: int, key_padding_mask: Optional[Tensor]) -> Tensor:
    """(B, H, Nq, n_blocks) bool: the blocks each query attends (the fast paths' selection; the
    float64 gates' choice, computed in float32 where that cannot change it: :func:`._select.gate_top_k_mask`)."""
    group = q.shape[1] // k.shape[1]
    means, has_keys = block_means(k.detach(), block_size, key_padding_mask)
    own = _own_block(q.shape[2], k.shape[2], block_size, q.device)
    return gate_top_k_mask(q.detach(), means.repeat_interleave(group, dim=1), top_k, _gate_bias(own, has_keys, means.shape[2]))


def _reference_selection(q: Tensor, k: Tensor, block_size: int, top_k: int, key_padding_mask: Optional[Tensor]) -> Tensor:
    """The gate written block by block (Eq. 5), the top-k by a stable sort (Eq. 6)."""
    b, h, nq, _ = q.shape
    nk, group = k.shape[2], q.shape[1] // k.shape[1]
    n_blocks = math.ceil(nk / block_size)
    real = real_keys(key_padding_mask, b, nk, k.device)
    gates = torch.empty(b, h, nq, n_blocks, dtype=torch.float64, device=q.device)
    for blk in range(n_blocks):
        span = slice(blk * block_size, (blk + 1) * block_size)
        keys = k[:, :, span].double() * real[:, None, span, None]
        count = real[:, span].sum(-1).clamp(min=1).double()  # (B,)
        mean = keys.sum(2) / count[:, None, None]  # (B, Hkv, D)
        gates[..., blk] = torch.einsum("bhqd,bhd->bhq", q.double(), mean.repeat_interleave(group, dim=1))
    has_keys = torch.stack([real[:, blk * block_size : (blk + 1) * block_size].any(-1) for blk in range(n_blocks)], -1)[:, None]
    own = _own_block(nq, nk, block_size, q.device)
    return sorted_top_k_mask(gates + _gate_bias(own, has_keys, n_blocks), top_k)


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, block_size, top_k, key_padding_mask, scale, return_lse):
    """Gate, stable-sort selection and a dense masked softmax over materialized scores: the spec."""
    refuse_unless_right_padded("moba", key_padding_mask, _PADDING_WHY)
    selected = _reference_selection(q, k, block_size, top_k, key_padding_mask)
    allowed = dense_selection(selected, block_size, k.shape[2], k.shape[2] - q.shape[2])
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(q.shape[0], 1, 1, k.shape[2])
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=allowed)
    return (out, lse) if return_lse else out


def _engine(name: str):
    def run(q, k, v, *, block_size, top_k, key_padding_mask, scale, return_lse):
        refuse_unless_right_padded("moba", key_padding_mask, _PADDING_WHY)
        selected = moba_selection(q, k, block_size, top_k, key_padding_mask)
        out, lse = attend_selected(
            q, k, v, selected, block_size, causal_offset=k.shape[2] - q.shape[2], key_padding_mask=key_padding_mask, scale=scale, engine=name
        )
        return (out, lse) if return_lse else out

    run.__name__ = f"_moba_{name}"
    return run


def _moba_gathered(q, k, v, *, block_size, top_k, key_padding_mask, scale, return_lse):
    """Every selected (query, block) pair once on the C++ gathered-rows kernel, grouped by block,
    merged by LSE (MoBA's ``moba_efficient`` on CPU, fused)."""
    refuse_unless_right_padded("moba", key_padding_mask, _PADDING_WHY)
    selected = moba_selection(q, k, block_size, top_k, key_padding_mask)
    out, lse = attend_row_blocks(q, k, v, selected, block_size, causal_offset=k.shape[2] - q.shape[2], key_padding_mask=key_padding_mask, scale=scale)
    return (out, lse) if return_lse else out


def _moba_grouped(q, k, v, *, block_size, top_k, key_padding_mask, scale, return_lse):
    """MoBA's own efficient form (its ``moba_efficient``) in PyTorch: the own blocks as one batched causal
    softmax; every past block against the queries that selected it (grouped by block, one GEMM
    each); the partial results merged by their log-sum-exps. Work is proportional to the
    selected (query, block) pairs whatever their layout; per-query gates scatter a 64-query
    tile's picks over many blocks, which is what the block-plan engines pay for."""
    refuse_unless_right_padded("moba", key_padding_mask, _PADDING_WHY)
    selected = moba_selection(q, k, block_size, top_k, key_padding_mask)
    b, h, n, _ = q.shape
    sc = default_scale(q, scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_blocks = selected.shape[-1]
    kb, vb, key_ok = _as_blocks(k.to(cdt), v.to(cdt), key_padding_mask, block_size, n_blocks)
    group = h // k.shape[1]
    out_own, lse_own = _own_blocks(q.to(cdt), kb, vb, key_ok, group, sc)  # (B, H, N, Dv), (B, H, N)
    own = _own_block(n, n, block_size, q.device)
    past = selected & (torch.arange(n_blocks, device=q.device) != own[:, None])
    e = past.nonzero()  # (E, 4): (b, h, i, block)
    group_key = (e[:, 0] * h + e[:, 1]) * n_blocks + e[:, 3]
    order = torch.sort(group_key, stable=True).indices
    e, group_key = e[order], group_key[order]
    counts = torch.bincount(group_key, minlength=b * h * n_blocks).tolist()
    q_e = q.to(cdt)[e[:, 0], e[:, 1], e[:, 2]] * sc  # (E, D), scaled once
    padded_blocks = {tuple(x) for x in (~key_ok.all(-1)).nonzero().tolist()} if key_padding_mask is not None or n % block_size else set()
    outs, lses, start = [], [], 0
    for gid, count in enumerate(counts):
        if count == 0:
            continue
        bi, rest = divmod(gid, h * n_blocks)
        hi, blk = divmod(rest, n_blocks)
        scores = q_e[start : start + count] @ kb[bi, hi // group, blk].T
        if (bi, blk) in padded_blocks:
            scores = scores.masked_fill(~key_ok[bi, blk], NEG_INF)
        p, lse = softmax_lse(scores)
        outs.append(p @ vb[bi, hi // group, blk])
        lses.append(lse)
        start += count
    # the own-block result of every row is one more partial softmax to merge
    rows = torch.cat([torch.arange(b * h * n, device=q.device), (e[:, 0] * h + e[:, 1]) * n + e[:, 2]])
    out, lse = merge_partials(torch.cat([out_own.flatten(0, 2), *outs]), torch.cat([lse_own.flatten(), *lses]), rows, b * h * n)
    out, lse = out.view(b, h, n, -1).to(q.dtype), lse.view(b, h, n)
    return (out, lse) if return_lse else out


def _as_blocks(k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], block_size: int, n_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Hkv, n_blocks, block, D) keys and values, and (B, n_blocks, block) "a real key"."""
    b, hkv, n, _ = k.shape
    pad = n_blocks * block_size - n
    real = real_keys(key_padding_mask, b, n, k.device)
    key_ok = torch.nn.functional.pad(real, (0, pad)).view(b, n_blocks, block_size)
    if pad:  # (no copy when the blocks tile the sequence)
        k, v = torch.nn.functional.pad(k, (0, 0, 0, pad)), torch.nn.functional.pad(v, (0, 0, 0, pad))
    return k.reshape(b, hkv, n_blocks, block_size, -1), v.reshape(b, hkv, n_blocks, block_size, -1), key_ok


def _own_blocks(q: Tensor, kb: Tensor, vb: Tensor, key_ok: Tensor, group: int, scale: float) -> tuple[Tensor, Tensor]:
    """Each query against the keys of its own block up to itself: (out, lse) per query."""
    b, h, n, d = q.shape
    n_blocks, block = kb.shape[2], kb.shape[3]
    q = q * scale
    if n_blocks * block > n:
        q = torch.nn.functional.pad(q, (0, 0, 0, n_blocks * block - n))
    qb = q.reshape(b, h, n_blocks, block, d)
    kh, vh = (kb, vb) if group == 1 else (kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1))
    scores = qb @ kh.transpose(-1, -2)  # (B, H, nb, block, block)
    causal = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    p, lse = softmax_lse(scores.masked_fill(~(causal & key_ok[:, None, :, None, :]), NEG_INF))
    out = p @ vh
    return out.flatten(2, 3)[:, :, :n], lse.flatten(2, 3)[:, :, :n]


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {"block_size": 64 if p.kv_len >= 256 else max(1, p.kv_len // 4), "top_k": 3}
    params: dict[str, Any] = {"block_size": rng.randint(1, max(1, p.kv_len)), "top_k": rng.randint(1, 5)}
    return sample_options(params, p, rng, right_only=True)


MOBA = register(
    Mechanism(
        name="moba",
        family="sparse",
        catalog=("S2",),
        paper="MoBA: Mixture of Block Attention for Long-Context LLMs (Lu et al., 2025), Sec. 2.2-2.3, Eq. 5-6",
        formula="out_i = sum_{j in U_i, j <= i} softmax(scale q_i.k_j) v_j, U_i = own block + top-(k-1) past blocks by q_i . mean(K_b)",
        cost="O(Nq * Nk / block * D) gate, O(Nq * top_k * block * D) attention (fused); O(N) memory",
        summary="MoBA block routing: each query attends its own block (causal) and its top-k past blocks by a mean-key gate",
        patterns=frozenset({"causal_self"}),
        params=MOBA_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        sparsity_params=lambda p, share: {"block_size": max(1, -(-p.kv_len // 16)), "top_k": max(1, round(share * 16))},  # 16 blocks
    )
)
MOBA.add_backend(Backend("reference", _reference, doc="block-by-block gate, stable-sort top-k, dense masked softmax: the spec", priority=-100, materializes_scores=True))
MOBA.add_backend(
    native_backend("fused", _engine("fused"), "the selection as a 64x64 block plan on the C++ block-sparse kernel (forward, backward, LSE)")
)
MOBA.add_backend(
    native_backend("gathered", _moba_gathered, "each selected (query, block) pair once on the C++ gathered-rows kernel, merged by LSE", priority=40)
)
MOBA.add_backend(
    Backend("grouped", _moba_grouped, doc="MoBA's varlen form in PyTorch: own blocks batched, past blocks against the queries that chose them, LSE merge", priority=30)
)
MOBA.add_backend(Backend("tiled", _engine("tiled"), doc="the PyTorch FA2 engine over the selected blocks", priority=20, traceable=False))


def moba_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int,
    top_k: int,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """MoBA (catalog S2): causal attention over each query's own block and its top-k past blocks.

    Gate ``g_ib = q_i . mean(K_b)`` over blocks of ``block_size`` keys; the own block is always
    kept (causal inside), future blocks never; the ``top_k`` best (own included) are attended.

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        block_size: keys per block (the paper uses 512-4096; multiples of 64 plan in O(blocks)).
        top_k: blocks per query, own block included.
        key_padding_mask: (B, N) bool, True = pad; right padding only (ParameterError otherwise).
        scale: defaults to ``D ** -0.5``. return_lse: also return the LSE (B, Hq, N).

    Cost: O(N^2 / block_size * D) for the gate, O(N * top_k * block_size * D) for the attention.
    Paper: Lu et al., "MoBA" (2025), Eq. 5-6.

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = moba_attention(q, k, v, block_size=512, top_k=3)
    """
    return MOBA(q, k, v, backend=backend, block_size=block_size, top_k=top_k, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


MOBA.function = moba_attention
MOBA.decoder = PrefixDecoder("moba", "all")
