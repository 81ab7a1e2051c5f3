"""PSA: Pyramid Sparse Attention (catalog S2; arXiv 2512.04025; public code
ziplab/Pyramid-Sparse-Attention ``src/psa_triton/attention.py``, ``utils/transfer_attn_to_mask.py``,
``kernels/psa_kernel.py``).

Instead of keeping or dropping a (query block, key block) pair, PSA gives it a *pyramid level*:
1 = the block's keys at full resolution, 2/4/8 = its keys AND values mean-pooled over groups of
2/4/8 consecutive tokens (``K^(l)_g = mean_{j in g} k_j``, ``V^(l)_g = mean_{j in g} v_j``), 0 = skipped.
One softmax runs over everything a query block attends; a pooled key's score gets ``+ log |g|``
(the official kernel's ``pooling_bias = log(pooling_level)``), so a pooled key stands for the
|g| tokens it replaces: when the tokens of a group share one key, the pooled form is exact.

    out_i = sum_{(J, l) levels of I(i)} sum_{g in groups_l(J)} exp(s_ig) V^(l)_g / Z_i,
    s_ig = scale q_i . K^(l)_g + log |g|

Importance (``_compute_attention_pooling``): from each query block ``block_q // 4`` tokens and
from each key block ``block_k // 4`` tokens are sampled (the same in-block offsets for every block
of a head, drawn from ``seed``: deterministic); the sampled queries' softmax over all sampled
keys, summed over each key block's samples and averaged over each query block's, is the block
importance (float64 in every backend). Short last blocks are filled by repeating the last token
(the code's ``_pad_to_multiple(..., mode='replicate')``).

Levels (``transfer_attn_to_mask``, mode ``'topk'``, the default): the key blocks of each query
block are ranked by decreasing importance (ties: lower index first); with ``n`` key blocks, the
levels of ``mask_ratios`` are taken in the order given and level l gets the ranks
``[previous end, int(n * end_l))``; ranks left over are skipped (0). Default ratios
``{1: (0, .10), 2: (.10, .15), 4: (.15, .15), 8: (.15, .35), 0: (.35, 1)}``: 10 % full, 5 % x2,
20 % x8, 65 % skipped. attnzoo's choices: the kernel's alignment of each quota to a multiple of
``ceil(l / (block_k / tile_n))`` blocks (a Triton tile detail) is not applied; when the quotas
round to no kept block (few key blocks), the top-ranked block gets the first level listed with
a positive share (the code's kernel would divide by zero there). ``mask_ratios={1: (0, 1)}`` is
softmax attention. A group that would cross a block boundary or the last key is cut there (its
|g| counts its real tokens).

Non-causal (the paper's setting, video DiTs); Nq may differ from Nk. Key padding is refused (the
sampled offsets and the pooled groups sit at fixed positions). Gradients flow through the
attention (pooled keys and values included), not through the estimate.

Backends: ``reference`` (every level's pooled keys of the whole sequence side by side, a dense
mask of which (query, pooled key) pairs are attended, one softmax); ``gathered`` (per query block,
the blocks of each level gathered from the pooled tensors, one softmax over the concatenation:
work and memory proportional to the attended (pooled) keys, chunked over query blocks).
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import refuse_padding
from ._params import PADDING_PARAM, int_at_least, positive_int, sample_options
from ._select import NEG_INF, softmax_lse

__all__ = ["pyramid_sparse_attention", "PYRAMID_SPARSE", "DEFAULT_MASK_RATIOS"]

#: ``PSAConfig.mask_ratios``: level -> (start, end) share of the ranked key blocks.
DEFAULT_MASK_RATIOS: dict[int, tuple[float, float]] = {1: (0.0, 0.10), 2: (0.10, 0.15), 4: (0.15, 0.15), 8: (0.15, 0.35), 0: (0.35, 1.0)}
LEVELS = (1, 2, 4, 8)
_PADDING_WHY = "the importance samples fixed in-block offsets and the pooled groups sit at fixed positions, which padded keys would shift or dilute"


def _check_ratios(value: Any, p: Problem) -> Optional[str]:
    expected = "None or a dict {level: (start, end)} with levels in 0, 1, 2, 4, 8, 0 <= start <= end <= 1 and some level > 0 of positive share"
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        return expected
    positive = False
    for level, span in value.items():
        if isinstance(level, bool) or level not in (0, 1, 2, 4, 8):
            return expected
        if not isinstance(span, (tuple, list)) or len(span) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in span):
            return expected
        a, b = float(span[0]), float(span[1])
        if not 0.0 <= a <= b <= 1.0:
            return expected
        positive = positive or (level != 0 and b > a)
    return None if positive else expected


PSA_PARAMS = (
    Param("block_q", 128, "queries per block (the paper's block_m 128)", positive_int("queries per block"), (0, -128, 1.5, "128"), "int"),
    Param("block_k", 64, "keys per block (the paper's block_n 64)", positive_int("keys per block"), (0, -64, 1.5, "64"), "int"),
    Param("mask_ratios", None, "{level: (start, end)} shares of the ranked key blocks per level; None = PSA's default", _check_ratios,
          ("x", {3: (0.0, 1.0)}, {1: (0.5, 0.2)}, {1: (0.0, 1.5)}, {0: (0.0, 1.0)}), "dict | None"),
    Param("seed", 0, "seed of the sampled in-block offsets of the importance estimate", int_at_least(0, "a random seed"), (-1, 1.5, "0"), "int"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


# --------------------------------------------------------------------------------------------
# importance and levels
# --------------------------------------------------------------------------------------------
def _replicate_pad(x: Tensor, multiple: int) -> Tensor:
    n = x.shape[2]
    extra = -n % multiple
    return x if extra == 0 else torch.cat([x, x[:, :, -1:].expand(-1, -1, extra, -1)], dim=2)


def _sample_offsets(heads: int, block: int, count: int, gen: torch.Generator) -> Tensor:
    """(H, count): distinct in-block offsets per head (``topk`` of uniform draws, as the code)."""
    return torch.rand(heads, block, generator=gen).topk(count, dim=-1).indices


def psa_importance(q: Tensor, k: Tensor, *, block_q: int, block_k: int, seed: int, scale: float) -> Tensor:
    """(B, H, nqb, nkb) float64: sampled-token block importance (k already has H heads)."""
    b, h, _, d = q.shape
    gen = torch.Generator().manual_seed(seed)
    nsq, nsk = max(1, block_q // 4), max(1, block_k // 4)
    q_off = _sample_offsets(h, block_q, nsq, gen).to(q.device)
    k_off = _sample_offsets(h, block_k, nsk, gen).to(q.device)
    qp = _replicate_pad(q.detach().double(), block_q)
    kp = _replicate_pad(k.detach().double(), block_k)
    nqb, nkb = qp.shape[2] // block_q, kp.shape[2] // block_k
    sq = qp.view(b, h, nqb, block_q, d).gather(3, q_off[None, :, None, :, None].expand(b, h, nqb, nsq, d))
    sk = kp.view(b, h, nkb, block_k, d).gather(3, k_off[None, :, None, :, None].expand(b, h, nkb, nsk, d))
    probs = torch.softmax(sq.reshape(b, h, nqb * nsq, d) @ sk.reshape(b, h, nkb * nsk, d).transpose(-1, -2) * scale, dim=-1)
    return probs.view(b, h, nqb, nsq, nkb, nsk).sum(5).mean(3)


def _level_of_rank(n: int, ratios: dict[int, tuple[float, float]]) -> list[int]:
    """The level of each rank 0..n-1 (the ``'topk'`` rule, quotas without kernel alignment)."""
    levels, last = [0] * n, 0
    for level, (_, end) in ratios.items():
        stop = min(n, int(n * end))
        if last < stop:
            levels[last:stop] = [level] * (stop - last)
            last = stop
    if n and levels[0] == 0:  # nothing kept: the top block gets the first level of positive share
        levels[0] = next(level for level, (a, b) in ratios.items() if level != 0 and b > a)
    return levels


def psa_levels(importance: Tensor, ratios: dict[int, tuple[float, float]]) -> Tensor:
    """(B, H, nqb, nkb) int64 levels from the importance: stable descending rank -> level."""
    n = importance.shape[-1]
    by_rank = torch.tensor(_level_of_rank(n, ratios), dtype=torch.int64, device=importance.device)
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, by_rank.expand_as(order))


def _levels(q, kh, block_q, block_k, mask_ratios, seed, scale) -> Tensor:
    imp = psa_importance(q, kh, block_q=block_q, block_k=block_k, seed=seed, scale=scale)
    return psa_levels(imp, DEFAULT_MASK_RATIOS if mask_ratios is None else mask_ratios)


# --------------------------------------------------------------------------------------------
# the pyramid: pooled keys and values of every block
# --------------------------------------------------------------------------------------------
def pooled_blocks(x: Tensor, block: int, level: int) -> tuple[Tensor, Tensor]:
    """``x`` (B, H, N, D) as (B, H, nb, groups, D) means of ``level`` consecutive tokens inside each
    block of ``block`` tokens, and (nb, groups) float token counts (0: a group past the end)."""
    b, h, n, d = x.shape
    nb, groups = math.ceil(n / block), math.ceil(block / level)
    pos = torch.arange(nb * groups * level, device=x.device).view(nb, groups, level)
    offset = pos % (groups * level)
    real = (offset < block) & (pos.div(groups * level, rounding_mode="floor") * block + offset < n)
    count = real.sum(-1).to(x.dtype)
    if block % level == 0:  # groups tile the blocks: a zero-padded view, no gather
        padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n))
        sums = padded.view(b, h, nb, groups, level, d).sum(4) if level > 1 else padded.view(b, h, nb, groups, d)
    else:
        token = pos.div(groups * level, rounding_mode="floor") * block + offset
        gathered = x[:, :, token.clamp(max=n - 1).flatten()].view(b, h, nb, groups, level, d) * real[..., None].to(x.dtype)
        sums = gathered.sum(4)
    return sums if level == 1 else sums / count.clamp(min=1)[..., None], count


def _prepare(q, k, v):
    group = q.shape[1] // k.shape[1]
    kh, vh = (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
    return kh, vh


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, block_q, block_k, mask_ratios, seed, key_padding_mask, scale, return_lse):
    """Every level's pooled keys side by side, a dense (query, pooled key) mask, one softmax: the spec."""
    refuse_padding("pyramid_sparse", key_padding_mask, _PADDING_WHY)
    kh, vh = _prepare(q, k, v)
    sc = default_scale(q, scale)
    level = _levels(q, kh, block_q, block_k, mask_ratios, seed, sc)  # (B, H, nqb, nkb)
    nq = q.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32  # pooled in the compute dtype
    keys, values, biases, allowed = [], [], [], []
    for lv in LEVELS:
        kl, count = pooled_blocks(kh.to(cdt), block_k, lv)
        vl, _ = pooled_blocks(vh.to(cdt), block_k, lv)
        nb, groups = count.shape
        keys.append(kl.flatten(2, 3))
        values.append(vl.flatten(2, 3))
        biases.append(torch.log(count.clamp(min=1)).flatten())
        rows = (level == lv).repeat_interleave(block_q, dim=2)[:, :, :nq]  # (B, H, Nq, nkb)
        allowed.append(rows.repeat_interleave(groups, dim=3) & (count > 0).flatten())
    bias = torch.cat(biases).to(cdt)
    out, lse = materialized_attention(q, torch.cat(keys, 2), torch.cat(values, 2), scale=scale, allowed=torch.cat(allowed, 3), bias=bias)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


#: query blocks per chunk of the gathered backend (bounds its temporaries)
CHUNK_QUERIES = 4096


def _gathered(q, k, v, *, block_q, block_k, mask_ratios, seed, key_padding_mask, scale, return_lse):
    """Per query block, the key blocks of each level gathered from that level's pooled tensors, one
    softmax over their concatenation (scores + log |g|): work = the attended pooled keys."""
    refuse_padding("pyramid_sparse", key_padding_mask, _PADDING_WHY)
    kh, vh = _prepare(q, k, v)
    sc = default_scale(q, scale)
    level = _levels(q, kh, block_q, block_k, mask_ratios, seed, sc)
    b, h, nq, d = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb = level.shape[2]
    qb = torch.nn.functional.pad(q.to(cdt), (0, 0, 0, nqb * block_q - nq)).view(b, h, nqb, block_q, d) * sc
    pyramid = []
    for lv in LEVELS:
        if not bool((level == lv).any()):
            continue
        kl, count = pooled_blocks(kh.to(cdt), block_k, lv)
        vl, _ = pooled_blocks(vh.to(cdt), block_k, lv)
        chosen = level == lv
        width = int(chosen.sum(-1).max())
        # the chosen blocks of each row first (in block order), padded with unchosen ones
        idx = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices[..., :width]  # (B, H, nqb, width)
        valid = chosen.gather(-1, idx)
        log_count = torch.log(count.clamp(min=1)).masked_fill(count == 0, NEG_INF)  # (nb, groups)
        pyramid.append((lv, kl, vl, log_count, idx, valid))
    step = max(1, CHUNK_QUERIES // block_q)
    outs, lses = [], []
    for start in range(0, nqb, step):
        part = slice(start, min(nqb, start + step))
        scores, vals = [], []
        for _level, kl, vl, log_count, idx, valid in pyramid:
            ix = idx[:, :, part]
            c, w, groups = ix.shape[2], ix.shape[3], kl.shape[3]
            flat = ix.reshape(b, h, c * w)
            kg = kl.gather(2, flat[..., None, None].expand(-1, -1, -1, groups, d)).view(b, h, c, w * groups, d)
            vg = vl.gather(2, flat[..., None, None].expand(-1, -1, -1, groups, vl.shape[-1])).view(b, h, c, w * groups, vl.shape[-1])
            bias = log_count[ix].masked_fill(~valid[:, :, part, :, None], NEG_INF)  # (B, H, c, w, groups)
            scores.append(qb[:, :, part] @ kg.transpose(-1, -2) + bias.reshape(b, h, c, 1, w * groups))
            vals.append(vg)
        p, lse = softmax_lse(torch.cat(scores, -1))
        outs.append(p @ torch.cat(vals, 3))
        lses.append(lse)
    out = torch.cat(outs, 2).flatten(2, 3)[:, :, :nq].to(q.dtype)
    lse = torch.cat(lses, 2).flatten(2, 3)[:, :, :nq]
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
_SAMPLE_RATIOS = (
    None,
    {1: (0.0, 1.0)},
    {1: (0.0, 0.3), 2: (0.3, 0.5), 4: (0.5, 0.7), 0: (0.7, 1.0)},
    {2: (0.0, 0.5), 8: (0.5, 1.0)},
    {1: (0.0, 0.2), 4: (0.2, 0.6)},
)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {} if p.kv_len >= 1024 else {"block_q": 16, "block_k": 16}
    params: dict[str, Any] = {"block_q": rng.randint(1, 9), "block_k": rng.randint(1, 17), "mask_ratios": rng.choice(_SAMPLE_RATIOS), "seed": rng.randrange(1000)}
    return sample_options(params, p, rng, padded=False)


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    """The default pyramid scaled so that the attended key equivalents (a level-l block counts
    1/l) are about ``share`` of the keys: the default attends 0.10 + 0.05/2 + 0.20/8 = 0.15;
    ``share = 1`` is all level 1 (softmax). Blocks of 128 x 64 from N = 1024, else 16 x 16."""
    blocks = {} if p.kv_len >= 1024 else {"block_q": 16, "block_k": 16}
    if share >= 1.0:
        return {**blocks, "mask_ratios": {1: (0.0, 1.0)}}
    f = share / 0.15
    if 0.35 * f > 1.0:  # the scaled pyramid would pass every block: full blocks + the rest at x8
        full = (8 * share - 1) / 7  # full + (1 - full) / 8 = share
        return {**blocks, "mask_ratios": {1: (0.0, full), 8: (full, 1.0)}}
    return {**blocks, "mask_ratios": {1: (0.0, 0.10 * f), 2: (0.10 * f, 0.15 * f), 8: (0.15 * f, 0.35 * f), 0: (0.35 * f, 1.0)}}


PYRAMID_SPARSE = register(
    Mechanism(
        name="pyramid_sparse",
        family="sparse",
        catalog=("S2",),
        paper="PSA: Pyramid Sparse Attention (arXiv 2512.04025), pyramid levels + official kernel's log-pool bias",
        formula="out_i = softmax over (J, l) of I(i)'s levels, groups g: scale q_i . mean_g(K_J) + log|g|, values mean_g(V_J); level by importance rank",
        cost="O(N^2 D / 16) sampled estimate; O(Nq * attended pooled keys * D) attention (gathered); no Nq x Nk tensor",
        summary="PSA: each (query block, key block) pair attended at full, 2x/4x/8x mean-pooled K/V (score + log pool) or skipped, by sampled importance rank",
        patterns=frozenset({"noncausal_self", "noncausal_cross"}),
        params=PSA_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        sparsity_params=_sparsity_params,
    )
)
PYRAMID_SPARSE.add_backend(
    Backend("reference", _reference, doc="all levels' pooled keys side by side, dense (query, pooled key) mask, one softmax: the spec", priority=-100, materializes_scores=True)
)
PYRAMID_SPARSE.add_backend(Backend("gathered", _gathered, doc="per query block, each level's blocks gathered from the pooled pyramid, one softmax", priority=20))


def pyramid_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    mask_ratios: Optional[dict[int, tuple[float, float]]] = None,
    seed: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """PSA (catalog S2): multi-level block-sparse attention with mean-pooled K/V per block pair.

    Each (query block, key block) pair gets level 1 (full keys), 2/4/8 (keys and values
    mean-pooled over that many consecutive tokens; a pooled key's score gets ``+ log |g|``) or 0
    (skipped), by the rank of the pair's sampled importance in its query block's row and the
    shares of ``mask_ratios``. ``mask_ratios={1: (0, 1)}`` is softmax attention.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        block_q: queries per block (paper: 128). block_k: keys per block (paper: 64).
        mask_ratios: {level: (start, end)} (default: 10 % full, 5 % x2, 20 % x8, 65 % skipped).
        seed: seed of the importance's sampled in-block offsets (deterministic).
        key_padding_mask: refused when it pads anything.
        scale: defaults to ``D ** -0.5``. return_lse: also the LSE (B, Hq, Nq).

    Cost: O(N^2 D / 16) estimate; attention over the attended pooled keys only.
    Paper: "PSA: Pyramid Sparse Attention" (arXiv 2512.04025); pooled-key bias as the official
    kernel (``psa_kernel.py``: ``qk += log(pooling_level)``).

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = pyramid_sparse_attention(q, k, v)
    """
    return PYRAMID_SPARSE(
        q, k, v, backend=backend, block_q=block_q, block_k=block_k, mask_ratios=mask_ratios, seed=seed,
        key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


PYRAMID_SPARSE.function = pyramid_sparse_attention
