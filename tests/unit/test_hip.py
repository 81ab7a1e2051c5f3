"""HiP (catalog S1): the hierarchical span-halving selection of Alg. 1 against an oracle written out
here (lists and a precomputed score matrix, independent of the module's loops and tensors), the
attention against a per-query loop, full budget == causal softmax, recall against exact block
top-k, gradients, the block-causal property and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.sparse import hip_attention
from attnzoo.functional.sparse.hip import hip_reference_selection, hip_selection


def _qkv(b, h, n, d=16, hkv=None, seed=0, dv=8):
    gen = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv
    return (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64), torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64),
            torch.randn(b, hkv, n, dv, generator=gen, dtype=torch.float64))


def _oracle_blocks(scores, qb, n, mask_k, block_q, block_k):
    """Alg. 1 for one query block from the full score matrix ``scores`` (N x N, python lists):
    spans of key blocks halved until single, each half scored by its first key block's max
    over the block's queries, the best ``ceil(mask_k / block_k)`` kept (ties: lowest start)."""
    rows = range(qb * block_q, min(n, (qb + 1) * block_q))
    visible = rows[-1] + 1  # self-attention: keys up to the block's last query
    n_blocks = -(-visible // block_k)
    budget = -(-mask_k // block_k)
    if n_blocks <= budget:
        return set(range(n_blocks))

    def rep(start):
        return max(scores[i][j] for i in rows for j in range(start * block_k, min(visible, (start + 1) * block_k)))

    spans = [(i * n_blocks // budget, (i + 1) * n_blocks // budget) for i in range(budget)]
    while max(e - s for s, e in spans) > 1:
        halves = []
        for s, e in spans:
            halves += [(s, (s + e) // 2), ((s + e) // 2, e)] if e - s > 1 else [(s, e)]
        halves.sort(key=lambda se: (-rep(se[0]), se[0]))
        spans = sorted(halves[:budget])
    return {s for s, _ in spans}


def _fast_sets(q, k, mask_k, block_q, block_k):
    starts, valid = hip_selection(q, k, mask_k=mask_k, block_q=block_q, block_k=block_k)
    return [[[{int(s) for s, ok in zip(starts[b, h, i], valid[b, h, i]) if ok} for i in range(starts.shape[2])] for h in range(q.shape[1])] for b in range(q.shape[0])]


CASES = [(97, 8, 4, 2), (130, 13, 5, 3), (64, 4, 7, 1), (40, 100, 4, 2), (128, 16, 16, 4)]


@pytest.mark.parametrize("n, mask_k, block_q, block_k", CASES, ids=[f"N{c[0]}-mk{c[1]}-bq{c[2]}-bk{c[3]}" for c in CASES])
def test_selection_matches_written_out_alg1(n, mask_k, block_q, block_k):
    q, k, _ = _qkv(2, 2, n, seed=n)
    ref = hip_reference_selection(q, k, mask_k=mask_k, block_q=block_q, block_k=block_k)
    fast = _fast_sets(q, k, mask_k, block_q, block_k)
    budget = math.ceil(mask_k / block_k)
    for b in range(2):
        for h in range(2):
            scores = (q[b, h] @ k[b, h].T).tolist()
            for qb in range(math.ceil(n / block_q)):
                want = _oracle_blocks(scores, qb, n, mask_k, block_q, block_k)
                assert set(ref[b, h, qb].nonzero().flatten().tolist()) == want
                assert fast[b][h][qb] == want
                visible_blocks = math.ceil(min(n, (qb + 1) * block_q) / block_k)
                assert len(want) == min(budget, visible_blocks)


def _loop_attention(q, k, v, sets, *, block_q, block_k, window, sink, scale):
    b, h, n, _ = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                chosen = {j for blk in sets[bi][hi][i // block_q] for j in range(blk * block_k, (blk + 1) * block_k)}
                keys = sorted(j for j in range(i + 1) if j in chosen or j < sink or j > i - window)
                w = torch.softmax(torch.stack([q[bi, hi, i] @ k[bi, hi, j] * scale for j in keys]), 0)
                out[bi, hi, i] = sum(wj * v[bi, hi, j] for wj, j in zip(w, keys))
    return out


@pytest.mark.parametrize("backend", ["reference", "gathered"])
@pytest.mark.parametrize("window, sink", [(1, 0), (5, 0), (3, 2)])
def test_attention_matches_per_query_loop(backend, window, sink):
    n, mask_k, block_q, block_k = 70, 8, 6, 2
    q, k, v = _qkv(1, 2, n, seed=3)
    sets = [[[_oracle_blocks((q[0, h] @ k[0, h].T).tolist(), qb, n, mask_k, block_q, block_k) for qb in range(math.ceil(n / block_q))] for h in range(2)]]
    want = _loop_attention(q, k, v, sets, block_q=block_q, block_k=block_k, window=window, sink=sink, scale=0.25)
    got = hip_attention(q, k, v, mask_k=mask_k, block_q=block_q, block_k=block_k, sliding_window=window, sink=sink, scale=0.25, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "gathered"])
def test_full_budget_is_causal_softmax(backend):
    q, k, v = _qkv(2, 4, 90, hkv=2, seed=5)
    out = hip_attention(q, k, v, mask_k=90, block_q=8, block_k=3, sliding_window=1, backend=backend)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kk, vv, is_causal=True), atol=1e-12, rtol=1e-10)


def _recall(q, k, mask_k, block_q, block_k):
    """Share of the exact top-(budget) key blocks (by the same block score) that HiP selects,
    over the query blocks that search (more visible blocks than the budget)."""
    n = q.shape[2]
    budget = math.ceil(mask_k / block_k)
    sets = _fast_sets(q, k, mask_k, block_q, block_k)
    hit = total = 0
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = q[b, h] @ k[b, h].T
            for qb in range(math.ceil(n / block_q)):
                rows = slice(qb * block_q, min(n, (qb + 1) * block_q))
                visible = min(n, (qb + 1) * block_q)
                nb = math.ceil(visible / block_k)
                if nb <= budget:
                    continue
                cols = torch.nn.functional.pad(s[rows, :visible], (0, nb * block_k - visible), value=-math.inf)
                block_score = cols.view(cols.shape[0], nb, block_k).amax((0, 2))
                exact = set(block_score.topk(budget).indices.tolist())
                hit += len(exact & sets[b][h][qb])
                total += budget
    return hit / total


def test_recall_against_exact_block_topk():
    """Random keys have no locality, smooth keys (a random walk: neighbours alike, the paper's
    "attention locality") do; HiP's recall must beat chance on both and be high on the second.
    Measured here (N=1024, D=32, 2 heads, mask_k=64, block_q=32, block_k=2: a budget of 32 of up to
    512 key blocks): 0.52 on random keys (chance, the mean budget share: 0.17) and 0.99 on smooth
    keys; at N=4096, D=64, the defaults (mask_k=512): 0.72 random, 0.9995 smooth."""
    n, mask_k, block_q, block_k = 1024, 64, 32, 2
    q, k, _ = _qkv(1, 2, n, d=32, seed=11)
    rand = _recall(q, k, mask_k, block_q, block_k)
    walk = torch.cumsum(k, dim=2) / math.sqrt(n)
    smooth = _recall(q, walk, mask_k, block_q, block_k)
    chance = sum(32 / math.ceil(min(n, (i + 1) * block_q) / block_k) for i in range(n // block_q) if math.ceil((i + 1) * block_q / block_k) > 32) / sum(
        1 for i in range(n // block_q) if math.ceil((i + 1) * block_q / block_k) > 32
    )
    assert rand > chance
    assert rand > 2 * chance
    assert smooth > 0.95


def test_gradients_match_reference():
    q, k, v = _qkv(1, 2, 60, seed=7)
    grads = {}
    for backend in ("reference", "gathered"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = hip_attention(*leaves, mask_k=6, block_q=5, block_k=2, sliding_window=4, sink=1, return_lse=True, backend=backend)
        (out.pow(2).sum() + lse.sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for got, want in zip(grads["gathered"], grads["reference"]):
        assert got is not None and bool(got.abs().sum() > 0)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "gathered"])
def test_block_causal(backend):
    """A query's output depends on the tokens of its own query block and before, never after."""
    n, block_q = 64, 8
    q, k, v = _qkv(1, 1, n, seed=9)
    params = dict(mask_k=6, block_q=block_q, block_k=2, sliding_window=2, backend=backend)
    base = hip_attention(q, k, v, **params)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 40:] = torch.randn_like(t[:, :, 40:])  # block 5 starts at 40
    moved = hip_attention(q2, k2, v2, **params)
    torch.testing.assert_close(moved[:, :, :40], base[:, :, :40], atol=0, rtol=0)
    assert not torch.allclose(moved[:, :, 40:], base[:, :, 40:])


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"mask_k": 0}, "mask_k"), ({"block_q": -1}, "block_q"), ({"block_k": 1.5}, "block_k"), ({"sliding_window": 0}, "sliding_window"),
     ({"sink": -1}, "sink"), ({"key_padding_mask": torch.tensor([[False] * 15 + [True]])}, "key_padding_mask")],
)
def test_bad_inputs_name_the_argument(kwargs, argument):
    q, k, v = _qkv(1, 1, 16)
    with pytest.raises(ParameterError) as err:
        hip_attention(q, k, v, **kwargs)
    assert err.value.argument == argument and argument in str(err.value)


def test_registered():
    mech = attnzoo.get("hip")
    assert {"reference", "gathered"} <= set(mech.backends)
    assert not mech.backends["gathered"].materializes_scores


def test_selection_in_groups_of_query_blocks(monkeypatch):
    """The fast selection searches groups of query blocks to bound its memory; the grouping must not
    change what it selects."""
    import attnzoo.functional.sparse.hip as hip

    q, k, _ = _qkv(1, 2, 200, seed=13)
    whole = hip.hip_selection(q, k, mask_k=10, block_q=6, block_k=2)
    monkeypatch.setattr(hip, "SEARCH_ELEMENTS", 1)  # one query block per group
    grouped = hip.hip_selection(q, k, mask_k=10, block_q=6, block_k=2)
    assert torch.equal(whole[0], grouped[0]) and torch.equal(whole[1], grouped[1])


def test_attention_in_groups_of_query_blocks(monkeypatch):
    import attnzoo.functional.sparse.hip as hip

    q, k, v = _qkv(1, 2, 90, seed=17)
    params = dict(mask_k=8, block_q=7, block_k=2, sliding_window=5, sink=2, return_lse=True, backend="gathered")
    whole = hip_attention(q, k, v, **params)
    monkeypatch.setattr(hip, "ATTEND_ELEMENTS", 1)  # one query block per group
    grouped = hip_attention(q, k, v, **params)
    torch.testing.assert_close(grouped[0], whole[0], atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(grouped[1], whole[1], atol=1e-13, rtol=1e-12)
