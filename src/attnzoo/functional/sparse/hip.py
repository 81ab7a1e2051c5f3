"""HiP: hierarchically pruned attention, an approximate top-k (catalog S1).

Lee et al., "A Training-free Sub-quadratic Cost Transformer Model Serving Framework With
Hierarchically Pruned Attention" (ICLR 2025, arXiv 2406.09827), Sec. 3 and Alg. 1 (mask
estimation); public prototype DeepAuto-AI/hip-attention v1.0 / v1.1 (``attention1*.py``,
``attention2_draft.py``: ``hip_attention(mask_k=512, block_size_q=32, block_size_k=2,
sliding_window_size=128)``, the defaults used here).

Per query block of ``block_q`` queries (blocks from position 0), over the key blocks of
``block_k`` keys the block may see (up to its last query, causal):

    nodes   <- ceil(mask_k / block_k) spans cutting the visible key blocks evenly
    repeat until every span is one key block:
        split every span [s, e) into [s, m) and [m, e), m = (s + e) // 2 (a span of one block stays)
        score(span) = max_{i in query block, j in key block s} q_i . k_j   (the first block represents it)
        nodes   <- the ceil(mask_k / block_k) best spans (ties: the lowest start)
    selected <- the key blocks left (all of them when there are no more than the budget)

    out_i = sum_{j in U_i, j <= i} softmax(scale q_i . k_j) v_j,
    U_i   = selected blocks of i's query block  u  {j < sink}  u  {i - sliding_window < j <= i}

Representative and pooling follow the prototype's masking kernel: the representative key block
of a span is the block at the span's first position (``loc * t_src`` rounded down to
``block_size_k``), and the score is pooled by max over the query block and the representative
block's keys (``REDUCE_METHOD == 'max'``). The sliding window and the attention sinks are the
serving framework's always-attended tokens (Sec. 3.3). Cost: O(log(N / mask_k)) iterations of
O(mask_k * block_q * D) per query block to select: O(N log N * D); O(N * (mask_k + window) * D)
to attend; no N x N tensor in the fast backend.

Selection: float64 in every backend, exactly the budget of spans, ties to the lowest start.
A query's output may depend on later tokens of its own query block (the block's queries and keys
are read together, as the paper's block-wise estimate): ``causal_block = block_q``. Gradients
flow through the attention, not the (discrete) selection.

Backends: ``reference`` (the iteration written as loops over the query blocks, a dense masked
softmax); ``gathered`` (groups of query blocks iterated at once on tensors; each query block then
attends its selected keys, window and sinks gathered: O(N * (mask_k + window + block_q) * D);
memory bounded by SEARCH_ELEMENTS / ATTEND_ELEMENTS per group, about 130 MiB at N=4096, H=4).
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
from ._select import NEG_INF, softmax_lse, sorted_top_k_mask, top_k_mask
from .._prefix_decoder import READS_AHEAD

__all__ = ["hip_attention", "HIP", "hip_selection", "hip_reference_selection"]

#: float64 elements of the gathered representative keys (and of their scores) per group of query
#: blocks searched together: the selection's memory stays near 32 MiB whatever N
SEARCH_ELEMENTS = 1 << 22
#: elements of the gathered keys, values and scores per group of query blocks attended together
ATTEND_ELEMENTS = 1 << 23


HIP_PARAMS = (
    Param("mask_k", 512, "keys kept per query block by the hierarchical top-k (the prototype's 512)", positive_int("selected keys per query block"), (0, -1, 1.5, "512"), "int"),
    Param("block_q", 32, "queries per query block (the prototype's block_size_q 32)", positive_int("queries per block"), (0, -32, 1.5, "32"), "int"),
    Param("block_k", 2, "keys per key block, the unit of selection (the prototype's block_size_k 2)", positive_int("keys per block"), (0, -2, 1.5, "2"), "int"),
    Param("sliding_window", 128, "each query also attends keys i - window + 1 .. i (the prototype's 128)", positive_int("window keys, the query included"), (0, -1, 1.5, "128"), "int"),
    Param("sink", 0, "the first `sink` keys are always attended (attention sinks; 0: none)", int_at_least(0, "sink keys"), (-1, 1.5, "4", True), "int"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


# Key padding is refused (a mask with no pad is accepted): a query block's spans cut the keys up to
# its last query evenly and its score pools over all its queries, so a pad inside a block or
# before a real token would change every span of the sequence.
_PADDING_WHY = (
    "the spans of a query block divide the keys up to its last query and its score pools all its queries, "
    "so pads would change the selection of the real tokens; run each sequence alone"
)


# --------------------------------------------------------------------------------------------
# the selection
# --------------------------------------------------------------------------------------------
def _visible_keys(block: int, block_q: int, nq: int, nk: int) -> int:
    """Keys a query block may read: up to its last query (bottom-right causal alignment)."""
    last_query = min(nq, (block + 1) * block_q) - 1
    return min(nk, last_query + nk - nq + 1)


def hip_reference_selection(q: Tensor, k: Tensor, *, mask_k: int, block_q: int, block_k: int) -> Tensor:
    """(B, H, n_q_blocks, n_k_blocks) bool: Alg. 1 written as loops (the reference's selection).
    ``k`` already has q's heads."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    nqb, nkb = math.ceil(nq / block_q), math.ceil(nk / block_k)
    budget = math.ceil(mask_k / block_k)
    selected = torch.zeros(b, h, nqb, nkb, dtype=torch.bool, device=q.device)
    qd, kd = q.detach().double(), k.detach().double()
    for bi in range(b):
        for hi in range(h):
            for qb in range(nqb):
                t = _visible_keys(qb, block_q, nq, nk)
                if t <= 0:
                    continue
                blocks = math.ceil(t / block_k)
                if blocks <= budget:
                    selected[bi, hi, qb, :blocks] = True
                    continue
                queries = qd[bi, hi, qb * block_q : min(nq, (qb + 1) * block_q)]
                keys = kd[bi, hi, :t]
                nodes = [(i * blocks // budget, (i + 1) * blocks // budget) for i in range(budget)]
                while any(e - s > 1 for s, e in nodes):
                    children = []
                    for s, e in nodes:
                        if e - s > 1:
                            m = (s + e) // 2
                            children += [(s, m), (m, e)]
                        else:
                            children.append((s, e))
                    # a span's score: max q.k over the query block and the span's first key block
                    scores = torch.tensor([float((queries @ keys[s * block_k : (s + 1) * block_k].T).max()) for s, _ in children], dtype=torch.float64)
                    keep = sorted_top_k_mask(scores, budget)
                    nodes = [c for c, kept in zip(children, keep.tolist()) if kept]
                for s, _ in nodes:
                    selected[bi, hi, qb, s] = True
    return selected


def hip_selection(q: Tensor, k: Tensor, *, mask_k: int, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """The selection of all query blocks at once: ``(starts, valid)``, (B, H, n_q_blocks, budget)
    int64 key-block indices in increasing order and bool "a selected block" (False past a block's
    visible key blocks when it sees no more than the budget). ``k`` already has q's heads.

    Each iteration gathers the representative key block of every child span, scores it against
    its query block (B, H, nqb, 2 budget, block_q, block_k), and keeps the budget best; O(N *
    mask_k * block_q * D) per iteration, log2(N / mask_k) iterations."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dev = q.device
    nqb, nkb = math.ceil(nq / block_q), math.ceil(nk / block_k)
    budget = math.ceil(mask_k / block_k)
    qb_idx = torch.arange(nqb, device=dev)
    t = ((qb_idx + 1) * block_q).clamp(max=nq) - 1 + nk - nq + 1  # visible keys per query block
    t = t.clamp(min=0, max=nk)
    blocks = -(-t // block_k)  # visible key blocks (nqb,)
    slot = torch.arange(budget, device=dev)
    # the few-keys blocks: all visible blocks
    starts = slot.expand(nqb, budget).clone()
    valid = slot[None, :] < blocks[:, None]
    hard = blocks > budget
    if not bool(hard.any()):
        return starts.expand(b, h, nqb, budget), valid.expand(b, h, nqb, budget)
    all_rows = hard.nonzero().squeeze(1)  # the query blocks that search
    qpad_all = torch.nn.functional.pad(q.detach().double(), (0, 0, 0, nqb * block_q - nq)).view(b, h, nqb, block_q, d)
    kpad = torch.nn.functional.pad(k.detach().double(), (0, 0, 0, nkb * block_k - nk)).view(b, h, nkb, block_k, d)
    starts = starts.expand(b, h, nqb, budget).clone()
    # query blocks in groups, so that a group's gathered keys stay near SEARCH_ELEMENTS
    group = max(1, SEARCH_ELEMENTS // max(1, b * h * 2 * budget * block_k * max(d, block_q)))
    for first in range(0, all_rows.shape[0], group):
        rows = all_rows[first : first + group]
        starts[:, :, rows] = _search(qpad_all[:, :, rows], kpad, rows, t[rows], blocks[rows], nq=nq, budget=budget, block_q=block_q, block_k=block_k)
    return starts, valid.expand(b, h, nqb, budget)


def _search(qpad: Tensor, kpad: Tensor, rows: Tensor, t_rows: Tensor, nb: Tensor, *, nq: int, budget: int, block_q: int, block_k: int) -> Tensor:
    """Alg. 1 for the query blocks ``rows`` (queries ``qpad`` (B, H, R, block_q, D), float64):
    the (B, H, R, budget) starts of the spans left, in increasing order."""
    b, h = qpad.shape[:2]
    dev, nkb = qpad.device, kpad.shape[2]
    slot = torch.arange(budget, device=dev)
    s = slot[None, :] * nb[:, None] // budget  # (R, budget): the initial even spans
    e = (slot[None, :] + 1) * nb[:, None] // budget
    s, e = s.expand(b, h, -1, -1).clone(), e.expand(b, h, -1, -1).clone()
    q_ok = (rows[:, None] * block_q + torch.arange(block_q, device=dev)[None, :]) < nq  # (R, block_q): a padded query scores -inf
    ragged = not bool(q_ok.all()) or bool((t_rows % block_k).any())
    while bool(((e - s) > 1).any()):
        split = (e - s) > 1
        m = torch.where(split, (s + e) // 2, e)
        cs = torch.stack([s, m], -1).flatten(-2)  # (B, H, R, 2 budget): children in start order
        ce = torch.stack([m, e], -1).flatten(-2)
        empty = cs >= ce
        keys = _gather_blocks(kpad, cs.clamp(max=nkb - 1))  # (B, H, R, 2 budget, block_k, D)
        sc = torch.einsum("bhrqd,bhrckd->bhrcqk", qpad, keys)  # (B, H, R, 2 budget, block_q, block_k)
        if ragged:  # a short last query block or a key block cut by a block's last visible key
            key_pos = cs[..., None] * block_k + torch.arange(block_k, device=dev)  # (B, H, R, 2 budget, block_k)
            ok = q_ok[None, None, :, None, :, None] & (key_pos < t_rows[None, None, :, None, None])[..., None, :]
            sc = sc.masked_fill(~ok, NEG_INF)
        score = sc.amax((-1, -2)).masked_fill(empty, NEG_INF)
        keep = top_k_mask(score, budget)
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :budget]  # kept, in start order
        s, e = cs.gather(-1, order), ce.gather(-1, order)
    return s


def _gather_blocks(kpad: Tensor, idx: Tensor) -> Tensor:
    """kpad (B, H, nkb, block_k, D), idx (B, H, R, C) -> (B, H, R, C, block_k, D)."""
    b, h, r, c = idx.shape
    nkb, bk, d = kpad.shape[2:]
    base = (torch.arange(b * h, device=idx.device) * nkb).view(b, h, 1, 1)
    rows = kpad.reshape(b * h * nkb, bk * d).index_select(0, (idx + base).reshape(-1))  # one row copy per block
    return rows.view(b, h, r, c, bk, d)


def _extra(i: Tensor, j: Tensor, sink: int, window: int) -> Tensor:
    """Always-attended keys of query position i (in key coordinates): sinks and the window."""
    return (j < sink) | ((j > i - window) & (j <= i))


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, mask_k, block_q, block_k, sliding_window, sink, key_padding_mask, scale, return_lse):
    """Alg. 1 as loops over query blocks, then a dense masked softmax: the spec."""
    refuse_padding("hip", key_padding_mask, _PADDING_WHY)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    kk = k.repeat_interleave(h // k.shape[1], dim=1)
    selected = hip_reference_selection(q, kk, mask_k=mask_k, block_q=block_q, block_k=block_k)
    rows = selected.repeat_interleave(block_q, dim=2)[:, :, :nq].repeat_interleave(block_k, dim=3)[..., :nk]
    i = torch.arange(nq, device=q.device)[:, None] + nk - nq
    j = torch.arange(nk, device=q.device)[None, :]
    allowed = (rows | _extra(i, j, sink, sliding_window)) & (j <= i)
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=allowed)
    return (out, lse) if return_lse else out


def _gathered(q, k, v, *, mask_k, block_q, block_k, sliding_window, sink, key_padding_mask, scale, return_lse):
    """The vectorized selection; every query block attends its selected keys, its window and the
    sinks gathered into one (block_q x L) softmax, L = mask_k + window + block_q - 1 + sink."""
    refuse_padding("hip", key_padding_mask, _PADDING_WHY)
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    group = h // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    starts, valid = hip_selection(q, kk, mask_k=mask_k, block_q=block_q, block_k=block_k)
    nqb = starts.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk, vv = kk.to(cdt), vv.to(cdt)
    qpad = torch.nn.functional.pad(q.to(cdt), (0, 0, 0, nqb * block_q - nq)).view(b, h, nqb, block_q, d)
    width = starts.shape[-1] * block_k + sliding_window + block_q - 1 + min(sink, nk)  # keys per query block
    group_blocks = max(1, ATTEND_ELEMENTS // max(1, b * h * width * (d + dv + block_q)))
    outs, lses = [], []
    for first in range(0, nqb, group_blocks):
        blocks = slice(first, min(nqb, first + group_blocks))
        part, part_lse = _attend_blocks(qpad[:, :, blocks], kk, vv, starts[:, :, blocks], valid[:, :, blocks], first, nq=nq, block_q=block_q, block_k=block_k,
                              window=sliding_window, sink=sink, scale=default_scale(q, scale))
        outs.append(part)
        lses.append(part_lse)
    out = torch.cat(outs, 2).reshape(b, h, nqb * block_q, dv)[:, :, :nq].to(q.dtype)
    lse = torch.cat(lses, 2).reshape(b, h, nqb * block_q)[:, :, :nq]
    return (out, lse) if return_lse else out


def _attend_blocks(qb: Tensor, kk: Tensor, vv: Tensor, starts: Tensor, valid: Tensor, first: int, *, nq: int, block_q: int, block_k: int, window: int, sink: int,
                   scale: float) -> tuple[Tensor, Tensor]:
    """Query blocks ``first ..`` (``qb`` (B, H, G, block_q, D)): each against its selected keys,
    its window span and the sinks, gathered, in one masked softmax; ((B, H, G, block_q, Dv), lse)."""
    b, h, g, _, d = qb.shape
    nk, dv, dev = kk.shape[2], vv.shape[-1], qb.device
    off = nk - nq
    # key positions per query block: selected blocks | window span | sinks
    sel = (starts[..., None] * block_k + torch.arange(block_k, device=dev)).flatten(-2)  # (B, H, G, budget * block_k)
    sel_ok = valid.repeat_interleave(block_k, dim=-1)
    first_q = (first + torch.arange(g, device=dev)) * block_q + off  # key coordinate of each block's first query
    win = first_q[:, None] - window + 1 + torch.arange(window + block_q - 1, device=dev)[None, :]  # (G, W)
    snk = torch.arange(min(sink, nk), device=dev).expand(g, -1)
    pos = torch.cat([sel, win.expand(b, h, -1, -1), snk.expand(b, h, -1, -1)], -1)  # (B, H, G, L)
    seg = torch.cat([torch.zeros(sel.shape[-1], dtype=torch.int8), torch.ones(win.shape[-1], dtype=torch.int8), torch.full((snk.shape[-1],), 2, dtype=torch.int8)]).to(dev)
    base_ok = torch.cat([sel_ok, torch.ones(b, h, g, win.shape[-1] + snk.shape[-1], dtype=torch.bool, device=dev)], -1)
    i = ((first + torch.arange(g, device=dev))[:, None] * block_q + torch.arange(block_q, device=dev)[None, :] + off)[None, None, :, :, None]  # (1, 1, G, block_q, 1)
    j = pos[:, :, :, None, :]  # (B, H, G, 1, L)
    inside = (j >= 0) & (j < nk) & (j <= i) & base_ok[:, :, :, None, :]
    in_window = (j > i - window) & (j <= i)
    # each key counted once: the selected part drops window and sink keys, the sinks drop window keys
    ok = torch.where(seg == 0, ~in_window & ~(j < sink), torch.where(seg == 1, in_window, ~in_window & (j < sink)))
    ok = inside & ok & (i - off < nq)
    flat = pos.clamp(0, nk - 1)
    lin = (flat + (torch.arange(b * h, device=dev) * nk).view(b, h, 1, 1)).reshape(-1)  # rows of the flattened keys
    kg = kk.reshape(b * h * nk, d).index_select(0, lin).view(b, h, g, -1, d)
    vg = vv.reshape(b * h * nk, dv).index_select(0, lin).view(b, h, g, -1, dv)
    s = torch.einsum("bhnqd,bhnld->bhnql", qb, kg) * scale
    p, lse = softmax_lse(s.masked_fill(~ok, NEG_INF))
    return torch.einsum("bhnql,bhnld->bhnqd", p, vg), lse


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        if p.kv_len >= 1024:
            return {}
        return {"mask_k": max(2, p.kv_len // 8), "block_q": 16, "block_k": 2, "sliding_window": 16}
    params: dict[str, Any] = {
        "mask_k": rng.randint(1, max(1, p.kv_len // 2)),
        "block_q": rng.randint(1, 12),
        "block_k": rng.randint(1, 5),
        "sliding_window": rng.randint(1, 12),
        "sink": rng.choice((0, 0, 1, 3)),
    }
    return sample_options(params, p, rng, padded=False)


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    """mask_k = f N with 1 - (1 - f)^2 = share: over the causal triangle, keeping f N keys of each
    query block keeps about ``share`` of the visible pairs (the window is one key)."""
    mask_k = p.kv_len if share >= 1 else max(2, round((1 - math.sqrt(1 - share)) * p.kv_len))
    return {"mask_k": mask_k, "block_q": 32, "block_k": 2, "sliding_window": 1}


HIP = register(
    Mechanism(
        name="hip",
        family="sparse",
        catalog=("S1",),
        paper="HiP: A Training-free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically Pruned Attention (Lee et al., ICLR 2025), Sec. 3, Alg. 1",
        formula="out_i = sum_{j in U_i, j <= i} softmax(scale q_i.k_j) v_j, U_i = hierarchical top-(mask_k) key blocks of i's query block + sinks + window",
        cost="O(N log(N / mask_k) * block_q * D) to select (mask_k per query block per iteration), O(N * (mask_k + window) * D) to attend",
        summary="HiP hierarchical approximate top-k: per query block, halve candidate key spans and keep the best mask_k by their first block's max score",
        patterns=frozenset({"causal_self"}),
        params=HIP_PARAMS,
        gqa=True,
        exact=True,
        sample_params=_sample_params,
        causal_block=lambda bound: bound["block_q"],
        sparsity_params=_sparsity_params,
    )
)
HIP.add_backend(Backend("reference", _reference, doc="Alg. 1 as loops per query block, dense masked softmax: the spec", priority=-100, materializes_scores=True))
HIP.add_backend(
    Backend("gathered", _gathered, doc="vectorized span halving; each query block attends its gathered selected keys, window and sinks", priority=30)
)


def hip_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask_k: int = 512,
    block_q: int = 32,
    block_k: int = 2,
    sliding_window: int = 128,
    sink: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """HiP (catalog S1): causal attention over a hierarchical approximate top-k of key blocks.

    For each block of ``block_q`` queries, ``ceil(mask_k / block_k)`` spans of key blocks are
    halved repeatedly; each half is scored by ``max q_i . k_j`` over the query block and the
    half's first key block, and the best spans are kept until each is one key block (Alg. 1).
    Each query attends those blocks, the first ``sink`` keys and its last ``sliding_window``
    keys, causally.

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        mask_k: keys selected per query block (defaults: the prototype's 512 / 32 / 2 / 128).
        block_q, block_k: query block and key block sizes. sliding_window: local keys, >= 1.
        sink: first keys always attended. scale: defaults to ``D ** -0.5``.
        key_padding_mask: accepted only without pads (ParameterError otherwise: see the module).
        return_lse: also return the LSE (B, Hq, N).

    Cost: O(N log(N / mask_k) * block_q * D) to select, O(N (mask_k + window) D) to attend.
    Paper: Lee et al., ICLR 2025, Alg. 1.

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = hip_attention(q, k, v)
    """
    return HIP(
        q, k, v, backend=backend, mask_k=mask_k, block_q=block_q, block_k=block_k, sliding_window=sliding_window, sink=sink, key_padding_mask=key_padding_mask, scale=scale,
        return_lse=return_lse,
    )


HIP.function = hip_attention
HIP.decoder_refusal = READS_AHEAD
