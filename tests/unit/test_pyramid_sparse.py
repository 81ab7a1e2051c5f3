"""Oracles for PSA, Pyramid Sparse Attention (``pyramid_sparse``; arXiv 2512.04025).

Written from the paper and the official code's rules (sampled-token importance, ``'topk'`` level
quotas, mean-pooled K/V with a ``+ log(pool)`` score bias), loop by loop, never by calling the
mechanism's reference backend.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.sparse.pyramid import DEFAULT_MASK_RATIOS, _level_of_rank, psa_importance, psa_levels

PSA = attnzoo.get("pyramid_sparse")


def _qkv(b, hq, hkv, nq, nk, d=16, dv=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, nq, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, nk, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, nk, dv, generator=g, dtype=dtype),
    )


def _importance_oracle(q, k, bq, bk, seed, heads):
    """Per head: the documented offsets (``torch.rand(H, block).topk(block // 4)``, queries then
    keys, from ``seed``), blocks filled by repeating the last token, each sampled query's softmax
    over all sampled keys, summed per key block, averaged per query block."""
    gen = torch.Generator().manual_seed(seed)
    q_off = torch.rand(heads, bq, generator=gen).topk(max(1, bq // 4)).indices.tolist()
    k_off = torch.rand(heads, bk, generator=gen).topk(max(1, bk // 4)).indices.tolist()
    out = []
    for h in range(heads):
        nq, nk = q.shape[1], k.shape[1]
        nqb, nkb = math.ceil(nq / bq), math.ceil(nk / bk)
        sq = [q[h, min(nq - 1, qb * bq + o)] for qb in range(nqb) for o in q_off[h]]
        sk = [(kb, k[h, min(nk - 1, kb * bk + o)]) for kb in range(nkb) for o in k_off[h]]
        imp = torch.zeros(nqb, nkb, dtype=torch.float64)
        for idx, qi in enumerate(sq):
            p = torch.softmax(torch.stack([torch.dot(qi, kj) * q.shape[-1] ** -0.5 for _, kj in sk]), 0)
            for (kb, _), pj in zip(sk, p):
                imp[idx // len(q_off[h]), kb] += pj / len(q_off[h])
        out.append(imp)
    return torch.stack(out)


def _levels_oracle(imp, ratios):
    """Rank each row (descending, ties to the lower index); level l takes ranks [previous end, int(n * end_l))."""
    nkb = imp.shape[-1]
    levels = torch.zeros(imp.shape, dtype=torch.int64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in imp.shape[:-1]]).view(-1, imp.dim() - 1).tolist():
        row = imp[tuple(idx)].tolist()
        ranked = sorted(range(nkb), key=lambda j: (-row[j], j))
        last = 0
        for level, (_, end) in ratios.items():
            stop = min(nkb, int(nkb * end))
            for r in range(last, max(last, stop)):
                levels[tuple(idx) + (ranked[r],)] = level
            last = max(last, stop)
        if levels[tuple(idx) + (ranked[0],)] == 0:
            levels[tuple(idx) + (ranked[0],)] = next(lv for lv, (a, b) in ratios.items() if lv and b > a)
    return levels


def _attention_oracle(q, k, v, levels, bq, bk):
    """One head: query i attends, for each key block J of its query block's row, the block's keys
    (level 1) or the means of each run of ``level`` keys inside J, each scored ``scale q.k + log |g|``."""
    nq, d = q.shape
    nk = k.shape[0]
    out = torch.zeros(nq, v.shape[-1], dtype=q.dtype)
    for i in range(nq):
        scores, values = [], []
        for kb in range(levels.shape[-1]):
            lv = int(levels[i // bq, kb])
            if lv == 0:
                continue
            start, stop = kb * bk, min(nk, (kb + 1) * bk)
            for g0 in range(start, stop, lv):
                group = range(g0, min(stop, g0 + lv))
                km = sum(k[j] for j in group) / len(group)
                scores.append(torch.dot(q[i], km) * d**-0.5 + math.log(len(group)))
                values.append(sum(v[j] for j in group) / len(group))
        p = torch.softmax(torch.stack(scores), 0)
        out[i] = sum(pj * vj for pj, vj in zip(p, values))
    return out


def test_level_quotas_of_the_default_ratios():
    assert _level_of_rank(20, DEFAULT_MASK_RATIOS) == [1, 1, 2, 8, 8, 8, 8] + [0] * 13
    assert _level_of_rank(3, DEFAULT_MASK_RATIOS) == [8, 0, 0]  # int(3 * .35) = 1 block at x8
    assert _level_of_rank(2, DEFAULT_MASK_RATIOS) == [1, 0]  # quotas round to nothing: the top block full
    assert _level_of_rank(5, {1: (0.0, 1.0)}) == [1] * 5


@pytest.mark.parametrize("nq, nk, bq, bk, ratios", [
    (24, 40, 4, 8, None),
    (17, 23, 3, 5, {1: (0.0, 0.3), 2: (0.3, 0.5), 4: (0.5, 0.7), 0: (0.7, 1.0)}),
    (30, 30, 8, 12, {2: (0.0, 0.5), 8: (0.5, 1.0)}),
])
@pytest.mark.parametrize("backend", ["reference", "gathered"])
def test_psa_matches_oracle(nq, nk, bq, bk, ratios, backend):
    q, k, v = _qkv(1, 2, 1, nq, nk, seed=nq)
    out = PSA(q, k, v, backend=backend, block_q=bq, block_k=bk, mask_ratios=ratios, seed=7)
    kh, vh = k.repeat_interleave(2, 1)[0], v.repeat_interleave(2, 1)[0]
    imp = _importance_oracle(q[0], kh, bq, bk, 7, 2)
    torch.testing.assert_close(psa_importance(q, kh[None], block_q=bq, block_k=bk, seed=7, scale=0.25)[0], imp, atol=1e-12, rtol=1e-10)
    levels = _levels_oracle(imp, DEFAULT_MASK_RATIOS if ratios is None else ratios)
    assert torch.equal(psa_levels(imp, DEFAULT_MASK_RATIOS if ratios is None else ratios), levels)
    assert set(levels.unique().tolist()) - {0} , "no attended block"
    for h in range(2):
        torch.testing.assert_close(out[0, h], _attention_oracle(q[0, h], kh[h], vh[h], levels[h], bq, bk), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "gathered"])
@pytest.mark.parametrize("nq, nk", [(100, 100), (37, 61)])
def test_all_level_one_is_softmax(backend, nq, nk):
    q, k, v = _qkv(2, 4, 2, nq, nk, seed=3)
    out, lse = PSA(q, k, v, backend=backend, block_q=16, block_k=8, mask_ratios={1: (0.0, 1.0)}, return_lse=True)
    kh, vh = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kh, vh), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(lse, (q @ kh.transpose(-1, -2) * 0.25).logsumexp(-1), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "gathered"])
@pytest.mark.parametrize("level", [2, 4, 8])
def test_pooled_key_stands_for_its_tokens(backend, level):
    """With the keys and values constant over each run of ``level`` tokens, the level-``level``
    pyramid is exact softmax attention: the pooled key's + log(pool) counts its tokens (without
    it, a pooled block would weigh 1/level of the full blocks beside it in the same softmax)."""
    n = 64
    q, k, v = _qkv(1, 2, 2, n, n // level, seed=4)
    k, v = k.repeat_interleave(level, 2), v.repeat_interleave(level, 2)
    ratios = {1: (0.0, 0.5), level: (0.5, 1.0)}  # half the blocks full, half pooled
    out = PSA(q, k, v, backend=backend, block_q=16, block_k=16, mask_ratios=ratios)
    levels = psa_levels(psa_importance(q, k, block_q=16, block_k=16, seed=0, scale=0.25), ratios)
    assert bool((levels == 1).any()) and bool((levels == level).any())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-10, rtol=1e-8)


def test_default_ratios_skip_most_blocks_and_pool_some():
    q, k, v = _qkv(1, 2, 2, 256, 640, seed=5)
    kh = k
    levels = psa_levels(psa_importance(q, kh, block_q=128, block_k=64, seed=0, scale=0.25), DEFAULT_MASK_RATIOS)
    counts = {lv: int((levels == lv).sum(-1)[0, 0, 0]) for lv in (0, 1, 2, 4, 8)}
    assert counts == {1: 1, 2: 0, 4: 0, 8: 2, 0: 7}  # 10 key blocks: int(1.0)=1, int(1.5)=1, int(3.5)=3
    # the full block of each row is its most important one
    imp = psa_importance(q, kh, block_q=128, block_k=64, seed=0, scale=0.25)
    assert torch.equal((levels == 1).int().argmax(-1), imp.argmax(-1))


def test_gradients_match_reference():
    q, k, v = _qkv(1, 2, 1, 29, 35, seed=6)
    grads = {}
    for backend in ("reference", "gathered"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = PSA(*leaves, backend=backend, block_q=4, block_k=8, mask_ratios={1: (0.0, 0.3), 4: (0.3, 0.8)}, return_lse=True)
        (out.sin().sum() + lse.sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["gathered"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert grads["gathered"][2].abs().sum() > 0


def test_seed_is_deterministic():
    q, k, v = _qkv(1, 2, 2, 64, 64, seed=7)
    a = PSA(q, k, v, block_q=8, block_k=8, seed=3)
    assert torch.equal(a, PSA(q, k, v, block_q=8, block_k=8, seed=3))
    levels = [psa_levels(psa_importance(q, k, block_q=8, block_k=8, seed=s, scale=0.25), DEFAULT_MASK_RATIOS) for s in range(6)]
    assert any(not torch.equal(levels[0], lv) for lv in levels[1:]), "the seed does not reach the sampling"


@pytest.mark.parametrize("kwargs, name", [
    ({"mask_ratios": {3: (0.0, 1.0)}}, "mask_ratios"),
    ({"mask_ratios": {1: (0.5, 0.2)}}, "mask_ratios"),
    ({"mask_ratios": {0: (0.0, 1.0)}}, "mask_ratios"),
    ({"mask_ratios": [(1, (0.0, 1.0))]}, "mask_ratios"),
    ({"seed": -1}, "seed"),
    ({"block_k": 0}, "block_k"),
    ({"key_padding_mask": torch.tensor([[False] * 30 + [True] * 2])}, "key_padding_mask"),
])
def test_bad_inputs_name_the_argument(kwargs, name):
    q, k, v = _qkv(1, 2, 2, 32, 32)
    with pytest.raises(ParameterError) as info:
        PSA(q, k, v, **kwargs)
    assert info.value.argument == name and name in str(info.value)
