"""Permuted block-sparse attention (catalog S2): reorder tokens so that the attention pattern
gathers into few blocks, then attend block-sparsely: PBS-Attn (1D, causal) and PAROAttention
(visual grids, non-causal).

**PBS-Attn** (``pbs``; Wang et al., "Sparser Block-Sparse Attention via Token Permutation",
arXiv 2510.21270, Sec. 3; public code xinghaow99/pbs-attn ``src/permute_states.py``,
``src/utils.py``, ``src/pbs.py``). Causal prefill, Nq = Nk = N.

1. *Permutation* (the code's ``last_block_attn_sorting``): the keys are cut into segments of
   ``segment_size`` tokens from position 0. With ``Q_last`` the last ``block_size`` queries of the
   sequence, every key j of a complete segment gets the score
   ``s_j = mean_{q in Q_last} softmax_j(scale q . K_complete)`` (the softmax runs over all keys of
   the complete segments, unmasked, as the code does); inside each complete segment the keys are
   sorted by decreasing ``s_j`` (ties: lower index first), the values move with them. A trailing
   incomplete segment stays in order; a sequence of one complete segment is not permuted.
   Queries are never permuted, so a permuted key block of an earlier segment holds only keys
   before every query of a later segment: causality across segments holds.
2. *Block selection* (``permuted_block_selection`` + ``select_blocks``): query blocks and permuted
   key blocks of ``block_size``; for query block I the candidate key blocks are J <= I outside
   I's own segment; ``p_IJ = softmax_J(scale mean(Q_I) . mean(K~_J))`` over the candidates, and
   the fewest blocks by decreasing ``p_IJ`` whose mass reaches ``threshold`` are kept
   (:func:`._select.mass_mask`); ``threshold = 1`` keeps every candidate (the code's special
   case). The permuted block holding token 0 is always kept.
3. *Attention*: query i attends the kept permuted blocks whole plus its own segment densely and
   causally (keys j of i's segment with j <= i, in original order): exact softmax over that union,
   output in original order. At ``threshold = 1`` this is dense causal attention.

The selection reads the last queries, so no prefix of the output is independent of later tokens
(``Mechanism.causal_block`` is the whole sequence), as MInference's. The estimate (sort scores
and block scores) runs in float64 in every backend, so all backends select the same blocks.
Key padding is refused: the sort reads the last ``block_size`` queries of the padded length.
Paper choices: the attention's ``scale`` is used in the estimates (the code uses ``1/sqrt(D)``,
equal by default); a short last block is pooled over its real tokens (the code pools zero
padding with them); GQA repeats the KV heads, so each query head gets its own permutation (the
code asserts Hq = Hkv; Hugging Face's ``repeat_kv`` precedes it).

Backends: ``reference`` (the permutation as index sets, a dense mask over the original key
order); ``fused`` (permuted K/V, the kept off-segment blocks on the C++ block-sparse kernel plus
the diagonal segments as a causal block-diagonal plan, merged by their log-sum-exps: O(N) memory);
``tiled`` (the same two passes on the PyTorch FA2 engine, any device and dtype).

**PAROAttention** (``paro``; Zhao et al., "PAROAttention: Pattern-Aware ReOrdering for Efficient
Sparse and Quantized Attention in Visual Generation Models", arXiv 2506.16054, Sec. 4; hardware
code jamescsq47/PAROAtten ``permute_qk`` / ``permute_attn_out``). Non-causal self-attention on a
token grid (B, H, F, Hs, W, D) or (B, H, Hs, W, D). Each head reads the grid in one of the orders
of its axes (6 for (F, H, W), 2 for (H, W)): ``perm = arange(N).view(grid).permute(order).flatten()``;
queries, keys and values are permuted alike, cut into blocks of ``block_size``, attended exactly
over the kept (query block, key block) pairs of a block mask, and put back in grid order:

    out_i = sum_{j : M[pos(i) // b, pos(j) // b]} softmax_j(scale q_i . k_j) v_j,   pos = perm^-1

The paper calibrates the orders and masks offline per head (and timestep) on a few prompts and
uses them statically. Here they are parameters (``orders``, ``block_mask``; :func:`paro_calibrate`
makes them from sample inputs), or, when not given, calibrated from the call's own input by
this documented rule (the paper's block-sum mask and its sparsity criterion for the order): for
each head and candidate order, the post-softmax attention mass of every block pair is summed;
each query block keeps the fewest key blocks whose mass reaches ``threshold``
(:func:`._select.mass_mask`); the order keeping the fewest blocks wins (ties: the first of
``itertools.permutations``, identity first). Calibrating at call time costs a full softmax pass
(chunked: O(N) memory), so the speed-up needs given orders and masks, as in the paper.
INT8/INT4 quantization of the paper's kernel is not part of this (attention in full precision).
Key padding is refused (a padded grid has no permuted form). Backends: ``reference`` (the
calibration on the materialized attention, the mask as a dense (N, N) mask in grid order);
``fused`` (chunked calibration, permuted q/k/v on the C++ block-sparse kernel's block plan);
``tiled`` (the same on the PyTorch FA2 engine).
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import refuse_padding
from ._params import PADDING_PARAM, WHOLE_SEQUENCE, multiple_of, native_backend, positive_int, sample_options, unit_interval
from ._select import attend_blocks, block_means, masked_softmax, mass_mask, merge_partials, sorted_mass_mask
from .._prefix_decoder import READS_AHEAD

__all__ = ["pbs_attention", "PBS", "paro_attention", "paro_calibrate", "PARO"]


# ============================================================================================
# PBS-Attn
# ============================================================================================
_PBS_PADDING_WHY = "the key permutation is sorted by the attention of the last block_size queries of the padded length, which pads would change"


_pbs_check = multiple_of("segment_size", "block_size")


PBS_PARAMS = (
    Param("block_size", 128, "query and key block size (the paper's 128)", positive_int("tokens per block"), (0, -128, 1.5, "128"), "int"),
    Param("segment_size", 256, "tokens per permutation segment, a multiple of block_size (the paper's 256)", positive_int("tokens per segment"), (0, -256, 2.5, "256"), "int"),
    Param("threshold", 0.9, "share of each query block's estimated off-segment mass its kept blocks cover", unit_interval("the share of estimated attention mass kept"), (0.0, 1.5, -0.1, "0.9"), "float"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, N)"),
)


def _repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    group = q.shape[1] // k.shape[1]
    return (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


def pbs_permutation(q: Tensor, k: Tensor, *, block_size: int, segment_size: int, scale: float) -> Tensor:
    """(B, H, N) int64: the original index of the key at each permuted position (k has H heads)."""
    b, h, n, _ = k.shape
    full = n // segment_size
    ident = torch.arange(n, device=k.device).expand(b, h, n)
    if full == 0 or (full == 1 and n == segment_size):
        return ident.clone()
    m = full * segment_size
    last = q.detach()[:, :, -block_size:].double()
    probs = torch.softmax(last @ k.detach()[:, :, :m].double().transpose(-1, -2) * scale, dim=-1)
    score = probs.mean(2).view(b, h, full, segment_size)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    order = (order + torch.arange(full, device=k.device).view(1, 1, full, 1) * segment_size).reshape(b, h, m)
    return torch.cat([order, ident[:, :, m:]], dim=2)


def _pbs_candidates(n_blocks: int, per_segment: int, device: torch.device) -> Tensor:
    """(nb, nb) bool: key block J <= query block I and outside I's segment."""
    i = torch.arange(n_blocks, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] // per_segment != i[:, None] // per_segment)


def pbs_selection(q: Tensor, kp: Tensor, perm: Tensor, *, block_size: int, segment_size: int, threshold: float, scale: float, sorted_rule: bool = False) -> Tensor:
    """(B, H, nb, nb) bool: the permuted key blocks each query block keeps (its own segment apart)."""
    n = q.shape[2]
    nb = math.ceil(n / block_size)
    cand = _pbs_candidates(nb, segment_size // block_size, q.device)
    if threshold >= 1.0:
        keep = cand.expand(q.shape[0], q.shape[1], nb, nb).clone()
    else:
        qm, _ = block_means(q.detach(), block_size)
        km, _ = block_means(kp.detach(), block_size)
        probs = masked_softmax(qm @ km.transpose(-1, -2) * scale, cand.expand(q.shape[0], q.shape[1], nb, nb))
        keep = (sorted_mass_mask if sorted_rule else mass_mask)(probs, threshold)
    first = (perm == 0).nonzero()  # (B * H, 3): where token 0 sits after the permutation
    first_block = torch.zeros(q.shape[0], q.shape[1], nb, dtype=torch.bool, device=q.device)
    first_block[first[:, 0], first[:, 1], first[:, 2] // block_size] = True
    return (keep | first_block[:, :, None, :]) & cand


def _pbs_reference(q, k, v, *, block_size, segment_size, threshold, key_padding_mask, scale, return_lse):
    """The permutation as index sets and a dense mask over the original key order: the spec."""
    refuse_padding("pbs", key_padding_mask, _PBS_PADDING_WHY)
    sc = default_scale(q, scale)
    kh, vh = _repeat_kv(q, k, v)
    b, h, n, _ = q.shape
    perm = pbs_permutation(q, kh, block_size=block_size, segment_size=segment_size, scale=sc)
    kp = kh.gather(2, perm[..., None].expand(-1, -1, -1, kh.shape[-1]))
    keep = pbs_selection(q, kp, perm, block_size=block_size, segment_size=segment_size, threshold=threshold, scale=sc, sorted_rule=True)
    allowed = torch.zeros(b, h, n, n, dtype=torch.bool, device=q.device)
    i = torch.arange(n, device=q.device)
    allowed |= ((i[None, :] <= i[:, None]) & (i[None, :] // segment_size == i[:, None] // segment_size))[None, None]
    for bi in range(b):
        for hi in range(h):
            for qb, kb in keep[bi, hi].nonzero().tolist():
                keys = perm[bi, hi, kb * block_size : (kb + 1) * block_size]
                allowed[bi, hi, qb * block_size : (qb + 1) * block_size, keys] = True
    out, lse = materialized_attention(q, kh, vh, scale=scale, allowed=allowed)
    return (out, lse) if return_lse else out


def _pbs_engine(engine: str):
    def run(q, k, v, *, block_size, segment_size, threshold, key_padding_mask, scale, return_lse):
        refuse_padding("pbs", key_padding_mask, _PBS_PADDING_WHY)
        sc = default_scale(q, scale)
        kh, vh = _repeat_kv(q, k, v)
        b, h, n, _ = q.shape
        perm = pbs_permutation(q, kh, block_size=block_size, segment_size=segment_size, scale=sc)
        kp = kh.gather(2, perm[..., None].expand(-1, -1, -1, kh.shape[-1]))
        vp = vh.gather(2, perm[..., None].expand(-1, -1, -1, vh.shape[-1]))
        keep = pbs_selection(q, kp, perm, block_size=block_size, segment_size=segment_size, threshold=threshold, scale=sc)
        out_off, lse_off = attend_blocks(q, kp, vp, keep, block_size, causal=False, key_padding_mask=None, scale=scale, engine=engine)
        n_seg = math.ceil(n / segment_size)
        diagonal = torch.eye(n_seg, dtype=torch.bool, device=q.device)[None, None]
        out_seg, lse_seg = attend_blocks(q, kh, vh, diagonal, segment_size, causal=True, key_padding_mask=None, scale=scale, engine=engine)
        rows = torch.arange(b * h * n, device=q.device)
        dv = vh.shape[-1]
        out, lse = merge_partials(
            torch.cat([out_off.reshape(-1, dv), out_seg.reshape(-1, dv).to(out_off.dtype)]),
            torch.cat([lse_off.reshape(-1), lse_seg.reshape(-1).to(lse_off.dtype)]),
            torch.cat([rows, rows]),
            b * h * n,
        )
        out, lse = out.view(b, h, n, dv).to(q.dtype), lse.view(b, h, n)
        return (out, lse) if return_lse else out

    run.__name__ = f"_pbs_{engine}"
    return run


def _pbs_sample(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {} if p.q_len >= 1024 else {"block_size": 16, "segment_size": 32}
    block = rng.randint(1, 8)
    params: dict[str, Any] = {"block_size": block, "segment_size": block * rng.randint(1, 4), "threshold": rng.choice((0.3, 0.6, 0.9, 1.0))}
    return sample_options(params, p, rng, chance=0.0)


def _pbs_sparsity(p: Problem, share: float) -> dict[str, Any]:
    """threshold = share (of the *estimated* off-segment mass); the paper's 128 / 256 from N = 2048,
    below about 16 blocks of a power of two, two blocks per segment."""
    if p.kv_len >= 2048:
        return {"threshold": share}
    block = max(1, 2 ** int(math.log2(max(1.0, p.kv_len / 16))))
    return {"threshold": share, "block_size": block, "segment_size": 2 * block}


PBS = register(
    Mechanism(
        name="pbs",
        family="sparse",
        catalog=("S2",),
        paper="Sparser Block-Sparse Attention via Token Permutation (PBS-Attn; Wang et al., 2025, arXiv 2510.21270), Sec. 3",
        formula="keys sorted per segment by mean softmax from the last query block; out_i = softmax over own segment (causal) + kept permuted blocks (mass >= tau of softmax_J(mean Q_I . mean K~_J))",
        cost="O(block * N * D) sort estimate; O(N^2 D / block^2) block estimate; O(selected blocks * block^2 * D + N * segment * D) attention; O(N) memory (fused)",
        summary="PBS-Attn: keys permuted inside segments by last-block attention, then mass-threshold block-sparse causal attention",
        patterns=frozenset({"causal_self"}),
        params=PBS_PARAMS,
        gqa=True,
        sample_params=_pbs_sample,
        check_params=_pbs_check,
        causal_block=lambda bound: WHOLE_SEQUENCE,
        sparsity_params=_pbs_sparsity,
    )
)
PBS.add_backend(Backend("reference", _pbs_reference, doc="permutation as index sets, row-by-row mass rule, dense mask in original order: the spec", priority=-100, materializes_scores=True))
PBS.add_backend(native_backend("fused", _pbs_engine("fused"), "permuted K/V: kept blocks + causal diagonal segments on the C++ block-sparse kernel, merged by LSE"))
PBS.add_backend(Backend("tiled", _pbs_engine("tiled"), doc="the same two passes on the PyTorch FA2 engine, merged by LSE", priority=20, traceable=False))


def pbs_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 128,
    segment_size: int = 256,
    threshold: float = 0.9,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """PBS-Attn (catalog S2): causal block-sparse attention over keys permuted inside segments.

    Keys (and values) of each complete ``segment_size`` segment are sorted by their mean softmax
    attention from the last ``block_size`` queries; query block I keeps its own segment dense and
    causal, plus the fewest permuted key blocks of earlier segments whose pooled-softmax mass
    ``softmax_J(scale mean(Q_I) . mean(K~_J))`` reaches ``threshold`` (and the block of token 0).
    ``threshold = 1`` gives dense causal softmax attention. Output in original order.

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        block_size: block (paper: 128). segment_size: permutation segment, a multiple of block_size (paper: 256).
        threshold: tau in (0, 1] (paper: 0.9).
        key_padding_mask: refused when it pads anything (the sort reads the last queries).
        scale: defaults to ``D ** -0.5``. return_lse: also the LSE (B, Hq, N).

    Cost: O(block * N * D) sort estimate, O(N^2 D / block^2) block estimate, attention over the
    kept blocks and the diagonal segments only (O(N) memory on ``fused``/``tiled``).
    Paper: Wang et al., "Sparser Block-Sparse Attention via Token Permutation" (2025), Sec. 3.

    Example::

        >>> q = k = v = torch.randn(1, 4, 8192, 64)
        >>> out = pbs_attention(q, k, v, threshold=0.9)
    """
    return PBS(q, k, v, backend=backend, block_size=block_size, segment_size=segment_size, threshold=threshold, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


PBS.function = pbs_attention


# ============================================================================================
# PAROAttention
# ============================================================================================
_PARO_PADDING_WHY = "its token permutations and blocks are laid over the whole (F, H, W) grid, which has no padded form"
#: the candidate axis orders per number of spatial axes, identity first (outermost axis first)
AXIS_ORDERS = {n: tuple(itertools.permutations(range(n))) for n in (2, 3)}
#: query rows per chunk of the fast calibration (bounds its (B, H, chunk, N) probabilities)
CALIBRATION_CHUNK = 256


def _check_orders(value: Any, p: Problem) -> Optional[str]:
    axes = len(p.q_shape)
    expected = f"None or one axis order per query head ({p.q_heads}), each a permutation of {tuple(range(axes))}"
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != p.q_heads:
        return expected
    for order in value:
        if not isinstance(order, (tuple, list)) or sorted(order) != list(range(axes)) or any(isinstance(a, bool) for a in order):
            return expected
    return None


def _check_block_mask(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.dtype != torch.bool or value.dim() not in (3, 4) or value.device != p.device:
        return f"None or a bool tensor (H, nb, nb) or (B, H, nb, nb) on {p.device} (the kept blocks in each head's permuted order)"
    return None


def _paro_check(params: dict, p: Problem) -> Optional[tuple[str, str]]:
    mask, block = params.get("block_mask"), params.get("block_size")
    if mask is None or not isinstance(block, int) or isinstance(block, bool) or block < 1:
        return None
    if params.get("orders") is None:
        return "block_mask", "given only with orders (the mask is laid over the permuted order)"
    nb = math.ceil(p.q_len / block)
    shapes = {(p.q_heads, nb, nb), (p.batch, p.q_heads, nb, nb)}
    if tuple(mask.shape) not in shapes:
        return "block_mask", f"shape (H, nb, nb) = {(p.q_heads, nb, nb)} or (B, H, nb, nb) for block_size={block}, got {tuple(mask.shape)}"
    return None


PARO_PARAMS = (
    Param("block_size", 64, "tokens per block of the permuted sequence (the kernel's 64)", positive_int("tokens per block"), (0, -64, 1.5, "64"), "int"),
    Param("threshold", 0.9, "share of each query block's attention mass its kept blocks cover (calibration)", unit_interval("the share of attention mass kept"), (0.0, 1.5, -0.1, "0.9"), "float"),
    Param("orders", None, "one axis order per query head (outermost first), e.g. (2, 0, 1); None = calibrated from the input", _check_orders, ("x", 5, ((0, 0, 0),)), "Sequence[tuple] | None"),
    Param("block_mask", None, "(H, nb, nb) or (B, H, nb, nb) bool kept blocks in the permuted order; None = calibrated", _check_block_mask, ("x", torch.zeros(1, 1, 1)), "Tensor | None"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def axis_permutation(shape: Sequence[int], order: Sequence[int], device: Any = None) -> Tensor:
    """(N,) the row-major index of the token at each position of the grid read in ``order``
    (``order[0]`` outermost): ``arange(N).view(shape).permute(order).flatten()``."""
    return torch.arange(math.prod(shape), device=device).view(*shape).permute(*order).flatten()


def _inverse(perm: Tensor) -> Tensor:
    return torch.empty_like(perm).scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))


def _block_ids(shape: Sequence[int], orders: Sequence[Sequence[int]], block: int, device: Any) -> Tensor:
    """(n_orders, N): the block of each row-major token under each order."""
    return torch.stack([_inverse(axis_permutation(shape, o, device)) // block for o in orders])


def _mass_dense(q: Tensor, k: Tensor, shape, orders, block: int, scale: float) -> Tensor:
    """(n_orders, B, H, nb, nb) float64: post-softmax attention summed over each (query block, key
    block) of each order, from the materialized attention (the reference's)."""
    p = torch.softmax(q.detach().double() @ k.detach().double().transpose(-1, -2) * scale, dim=-1)
    n = p.shape[-1]
    nb = math.ceil(n / block)
    out = []
    for order in orders:
        perm = axis_permutation(shape, order, q.device)
        pp = torch.nn.functional.pad(p[:, :, perm][:, :, :, perm], (0, nb * block - n, 0, nb * block - n))
        out.append(pp.view(p.shape[0], p.shape[1], nb, block, nb, block).sum((3, 5)))
    return torch.stack(out)


def _mass_chunked(q: Tensor, k: Tensor, shape, orders, block: int, scale: float) -> Tensor:
    """:func:`_mass_dense` with the softmax rows made ``CALIBRATION_CHUNK`` at a time and
    scattered into blocks by index: O(B H chunk N) memory."""
    b, h, n, _ = q.shape
    nb = math.ceil(n / block)
    ids = _block_ids(shape, orders, block, q.device)
    mass = torch.zeros(len(orders), b, h, nb, nb, dtype=torch.float64, device=q.device)
    kd = k.detach().double().transpose(-1, -2)
    for start in range(0, n, CALIBRATION_CHUNK):
        stop = min(n, start + CALIBRATION_CHUNK)
        p = torch.softmax(q.detach()[:, :, start:stop].double() @ kd * scale, dim=-1)
        for o in range(len(orders)):
            cols = torch.zeros(b, h, stop - start, nb, dtype=torch.float64, device=q.device).index_add_(3, ids[o], p)
            mass[o].index_add_(2, ids[o, start:stop], cols)
    return mass


def _calibrate(mass: Tensor, threshold: float, sorted_rule: bool) -> tuple[Tensor, Tensor]:
    """(best order index (B, H), kept blocks (B, H, nb, nb)): per order the mass rule on each
    query block's row; the order keeping the fewest blocks wins (ties: the first order)."""
    keep = (sorted_mass_mask if sorted_rule else mass_mask)(mass, threshold)  # (O, B, H, nb, nb)
    counts = keep.sum((-1, -2))  # (O, B, H)
    if sorted_rule:
        o_count = counts.shape[0]
        best = torch.tensor([[min(range(o_count), key=lambda o: (int(counts[o, bi, hi]), o)) for hi in range(counts.shape[2])] for bi in range(counts.shape[1])], device=mass.device)
    else:
        best = counts.argmin(0)  # the first minimum
    chosen = keep.gather(0, best[None, :, :, None, None].expand(1, *keep.shape[1:]))[0]
    return best, chosen


def _paro_plan(q, kh, *, shape, block_size, threshold, orders, block_mask, scale, reference):
    """(perm (B, H, N) row-major index at each permuted position, kept blocks (B, H, nb, nb))."""
    b, h, n, _ = q.shape
    candidates = AXIS_ORDERS[len(shape)]
    if orders is not None:
        perm = torch.stack([axis_permutation(shape, o, q.device) for o in orders])[None].expand(b, h, n)
        if block_mask is not None:
            keep = block_mask.to(q.device).expand(b, h, *block_mask.shape[-2:])
            return perm, keep
        masses = []
        for hi, o in enumerate(orders):  # each head's mass under its own order
            mass = (_mass_dense if reference else _mass_chunked)(q[:, hi : hi + 1], kh[:, hi : hi + 1], shape, [o], block_size, scale)
            masses.append(mass[0])
        keep = (sorted_mass_mask if reference else mass_mask)(torch.cat(masses, 1), threshold)
        return perm, keep
    mass = (_mass_dense if reference else _mass_chunked)(q, kh, shape, candidates, block_size, scale)
    best, keep = _calibrate(mass, threshold, reference)
    table = torch.stack([axis_permutation(shape, o, q.device) for o in candidates])  # (O, N)
    return table[best], keep


def paro_calibrate(q: Tensor, k: Tensor, *, block_size: int = 64, threshold: float = 0.9, scale: Optional[float] = None) -> tuple[list[tuple[int, ...]], Tensor]:
    """PAROAttention's offline calibration on sample inputs (the paper calibrates per head on a few
    prompts): the post-softmax attention mass of every (query block, key block) under each axis
    order, averaged over the batch; per head, the order whose mass rule (``threshold``) keeps the
    fewest blocks, and those blocks. Returns ``(orders, block_mask (H, nb, nb))`` to pass to
    :func:`paro_attention` (then no calibration runs at call time). O(N^2 D) time, O(N) memory."""
    shape = tuple(q.shape[2:-1])
    qf, kf = q.flatten(2, -2), k.flatten(2, -2)
    kf = kf.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    candidates = AXIS_ORDERS[len(shape)]
    mass = _mass_chunked(qf, kf, shape, candidates, block_size, default_scale(q, scale)).mean(1, keepdim=True)
    best, keep = _calibrate(mass, threshold, False)
    return [candidates[int(i)] for i in best[0]], keep[0]


def _paro_reference(q, k, v, *, block_size, threshold, orders, block_mask, key_padding_mask, scale, return_lse):
    """Calibration on the materialized attention, the kept blocks as a dense mask over the
    row-major tokens (token i and j meet where their blocks under i's head order are kept): the spec."""
    refuse_padding("paro", key_padding_mask, _PARO_PADDING_WHY)
    shape = tuple(q.shape[2:-1])
    qf, kf, vf = q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2)
    kh, vh = _repeat_kv(qf, kf, vf)
    perm, keep = _paro_plan(qf, kh, shape=shape, block_size=block_size, threshold=threshold, orders=orders, block_mask=block_mask, scale=default_scale(q, scale), reference=True)
    blk = _inverse(perm) // block_size  # (B, H, N): each row-major token's block in its head's order
    bi = torch.arange(q.shape[0], device=q.device)[:, None, None, None]
    hi = torch.arange(q.shape[1], device=q.device)[None, :, None, None]
    allowed = keep[bi, hi, blk[..., :, None], blk[..., None, :]]
    out, lse = materialized_attention(qf, kh, vh, scale=scale, allowed=allowed)
    out, lse = out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype), lse.reshape(q.shape[:-1])
    return (out, lse) if return_lse else out


def _paro_engine(engine: str):
    def run(q, k, v, *, block_size, threshold, orders, block_mask, key_padding_mask, scale, return_lse):
        refuse_padding("paro", key_padding_mask, _PARO_PADDING_WHY)
        shape = tuple(q.shape[2:-1])
        qf, kf, vf = q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2)
        kh, vh = _repeat_kv(qf, kf, vf)
        perm, keep = _paro_plan(qf, kh, shape=shape, block_size=block_size, threshold=threshold, orders=orders, block_mask=block_mask, scale=default_scale(q, scale), reference=False)
        qp = qf.gather(2, perm[..., None].expand(-1, -1, -1, qf.shape[-1]))
        kp = kh.gather(2, perm[..., None].expand(-1, -1, -1, kh.shape[-1]))
        vp = vh.gather(2, perm[..., None].expand(-1, -1, -1, vh.shape[-1]))
        out, lse = attend_blocks(qp, kp, vp, keep, block_size, causal=False, key_padding_mask=None, scale=scale, engine=engine)
        back = _inverse(perm)
        out = out.gather(2, back[..., None].expand(-1, -1, -1, out.shape[-1])).to(q.dtype)
        lse = lse.gather(2, back)
        out, lse = out.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1])
        return (out, lse) if return_lse else out

    run.__name__ = f"_paro_{engine}"
    return run


def _paro_block(n: int) -> int:
    return 64 if n >= 1024 else max(1, 2 ** int(math.log2(max(1.0, n / 8))))


def _paro_sample(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {"block_size": _paro_block(p.q_len)}
    block = rng.randint(1, 12)
    params: dict[str, Any] = {"block_size": block, "threshold": rng.choice((0.3, 0.6, 0.9, 1.0))}
    if rng.random() < 0.4:
        params["orders"] = tuple(rng.choice(AXIS_ORDERS[len(p.q_shape)]) for _ in range(p.q_heads))
        if rng.random() < 0.5:
            nb = math.ceil(p.q_len / block)
            gen = torch.Generator().manual_seed(rng.randrange(2**31))
            params["block_mask"] = (torch.rand(p.q_heads, nb, nb, generator=gen) < 0.5).to(p.device)
    return sample_options(params, p, rng, padded=False)


PARO = register(
    Mechanism(
        name="paro",
        family="sparse",
        catalog=("S2",),
        paper="PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual Generation Models (Zhao et al., 2025, arXiv 2506.16054), Sec. 4",
        formula="per head, tokens read in one of the orders of (F, H, W); out = softmax over the kept (query block, key block) pairs of the permuted sequence, un-permuted",
        cost="calibration (when orders / block_mask are not given): O(n_orders N^2) + O(N^2 D), O(N) memory on the fast backends; attention O(kept blocks * block^2 * D)",
        summary="PAROAttention: per-head axis reordering of the (F, H, W) grid so attention is block-concentrated, then block-sparse attention",
        patterns=frozenset({"noncausal_self"}),
        params=PARO_PARAMS,
        spatial_dims=(2, 3),
        gqa=True,
        sample_params=_paro_sample,
        check_params=_paro_check,
        sparsity_params=lambda p, share: {"threshold": share, "block_size": _paro_block(p.q_len)},
    )
)
PARO.add_backend(Backend("reference", _paro_reference, doc="calibration on materialized attention, dense mask over the row-major tokens: the spec", priority=-100, materializes_scores=True))
PARO.add_backend(native_backend("fused", _paro_engine("fused"), "chunked calibration, permuted q/k/v on the C++ block-sparse kernel, un-permuted"))
PARO.add_backend(Backend("tiled", _paro_engine("tiled"), doc="chunked calibration, permuted q/k/v on the PyTorch FA2 engine, un-permuted", priority=20, traceable=False))


def paro_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 64,
    threshold: float = 0.9,
    orders: Optional[Sequence[Sequence[int]]] = None,
    block_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """PAROAttention (catalog S2): block-sparse attention over a per-head reordering of a token grid.

    Each head reads the (F, H, W) (or (H, W)) grid in one of its axis orders (``orders[h]``,
    outermost axis first: (0, 1, 2) is row-major, (2, 0, 1) makes W outermost), cuts the
    permuted sequence into blocks of ``block_size``, and attends exactly over the kept (query
    block, key block) pairs; the output is returned on the original grid.

    Calibration (the paper's is offline per head on sample prompts; here a documented rule):
    with ``orders`` None, for every head and candidate order the post-softmax attention mass
    of each block pair is summed, each query block keeps the fewest key blocks whose mass
    reaches ``threshold`` (:func:`._select.mass_mask`), and the order keeping the fewest blocks
    is chosen (ties: the first of ``itertools.permutations``, identity first). With ``orders``
    given and ``block_mask`` None, the mask is calibrated for those orders; with both given,
    nothing is calibrated (use :func:`paro_calibrate` on sample inputs to make them).
    ``threshold = 1`` keeps every block that has any mass, i.e. softmax attention.

    Args:
        q: (B, Hq, F, H, W, D) or (B, Hq, H, W, D). k: same grid, Hkv heads. v: (..., Dv).
        block_size: tokens per block of the permuted sequence (64 runs fastest).
        threshold: tau in (0, 1] of the calibration. orders: per query head axis orders.
        block_mask: (H, nb, nb) or (B, H, nb, nb) bool, kept blocks in each head's permuted order.
        key_padding_mask: refused when it pads anything. scale: default ``D ** -0.5``.
        return_lse: also the LSE (B, Hq, *grid).

    Cost: calibration O(6 N^2) + one O(N^2 D) softmax pass (chunked, O(N) memory) when not given;
    attention O(kept blocks * block^2 * D).
    Paper: Zhao et al., "PAROAttention" (2025), Sec. 4 (pattern-aware token reordering, static
    block-sparse masks by a block-sum threshold).

    Example::

        >>> q = k = v = torch.randn(1, 4, 8, 16, 16, 64)
        >>> orders, mask = paro_calibrate(q, k)
        >>> out = paro_attention(q, k, v, orders=orders, block_mask=mask)
    """
    return PARO(q, k, v, backend=backend, block_size=block_size, threshold=threshold, orders=orders, block_mask=block_mask, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


PARO.function = paro_attention
PBS.decoder_refusal = READS_AHEAD
