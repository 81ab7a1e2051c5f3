"""attnzoo.cache.policies: each eviction rule against a written-out reference of its paper.

The references loop over tokens and steps with Python scalars (``math.exp``, dicts keyed by
original position), sharing no code with the tensor rules. Inputs are float64 random tensors
(B2-Hq4-Hkv2-D8, so GQA groups of 2), which leaves no ties among scores. Kept sets are compared
as sets of original positions per (batch, kv head).
"""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.cache import policies as P
from attnzoo.errors import ParameterError, ShapeError

B, HQ, HKV, D = 2, 4, 2, 8
G = HQ // HKV
SCALE = D**-0.5


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def as_sets(kept):
    return [[set(kept[b, h].tolist()) for h in range(kept.shape[1])] for b in range(kept.shape[0])]


def softmax_row(q, keys):
    """Python-scalar softmax of q . k * SCALE over a list of key vectors."""
    logits = [SCALE * sum(a * b for a, b in zip(q.tolist(), k.tolist())) for k in keys]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


# ---- budgets ----------------------------------------------------------------------------------
def test_resolve_budget_counts_and_ratios():
    assert P.resolve_budget(100, budget=30) == 30
    assert P.resolve_budget(100, compression_ratio=0.25) == 75  # kvpress: the fraction removed
    assert P.resolve_budget(100, compression_ratio=0.0) == 100
    assert P.resolve_budget(3, compression_ratio=0.99) == 1  # at least one token kept


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(), "compression_ratio"),
        (dict(budget=4, compression_ratio=0.5), "budget"),
        (dict(budget=0), "budget"),
        (dict(budget=2.5), "budget"),
        (dict(budget=True), "budget"),
        (dict(compression_ratio=1.0), "compression_ratio"),
        (dict(compression_ratio=-0.1), "compression_ratio"),
        (dict(compression_ratio="half"), "compression_ratio"),
    ],
)
def test_bad_budgets_name_the_argument(kwargs, argument):
    with pytest.raises(ParameterError) as info:
        P.resolve_budget(10, **kwargs)
    assert info.value.argument == argument


def test_bad_policy_parameters_name_the_argument():
    keys = rand(B, HKV, 20, D)
    with pytest.raises(ParameterError) as info:
        P.streaming_llm(keys, budget=4, n_sink=4)
    assert info.value.argument == "n_sink"
    with pytest.raises(ParameterError) as info:
        P.h2o(rand(B, HKV, 20), budget=4, recent=5)
    assert info.value.argument == "recent"
    with pytest.raises(ParameterError) as info:
        P.snapkv(keys, rand(B, HQ, 6, D), budget=4)
    assert info.value.argument == "budget"
    with pytest.raises(ParameterError) as info:
        P.snapkv_scores(keys, rand(B, HQ, 6, D), kernel_size=4)
    assert info.value.argument == "kernel_size"
    with pytest.raises(ShapeError) as info:
        P.tova(keys, rand(B, 3, 1, D), budget=4)
    assert info.value.argument == "queries"


@pytest.mark.parametrize("budget", [20, 21, 100])
def test_budget_at_least_the_length_keeps_everything(budget):
    s = 20
    keys, queries = rand(B, HKV, s, D), rand(B, HQ, s, D, seed=1)
    everything = torch.arange(s).expand(B, HKV, s)
    assert torch.equal(P.streaming_llm(keys, budget=budget), everything)
    assert torch.equal(P.key_norm(keys, budget=budget), everything)
    assert torch.equal(P.h2o(P.accumulate_attention(None, queries, keys), budget=budget, recent=budget // 2), everything)
    assert torch.equal(P.snapkv(keys, queries[:, :, -4:], budget=budget), everything)
    assert torch.equal(P.tova(keys, queries[:, :, -1:], budget=budget), everything)


# ---- K2 StreamingLLM --------------------------------------------------------------------------
def streaming_reference(total: int, budget: int, n_sink: int) -> list[int]:
    """StartRecentKVCache, token by token: keep the first n_sink and the last budget - n_sink."""
    cache: list[int] = []
    for t in range(total):
        cache.append(t)
        if len(cache) > budget:
            cache = cache[:n_sink] + cache[len(cache) - (budget - n_sink) :]
    return cache


@pytest.mark.parametrize("s, budget, n_sink", [(30, 10, 4), (30, 10, 0), (11, 10, 1), (7, 3, 2)])
def test_streaming_llm_matches_the_token_by_token_reference(s, budget, n_sink):
    keys = rand(B, HKV, s, D)
    expected = set(streaming_reference(s, budget, n_sink))
    kept = P.streaming_llm(keys, budget=budget, n_sink=n_sink)
    assert kept.shape == (B, HKV, budget)
    assert all(row == expected for rows in as_sets(kept) for row in rows)


# ---- K3 H2O ---------------------------------------------------------------------------------
STEPS = [12, 1, 1, 1, 1, 1, 1, 1]  # a 12-token prompt, then seven decoding steps


def h2o_reference(queries, keys, steps, budget, recent):
    """H2O (Alg. 1), per (batch, kv head): every query's softmax over the keys it can see adds to
    their running scores (summed over the group's query heads); when over budget, keep the last
    ``recent`` tokens and the ``budget - recent`` older ones of highest score; evicted scores go."""
    out = []
    for b in range(B):
        rows = []
        for h in range(HKV):
            score: dict[int, float] = {}
            start = 0
            for n in steps:
                for t in range(start, start + n):
                    score[t] = 0.0
                for t in range(start, start + n):  # query at position t sees cached keys <= t
                    visible = [p for p in sorted(score) if p <= t]
                    for head in range(h * G, (h + 1) * G):
                        probs = softmax_row(queries[b, head, t], [keys[b, h, p] for p in visible])
                        for p, prob in zip(visible, probs):
                            score[p] += prob
                start += n
                if len(score) > budget:
                    order = sorted(score)
                    tail = order[len(order) - recent :] if recent else []
                    older = order[: len(order) - recent]
                    heavy = sorted(older, key=lambda p: -score[p])[: budget - recent]
                    score = {p: score[p] for p in heavy + tail}
            rows.append(set(score))
        out.append(rows)
    return out


def h2o_pipeline(queries, keys, steps, budget, recent):
    """The tensor rules driven the way the cache drives them."""
    cached_k, positions, scores, start = keys[:, :, :0], torch.empty(B, HKV, 0, dtype=torch.long), None, 0
    for n in steps:
        cached_k = torch.cat([cached_k, keys[:, :, start : start + n]], dim=2)
        positions = torch.cat([positions, torch.arange(start, start + n).expand(B, HKV, n)], dim=2)
        scores = P.accumulate_attention(scores, queries[:, :, start : start + n], cached_k, scale=SCALE)
        kept = P.h2o(scores, budget=budget, recent=recent)
        cached_k, positions = P.gather_kept(cached_k, kept), P.gather_kept(positions, kept)
        scores = P.gather_kept(scores, kept)
        start += n
    return as_sets(positions)


@pytest.mark.parametrize("budget, recent", [(8, 4), (8, 1), (8, 0), (6, 6), (19, 3)])
def test_h2o_matches_the_step_by_step_reference(budget, recent):
    s = sum(STEPS)
    queries, keys = rand(B, HQ, s, D, seed=2), rand(B, HKV, s, D, seed=3)
    assert h2o_pipeline(queries, keys, STEPS, budget, recent) == h2o_reference(queries, keys, STEPS, budget, recent)


def test_h2o_scores_accumulate_over_steps():
    """Two one-token steps give the sum of each step's probabilities (not only the last)."""
    queries, keys = rand(1, HQ, 2, D, seed=4), rand(1, HKV, 2, D, seed=5)
    first = P.accumulate_attention(None, queries[:, :, :1], keys[:, :, :1])
    both = P.accumulate_attention(first, queries[:, :, 1:], keys)
    torch.testing.assert_close(both[..., 0], G + P.accumulate_attention(None, queries[:, :, 1:], keys)[..., 0])
    assert torch.all(first == G)  # a lone key takes all of each of the G heads' attention


# ---- K4 SnapKV --------------------------------------------------------------------------------
def snapkv_reference(queries, keys, budget, window, kernel):
    """SnapKV (Alg. 1): the window's queries vote (summed softmax over the keys they see) for the
    prefix keys; votes are average-pooled (zero padded, kernel k) and averaged over the group;
    keep the top budget - window prefix keys and the whole window."""
    s = keys.shape[2]
    prefix = s - window
    out = []
    for b in range(B):
        rows = []
        for h in range(HKV):
            pooled_sum = [0.0] * prefix
            for head in range(h * G, (h + 1) * G):
                votes = [0.0] * prefix
                for i in range(window):
                    t = prefix + i
                    probs = softmax_row(queries[b, head, i], [keys[b, h, p] for p in range(t + 1)])
                    for p in range(prefix):
                        votes[p] += probs[p]
                for p in range(prefix):
                    acc = sum(votes[j] for j in range(p - kernel // 2, p + kernel // 2 + 1) if 0 <= j < prefix)
                    pooled_sum[p] += acc / kernel / G
            top = sorted(range(prefix), key=lambda p: -pooled_sum[p])[: budget - window]
            rows.append(set(top) | set(range(prefix, s)))
        out.append(rows)
    return out


@pytest.mark.parametrize("s, budget, window, kernel", [(40, 16, 6, 5), (40, 16, 6, 1), (25, 10, 10, 3), (30, 7, 4, 7)])
def test_snapkv_matches_the_reference(s, budget, window, kernel):
    queries, keys = rand(B, HQ, window, D, seed=6), rand(B, HKV, s, D, seed=7)
    kept = P.snapkv(keys, queries, budget=budget, kernel_size=kernel, scale=SCALE)
    assert kept.shape == (B, HKV, budget)
    assert as_sets(kept) == snapkv_reference(queries, keys, budget, window, kernel)


def test_snapkv_selects_per_kv_head():
    """Different kv heads may keep different tokens (top-k per head, unlike TOVA)."""
    kept = P.snapkv(rand(1, HKV, 60, D, seed=8), rand(1, HQ, 8, D, seed=9), budget=16)
    assert not torch.equal(kept[0, 0], kept[0, 1])


# ---- TOVA -------------------------------------------------------------------------------------
def tova_reference(queries, keys, steps, budget):
    """TOVA, per batch row: after each step, while over budget, drop the token to which the step's
    last query gives the least attention averaged over all heads; one set shared by every head."""
    out = []
    for b in range(B):
        cache: list[int] = []
        start = 0
        for n in steps:
            cache += list(range(start, start + n))
            start += n
            t = start - 1
            score = {p: 0.0 for p in cache}
            for head in range(HQ):
                probs = softmax_row(queries[b, head, t], [keys[b, head // G, p] for p in cache])
                for p, prob in zip(cache, probs):
                    score[p] += prob / HQ
            cache = sorted(sorted(cache, key=lambda p: -score[p])[:budget]) if len(cache) > budget else cache
        out.append([set(cache)] * HKV)
    return out


def tova_pipeline(queries, keys, steps, budget):
    cached_k, positions, start = keys[:, :, :0], torch.empty(B, HKV, 0, dtype=torch.long), 0
    for n in steps:
        cached_k = torch.cat([cached_k, keys[:, :, start : start + n]], dim=2)
        positions = torch.cat([positions, torch.arange(start, start + n).expand(B, HKV, n)], dim=2)
        start += n
        kept = P.tova(cached_k, queries[:, :, start - 1 : start], budget=budget, scale=SCALE)
        cached_k, positions = P.gather_kept(cached_k, kept), P.gather_kept(positions, kept)
    return as_sets(positions)


@pytest.mark.parametrize("budget", [5, 9, 12])
def test_tova_matches_the_step_by_step_reference(budget):
    s = sum(STEPS)
    queries, keys = rand(B, HQ, s, D, seed=10), rand(B, HKV, s, D, seed=11)
    assert tova_pipeline(queries, keys, STEPS, budget) == tova_reference(queries, keys, STEPS, budget)


# ---- key norm ---------------------------------------------------------------------------------
def test_key_norm_keeps_the_lowest_norms():
    keys = rand(B, HKV, 30, D, seed=12)
    kept = P.key_norm(keys, budget=7)
    for b in range(B):
        for h in range(HKV):
            norms = [math.sqrt(sum(x * x for x in keys[b, h, p].tolist())) for p in range(30)]
            assert set(kept[b, h].tolist()) == set(sorted(range(30), key=lambda p: norms[p])[:7])


# ---- shared helpers ---------------------------------------------------------------------------
def test_kept_indices_are_sorted_and_gather_is_exact():
    keys = rand(B, HKV, 30, D, seed=13)
    kept = P.snapkv(keys, rand(B, HQ, 5, D, seed=14), budget=12)
    assert torch.equal(kept, kept.sort(dim=-1).values)
    gathered = P.gather_kept(keys, kept)
    for b in range(B):
        for h in range(HKV):
            assert torch.equal(gathered[b, h], keys[b, h, kept[b, h]])


def test_attention_probs_chunks_agree():
    """Blocks of queries (bounding memory) give the same rows as one block."""
    queries, keys = rand(B, HQ, 9, D, seed=15), rand(B, HKV, 20, D, seed=16)
    whole = torch.cat([p for _, p in P.attention_probs(queries, keys, chunk=100)], dim=2)
    parts = torch.cat([p for _, p in P.attention_probs(queries, keys, chunk=4)], dim=2)
    torch.testing.assert_close(whole, parts)
    torch.testing.assert_close(whole.sum(-1), torch.ones(B, HQ, 9, dtype=torch.float64))
    assert whole[0, 0, 0, 12:].abs().max() == 0  # query 0 sits at key 11 (bottom-right) and sees no later key


# --------------------------------------------------------------------------------------------
# K6: budgets per layer and head
# --------------------------------------------------------------------------------------------
def test_pyramid_budgets_follow_pyramidkv_rule():
    from attnzoo.cache.policies import pyramid_budgets

    # written out from PyramidKV's rule: prefix c = budget - window, top c // beta, bottom 2c - top
    budgets = pyramid_budgets(330, 4, 10_000, window=10, beta=20)
    c = 320
    top, bottom = c // 20, 2 * c - c // 20
    step = (bottom - top) // 3
    assert budgets == [bottom - i * step + 10 for i in range(4)]
    assert budgets[0] > budgets[-1] and abs(sum(budgets) / 4 - 330) <= step  # the same mean, up to rounding
    capped = pyramid_budgets(60, 2, 80, window=10)  # bottom capped at the 70 prefix keys
    assert capped[0] == 80 and capped[1] == 2 * 50 - 70 + 10
    with pytest.raises(ParameterError, match="budget"):
        pyramid_budgets(10, 4, 100, window=10)


def test_middle_full_layers():
    from attnzoo.cache.policies import middle_full_layers

    assert middle_full_layers(12) == [4, 5, 6, 7]
    assert middle_full_layers(1) == [0] and len(middle_full_layers(2)) == 1
    with pytest.raises(ParameterError, match="fraction"):
        middle_full_layers(4, fraction=0)


def test_moa_spans_and_per_head_recent():
    from attnzoo.cache.policies import moa_spans, per_head_recent

    spans = moa_spans(100, torch.tensor([4.0, 0.0, 500.0]), torch.tensor([0.1, 0.5, 0.0]))
    assert spans.tolist() == [14, 50, 100]
    keys = torch.randn(2, 3, 100, 4)
    keep = per_head_recent(keys, spans, n_sink=2)
    for h, span in enumerate(spans.tolist()):
        expected = torch.zeros(100, dtype=torch.bool)
        expected[100 - span :] = True
        expected[:2] = True
        assert torch.equal(keep[0, h], expected) and torch.equal(keep[1, h], expected)
    with pytest.raises(ShapeError, match="spans"):
        per_head_recent(keys, spans[:2])


def test_allocate_head_spans_is_the_greedy_marginal_gain_rule():
    from attnzoo.cache.policies import allocate_head_spans

    candidates = [2, 4, 8]
    captured = torch.tensor([[0.9, 0.95, 1.0], [0.1, 0.6, 1.0]])  # head 1 needs long spans, head 0 does not
    spans = allocate_head_spans(captured, candidates, total=10)
    # start (2, 2), used 4; gains per key: head0 0.025, head1 0.25 -> head1 to 4 (used 6);
    # then head0 0.025 vs head1 0.1 -> head1 to 8 (used 10): budget reached
    assert spans.tolist() == [2, 8]
    assert allocate_head_spans(captured, candidates, total=16).tolist() == [8, 8]
    assert allocate_head_spans(captured, candidates, total=4).tolist() == [2, 2]
    with pytest.raises(ParameterError, match="total"):
        allocate_head_spans(captured, candidates, total=3)
    with pytest.raises(ParameterError, match="candidates"):
        allocate_head_spans(captured, [4, 2, 8], total=10)
