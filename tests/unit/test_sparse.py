"""The content-dependent sparse family (S1-S3): selection rules, plans, and each method against an
oracle written out from its paper (the conformance suite already checks every backend against
the mechanism's own reference; here the references themselves are checked)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional import bilevel_routing_attention, moba_attention, topk_attention
from attnzoo.functional.sparse._select import dense_selection, mass_mask, selection_plan, sorted_mass_mask, sorted_top_k_mask, top_k_mask
from attnzoo.kernels import block_sparse

INF = float("inf")


def _qkv(*shape, d=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, d, generator=gen, dtype=dtype) for _ in range(3))


# --------------------------------------------------------------------------------------------
# selection rules
# --------------------------------------------------------------------------------------------
def test_top_k_keeps_exactly_k_with_lowest_index_ties():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -INF], [-INF, -INF, 0.5, -INF, -INF, -INF]])
    kept = top_k_mask(scores, 2)
    assert kept.tolist() == [[False, True, True, False, False, False], [False, False, True, False, False, False]]
    assert torch.equal(kept, sorted_top_k_mask(scores, 2))


@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_top_k_rules_agree_on_many_ties(k):
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (50, 20), generator=gen).double()  # small integers: ties everywhere
    scores[torch.rand(50, 20, generator=gen) < 0.2] = -INF
    fast, spec = top_k_mask(scores, k), sorted_top_k_mask(scores, k)
    assert torch.equal(fast, spec)
    assert torch.equal(fast.sum(-1), (scores > -INF).sum(-1).clamp(max=k))


def test_mass_rule_keeps_the_smallest_prefix_reaching_tau():
    w = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    kept = mass_mask(w, 0.6)
    # 0.4 + 0.3 = 0.7 >= 0.6; ties: the lowest indices first (0.25 * 3 = 0.75 >= 0.6); a zero row keeps nothing
    assert kept.tolist() == [[False, True, False, True], [True, True, True, False], [False, False, False, False]]
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 5, (40, 12), generator=gen).double()
    for tau in (0.1, 0.5, 0.9, 1.0):
        assert torch.equal(mass_mask(w, tau), sorted_mass_mask(w, tau))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_float32_gates_select_as_float64_even_on_near_ties(k):
    from attnzoo.functional.sparse._select import gate_top_k_mask

    gen = torch.Generator().manual_seed(k)
    q = torch.randn(2, 3, 200, 16, generator=gen)
    keys = torch.randn(2, 3, 8, 16, generator=gen, dtype=torch.float64)
    keys[:, :, 1] = keys[:, :, 0] * (1 + 1e-9)  # gates of blocks 0 and 1 agree to ~1e-9: float32 cannot order them
    keys[:, :, 2] = keys[:, :, 3]  # exact ties: lowest index first
    bias = torch.zeros(1, 1, 200, 8, dtype=torch.float64)
    bias[..., :50, 5:] = -INF  # rows with fewer than k candidates
    bias[..., 7] = INF
    want = top_k_mask(q.double() @ keys.transpose(-1, -2) + bias, k)
    assert torch.equal(gate_top_k_mask(q, keys, k, bias), want)


@pytest.mark.parametrize("block", [64, 128, 20])
@pytest.mark.parametrize("causal", [False, True])
def test_selection_plan_visits_exactly_the_selected_pairs(block, causal):
    nq = nk = 300
    gen = torch.Generator().manual_seed(block)
    selected = torch.rand(2, 3, nq, math.ceil(nk / block), generator=gen) < 0.4
    offset = 0 if causal else None
    plan = selection_plan(selected, block, nq, nk, offset)
    assert plan.pairs() == int(dense_selection(selected, block, nk, offset).sum())
    if block_sparse.native_usable(torch.device("cpu"), torch.float32):
        q, k, v = _qkv(2, 3, nq, dtype=torch.float32)
        out, _ = block_sparse.block_sparse_attention(q, k, v, plan)
        allowed = dense_selection(selected, block, nk, offset)
        want = attnzoo.softmax_attention(q, k, v, mask_mod=lambda b, h, i, j: allowed[b, h, i, j], backend="reference")
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# S1 top-k
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "gathered"])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_with_every_key_is_softmax(backend, causal):
    q, k, v = _qkv(2, 3, 37)
    got = topk_attention(q, k, v, top_k=37, causal=causal, backend=backend)
    torch.testing.assert_close(got, attnzoo.softmax_attention(q, k, v, causal=causal, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "gathered"])
def test_topk_matches_a_row_by_row_oracle_with_ties(backend):
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-2, 3, (1, 2, 9, 4), generator=gen).double()  # integer scores: many exact ties
    k = torch.randint(-2, 3, (1, 2, 15, 4), generator=gen).double()
    v = torch.randn(1, 2, 15, 5, generator=gen, dtype=torch.float64)
    got = topk_attention(q, k, v, top_k=4, scale=1.0, backend=backend)
    want = torch.empty_like(got)
    for h in range(2):
        for i in range(9):
            s = [float(q[0, h, i] @ k[0, h, j]) for j in range(15)]
            keep = sorted(range(15), key=lambda j: (-s[j], j))[:4]  # exactly 4, lowest index on ties
            w = torch.softmax(torch.tensor([s[j] for j in keep], dtype=torch.float64), 0)
            want[0, h, i] = (w[:, None] * v[0, h, keep]).sum(0)
    torch.testing.assert_close(got, want)


def test_topk_refuses_k_beyond_the_keys():
    q, k, v = _qkv(1, 2, 10)
    for bad in (11, 0):
        with pytest.raises(ParameterError) as info:
            topk_attention(q, k, v, top_k=bad)
        assert info.value.argument == "top_k"


# --------------------------------------------------------------------------------------------
# S2 MoBA
# --------------------------------------------------------------------------------------------
def _moba_oracle(q, k, v, block, top_k):
    """MoBA written per query (Eq. 5-6): gate = q . mean(block), own block forced, future excluded."""
    b_, h_, n, _ = q.shape
    out = torch.zeros(b_, h_, n, v.shape[-1], dtype=torch.float64)
    blocks = math.ceil(n / block)
    for b in range(b_):
        for h in range(h_):
            means = [k[b, h, s * block : (s + 1) * block].mean(0) for s in range(blocks)]
            for i in range(n):
                own = i // block
                gates = {s: float(q[b, h, i] @ means[s]) for s in range(own)}
                past = sorted(gates, key=lambda s: (-gates[s], s))[: top_k - 1]
                keys = [j for s in [own, *past] for j in range(s * block, min((s + 1) * block, n)) if j <= i]
                w = torch.softmax(q[b, h, i] @ k[b, h, keys].T / math.sqrt(q.shape[-1]), 0)
                out[b, h, i] = w @ v[b, h, keys]
    return out


@pytest.mark.parametrize("backend", ["reference", "fused", "tiled"])
@pytest.mark.parametrize("block, top_k", [(8, 2), (5, 3), (64, 2)])
def test_moba_matches_the_per_query_oracle(backend, block, top_k):
    n = 150 if block == 64 else 41
    q, k, v = _qkv(1, 2, n, seed=block)
    if backend == "fused" and not block_sparse.native_usable(q.device, torch.float32):
        pytest.skip("the C++ kernel is not built here")
    q32, k32, v32 = (x.float() for x in (q, k, v)) if backend == "fused" else (q, k, v)
    got = moba_attention(q32, k32, v32, block_size=block, top_k=top_k, backend=backend).double()
    torch.testing.assert_close(got, _moba_oracle(q, k, v, block, top_k), atol=2e-5 if backend == "fused" else 1e-7, rtol=1e-4)


def test_moba_with_every_block_is_causal_softmax():
    q, k, v = _qkv(2, 2, 33)
    got = moba_attention(q, k, v, block_size=4, top_k=9)
    torch.testing.assert_close(got.double(), attnzoo.softmax_attention(q, k, v, causal=True, backend="reference"), atol=2e-5, rtol=1e-4)


def test_moba_refuses_left_padding():
    q, k, v = _qkv(2, 2, 12)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, :3] = True
    with pytest.raises(ParameterError) as info:
        moba_attention(q, k, v, block_size=4, top_k=2, key_padding_mask=pad)
    assert info.value.argument == "key_padding_mask"


# --------------------------------------------------------------------------------------------
# S3 bi-level routing
# --------------------------------------------------------------------------------------------
def _biformer_oracle(q, k, v, n_win, top_k, scale):
    """BiFormer's arithmetic: region means by average pooling (its q_win.mean), adjacency over all
    heads' channels, top-k regions, then attention over the gathered tokens."""
    b, h, hs, ws, d = q.shape
    chw = lambda x: x.permute(0, 1, 4, 2, 3).reshape(b, h * d, hs, ws)  # noqa: E731
    q_r = F.avg_pool2d(chw(q), (hs // n_win, ws // n_win)).flatten(2).transpose(1, 2)  # (B, R, H*D)
    k_r = F.avg_pool2d(chw(k), (hs // n_win, ws // n_win)).flatten(2).transpose(1, 2)
    routed = torch.sort(q_r @ k_r.transpose(1, 2), dim=-1, descending=True, stable=True).indices[..., :top_k]
    region = lambda y, x: (y // (hs // n_win)) * n_win + x // (ws // n_win)  # noqa: E731
    out = torch.zeros(b, h, hs, ws, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for y in range(hs):
            for x in range(ws):
                keys = [(yy, xx) for yy in range(hs) for xx in range(ws) if region(yy, xx) in routed[bi, region(y, x)].tolist()]
                kk = torch.stack([k[bi, :, yy, xx] for yy, xx in keys], 1)  # (H, M, D)
                vv = torch.stack([v[bi, :, yy, xx] for yy, xx in keys], 1)
                w = torch.softmax(torch.einsum("hd,hmd->hm", q[bi, :, y, x], kk) * scale, -1)
                out[bi, :, y, x] = torch.einsum("hm,hmd->hd", w, vv)
    return out


@pytest.mark.parametrize("backend", ["reference", "gathered"])
def test_bilevel_routing_matches_biformer_arithmetic(backend):
    q, k, v = _qkv(2, 3, 6, 9, d=8)
    scale = (3 * 8) ** -0.5  # BiFormer's own scale (all heads' channels), passed explicitly
    got = bilevel_routing_attention(q, k, v, n_win=3, top_k=2, scale=scale, backend=backend)
    torch.testing.assert_close(got, _biformer_oracle(q, k, v, 3, 2, scale))


def test_bilevel_routing_with_every_region_is_softmax():
    q, k, v = _qkv(1, 2, 8, 8, d=8)
    got = bilevel_routing_attention(q, k, v, n_win=2, top_k=4, backend="gathered")
    want = attnzoo.softmax_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), backend="reference").view_as(got)
    torch.testing.assert_close(got, want)


def test_bilevel_routing_refusals_name_the_argument():
    q, k, v = _qkv(1, 2, 6, 9, d=8)
    for params, argument in ((dict(n_win=2, top_k=1), "n_win"), (dict(n_win=3, top_k=10), "top_k")):
        with pytest.raises(ParameterError) as info:
            bilevel_routing_attention(q, k, v, **params)
        assert info.value.argument == argument


# --------------------------------------------------------------------------------------------
# S2 XAttention
# --------------------------------------------------------------------------------------------
def _antidiagonal_mass_oracle(q, k, block, stride, scale, causal):
    """Sec. 2.1 written tile by tile: a_mn = sum_j q_{mS+S-1-j} . k_{nS+j}, softmax over n, block sums."""
    n = q.shape[0]
    tiles = n // stride
    a = torch.empty(tiles, tiles, dtype=torch.float64)
    for m in range(tiles):
        for t in range(tiles):
            a[m, t] = sum(float(q[m * stride + stride - 1 - j] @ k[t * stride + j]) for j in range(stride)) * scale / stride
    if causal:
        a = a.masked_fill(torch.ones(tiles, tiles, dtype=torch.bool).triu(1), -INF)
    p = torch.softmax(a, -1)
    per = block // stride
    return p.view(tiles // per, per, tiles // per, per).sum((1, 3))


@pytest.mark.parametrize("causal", [False, True])
def test_xattention_estimate_matches_the_antidiagonal_definition(causal):
    from attnzoo.functional.sparse.xattention import _reference_selection, xattention_selection

    q, k, _ = _qkv(1, 1, 48, d=4, seed=7)
    mass = _antidiagonal_mass_oracle(q[0, 0], k[0, 0], 12, 3, 0.5, causal)
    want = sorted_mass_mask(mass, 0.7)
    if causal:
        want = want | torch.eye(4, dtype=torch.bool)
        want[:, 0] = True
    kw = dict(block_size=12, stride=3, threshold=0.7, causal=causal, scale=0.5, key_padding_mask=None)
    assert torch.equal(_reference_selection(q, k, **kw)[0, 0], want)
    assert torch.equal(xattention_selection(q, k, **kw)[0, 0], want)


@pytest.mark.parametrize("backend", ["reference", "fused", "tiled"])
@pytest.mark.parametrize("causal", [False, True])
def test_xattention_at_tau_one_is_softmax(backend, causal):
    q, k, v = (x.float() for x in _qkv(2, 2, 100, seed=1))
    if backend == "fused" and not block_sparse.native_usable(q.device, q.dtype):
        pytest.skip("the C++ kernel is not built here")
    got = attnzoo.functional.xattention(q, k, v, block_size=16, stride=4, threshold=1.0, causal=causal, backend=backend)
    torch.testing.assert_close(got, attnzoo.softmax_attention(q, k, v, causal=causal, backend="reference"), atol=2e-5, rtol=1e-4)


def test_xattention_refusals_name_the_argument():
    q, k, v = _qkv(1, 2, 64)
    for params, argument in ((dict(block_size=12, stride=8), "block_size"), (dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold")):
        with pytest.raises(ParameterError) as info:
            attnzoo.functional.xattention(q, k, v, **params)
        assert info.value.argument == argument


# --------------------------------------------------------------------------------------------
# the error-vs-density sweep
# --------------------------------------------------------------------------------------------
def test_sparsity_sweep_is_exact_at_full_share_and_drops_mass_below_it(tmp_path):
    from attnzoo.bench.report import collect
    from attnzoo.bench.results import ResultStore
    from attnzoo.bench.sparsity import SparsityConfig, averaged, plot_sparsity, points, run_sparsity

    with ResultStore(tmp_path / "db.sqlite") as store:
        rows = run_sparsity(SparsityConfig(shares=(0.1, 1.0), sources=("random",), lengths=(256,), heads=2), store)
        stored = collect(store).sparsity
    assert {r.mechanism for r in rows} >= {"topk", "moba", "xattention", "bilevel_routing"}  # bilevel on a 16 x 16 grid
    unreadable = {"core_context", "landmark", "pyramid_sparse"}  # softmax over pooled / extra keys, or none
    for r in rows:
        if r.mechanism in unreadable:
            assert r.density is None and r.rel_error is not None and "cannot be read" in r.note, r
            continue
        assert r.note == "" and r.density is not None, r
        if r.share == 1.0:
            assert r.density == 1.0 and abs(r.mass - 1.0) < 1e-12 and r.rel_error < 1e-12, r
        else:
            assert r.density < 0.5 and r.mass < 1.0 and r.kl > 0 and r.rel_error > 1e-3, r
    topk = next(r for r in rows if r.mechanism == "topk" and r.share == 0.1)
    assert abs(topk.density - round(0.1 * 256) / 256) < 1e-12  # exactly top_k keys per query
    lines = averaged(points(rows))
    assert all(len(line) == 2 for line in lines.values())
    assert sorted((r["mechanism"], r["metrics"]["share"], str(r["metrics"]["mass"])) for r in stored) == sorted((r.mechanism, r.share, str(r.mass)) for r in rows)
    plot_sparsity(rows, str(tmp_path / "sparsity.png"))
    assert (tmp_path / "sparsity.png").stat().st_size > 0


def test_bench_sparsity_command(capsys):
    from attnzoo.cli import main

    assert main(["bench", "sparsity", "--source", "random", "--lengths", "64", "--heads", "1", "--shares", "0.5", "1", "--mechanisms", "topk"]) == 0
    out = capsys.readouterr().out
    assert "topk" in out and "mass kept" in out


# --------------------------------------------------------------------------------------------
# S2 MInference vertical-slash
# --------------------------------------------------------------------------------------------
def test_vertical_slash_line_scores_follow_algorithm_2():
    from attnzoo.functional.sparse.minference import _estimate, _last_rows, _line_scores

    q, k, _ = _qkv(1, 1, 12, d=4, seed=5)
    rows, exists = _last_rows(None, 1, 12, 4, q.device)
    a = _estimate(q, k, 0.5, rows, exists, None)
    vertical_want, slash_want = torch.zeros(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    for li, i in enumerate(range(8, 12)):  # the last 4 queries, causal softmax over keys <= i
        w = torch.softmax(torch.stack([q[0, 0, i] @ k[0, 0, j] * 0.5 for j in range(i + 1)]), 0)
        torch.testing.assert_close(a[0, 0, li, : i + 1], w)
        for j in range(i + 1):
            vertical_want[j] += w[j]
            slash_want[i - j] += w[j]
    for loop in (True, False):
        vertical, slash = _line_scores(a, rows, 12, by_diagonal_loop=loop)
        torch.testing.assert_close(vertical[0, 0], vertical_want)
        torch.testing.assert_close(slash[0, 0], slash_want)


@pytest.mark.parametrize("backend", ["reference", "fused", "tiled"])
def test_vertical_slash_with_every_column_is_causal_softmax(backend):
    q, k, v = (x.float() for x in _qkv(2, 2, 150, seed=2))
    if backend == "fused" and not block_sparse.native_usable(q.device, q.dtype):
        pytest.skip("the C++ kernel is not built here")
    got = attnzoo.functional.vertical_slash_attention(q, k, v, vertical_size=150, slash_size=1, last_q=8, backend=backend)
    torch.testing.assert_close(got, attnzoo.softmax_attention(q, k, v, causal=True, backend="reference"), atol=2e-5, rtol=1e-4)


def test_vertical_slash_plan_visits_exactly_the_pattern():
    from attnzoo.functional.sparse.minference import VerticalSlashMask, vs_plan

    gen = torch.Generator().manual_seed(0)
    n = 300
    vertical, slash = torch.rand(2, 3, n, generator=gen) < 0.05, torch.rand(2, 3, n, generator=gen) < 0.05
    plan = vs_plan(vertical, slash, n)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = VerticalSlashMask(vertical, slash)(torch.arange(2).view(2, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), i, j)
    assert plan.pairs() == int(want.sum())


# --------------------------------------------------------------------------------------------
# S2 NSA
# --------------------------------------------------------------------------------------------
def _nsa_oracle(q, k, v, block, top_n, window):
    """NSA per query with l = l' = d = ``block`` (fla's naive setting): compressed block b = selection block b."""
    _, h, n, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(1, h, n, v.shape[-1], dtype=torch.float64)

    def attend(qv, keys, values):
        if keys.shape[0] == 0:
            return torch.zeros(values.shape[-1], dtype=torch.float64)
        return torch.softmax(keys @ qv / math.sqrt(d), 0) @ values

    for kvh in range(k.shape[1]):
        km, vm = k[0, kvh], v[0, kvh]
        k_cmp = torch.stack([km[b * block : (b + 1) * block].mean(0) for b in range(n // block)])
        v_cmp = torch.stack([vm[b * block : (b + 1) * block].mean(0) for b in range(n // block)])
        for t in range(n):
            seen = [b for b in range(n // block) if (b + 1) * block - 1 <= t]
            importance = torch.zeros(math.ceil(n / block), dtype=torch.float64)
            for hq in range(kvh * group, (kvh + 1) * group):
                if seen:
                    importance[seen] += torch.softmax(k_cmp[seen] @ q[0, hq, t] / math.sqrt(d), 0)
            current = t // block
            forced = {0, current, max(current - 1, 0)}
            rank = sorted(range(current + 1), key=lambda b: (b not in forced, -float(importance[b]), b))[:top_n]
            sel = [j for b in rank for j in range(b * block, min((b + 1) * block, n)) if j <= t]
            for hq in range(kvh * group, (kvh + 1) * group):
                qv = q[0, hq, t]
                o_cmp = attend(qv, k_cmp[seen], v_cmp[seen]) if seen else torch.zeros(v.shape[-1], dtype=torch.float64)
                o_slc = attend(qv, km[sel], vm[sel])
                lo = max(0, t - window + 1)
                o_win = attend(qv, km[lo : t + 1], vm[lo : t + 1])
                out[0, hq, t] = o_cmp + o_slc + o_win
    return out


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_nsa_matches_the_per_query_oracle(backend):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 40, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    if backend == "fused" and not block_sparse.native_usable(q.device, torch.float32):
        pytest.skip("the C++ kernel is not built here")
    args = (q, k, v) if backend == "reference" else tuple(x.float() for x in (q, k, v))
    got = attnzoo.functional.nsa_attention(*args, block_size=8, compress_block=8, compress_stride=8, top_n=3, window=5, backend=backend)
    torch.testing.assert_close(got.double(), _nsa_oracle(q, k, v, 8, 3, 5), atol=1e-5 if backend == "fused" else 1e-10, rtol=1e-4)


def test_nsa_gates_weigh_the_branches():
    q, k, v = _qkv(1, 2, 50, seed=9)
    kw = dict(block_size=8, compress_block=8, compress_stride=4, top_n=2, window=6, backend="reference")
    ones = attnzoo.functional.nsa_attention(q, k, v, gates=torch.ones(1, 2, 50, 3, dtype=torch.float64), **kw)
    torch.testing.assert_close(ones, attnzoo.functional.nsa_attention(q, k, v, **kw))
    only_window = torch.zeros(1, 2, 50, 3, dtype=torch.float64)
    only_window[..., 2] = 1
    want = attnzoo.sliding_window_attention(q, k, v, window=(5, 0), causal=True, backend="reference")
    torch.testing.assert_close(attnzoo.functional.nsa_attention(q, k, v, gates=only_window, **kw), want)


# --------------------------------------------------------------------------------------------
# S2 FlexPrefill
# --------------------------------------------------------------------------------------------
def test_flexprefill_js_distance_and_the_pattern_choice():
    from attnzoo.functional.sparse.flexprefill import _js_distance, flexprefill_selection

    p, q = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)
    # JSD = 1/2 KL(p||m) + 1/2 KL(q||m), m = (.25, .5, .25): each KL = .5 ln 2 -> sqrt(.5 ln 2)
    torch.testing.assert_close(_js_distance(p, q), torch.tensor([math.sqrt(0.5 * math.log(2))], dtype=torch.float64))
    assert float(_js_distance(p, p)) == 0.0
    q_, k_, _ = _qkv(1, 2, 64, d=8, seed=3)
    k_[:, 0] = 0.0  # head 0: flat attention, estimate == truth (JS 0): query-aware
    k_[:, 1] *= 40.0  # head 1: peaked attention the block-pooled estimate cannot see
    chosen = flexprefill_selection(q_, k_, gamma=0.9, tau=0.1, block_size=8, scale=8**-0.5, key_padding_mask=None)
    assert chosen[0].tolist() == [[True, False]]


@pytest.mark.parametrize("backend", ["reference", "fused", "tiled"])
@pytest.mark.parametrize("tau", [1.0, 1e-9])  # every head query-aware / every head vertical-slash
def test_flexprefill_covering_all_the_mass_is_causal_softmax(backend, tau):
    q, k, v = (x.float() for x in _qkv(2, 2, 150, seed=6))
    if backend == "fused" and not block_sparse.native_usable(q.device, q.dtype):
        pytest.skip("the C++ kernel is not built here")
    got = attnzoo.flexprefill_attention(q, k, v, gamma=1.0, tau=tau, block_size=64, backend=backend)
    torch.testing.assert_close(got, attnzoo.softmax_attention(q, k, v, causal=True, backend="reference"), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# the BiFormer block (nn)
# --------------------------------------------------------------------------------------------
def test_biformer_block_is_qkv_routing_lce_and_projection():
    torch.manual_seed(0)
    block = attnzoo.nn.BiLevelRoutingAttention(dim=16, num_heads=2, n_win=3, topk=2, side_dwconv=3, biformer_scale=True).double()
    x = torch.randn(2, 6, 9, 16, dtype=torch.float64, requires_grad=True)
    y = block(x)
    q, k, v = block.qkv(x).reshape(2, 6, 9, 3, 2, 8).permute(3, 0, 4, 1, 2, 5)
    att = _biformer_oracle(q, k, v, 3, 2, 16**-0.5).permute(0, 2, 3, 1, 4).reshape(2, 6, 9, 16)
    lce = block.lce(v.permute(0, 1, 4, 2, 3).reshape(2, 16, 6, 9)).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, block.proj(att + lce))
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_biformer_block_pads_to_regions_and_masks_the_pads():
    block = attnzoo.nn.BiLevelRoutingAttention(dim=8, num_heads=2, n_win=4, topk=16, side_dwconv=None)
    x = torch.randn(1, 6, 7, 8)
    y = block(x)  # 6x7 padded to 8x8, pads masked: with every region routed it is softmax over the real tokens
    q, k, v = block.qkv(x).reshape(1, 42, 3, 2, 4).permute(2, 0, 3, 1, 4)
    want = block.proj(attnzoo.softmax_attention(q, k, v).permute(0, 2, 1, 3).reshape(1, 6, 7, 8))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ParameterError):
        attnzoo.nn.BiLevelRoutingAttention(dim=8, num_heads=3)


# --------------------------------------------------------------------------------------------
# S9 EViT token keep/fuse (nn)
# --------------------------------------------------------------------------------------------
def test_token_keep_fuse_follows_evit():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    attention = torch.softmax(torch.randn(2, 3, 11, 11, dtype=torch.float64), -1).requires_grad_()
    out, kept = attnzoo.nn.TokenKeepFuse(keep_rate=0.45)(x, attention)
    assert out.shape == (2, 1 + 5 + 1, 6)  # ceil(0.45 * 10) = 5 kept, one fused
    for b in range(2):
        cls = attention[b, :, 0, 1:].mean(0).detach()
        order = sorted(range(10), key=lambda j: (-float(cls[j]), j))
        assert kept[b].tolist() == order[:5]
        want = torch.cat([x[b, :1], x[b, 1:][order[:5]], (x[b, 1:][order[5:]] * cls[order[5:], None]).sum(0, keepdim=True)])
        torch.testing.assert_close(out[b], want)
    out.sum().backward()
    assert x.grad is not None and attention.grad is not None and attention.grad.abs().sum() > 0  # the fused token's weights


def test_token_keep_fuse_refusals_and_ties():
    prune = attnzoo.nn.TokenKeepFuse(keep_rate=0.5, fuse=False)
    x = torch.randn(1, 5, 3)
    out, kept = prune(x, torch.full((1, 4), 0.25))  # all tied: the lowest indices
    assert kept.tolist() == [[0, 1]] and out.shape == (1, 3, 3)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ParameterError):
            attnzoo.nn.TokenKeepFuse(keep_rate=bad)
    with pytest.raises(attnzoo.errors.ShapeError):
        prune(x, torch.zeros(1, 3))


# --------------------------------------------------------------------------------------------
# S2 SeerAttention: the learned gate, its distillation, the block-gated attention
# --------------------------------------------------------------------------------------------
def test_seer_gate_pools_and_normalizes_as_the_paper():
    torch.manual_seed(0)
    gate = attnzoo.nn.SeerAttentionGate(num_heads=2, head_dim=4, hidden=8, block_size=5).double()
    q, k = torch.randn(1, 2, 13, 4, dtype=torch.float64), torch.randn(1, 1, 13, 4, dtype=torch.float64)  # GQA key head
    with torch.no_grad():
        probs = gate(q, k, causal=True)
    assert probs.shape == (1, 2, 3, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 3, dtype=torch.float64))
    assert float(probs[..., 0, 1:].abs().sum()) == 0.0  # causal: no future block
    # Qavg / Kmaxminavg written out for head 1, query block 2 (tokens 10..12) against key block 0 (0..4)
    qg = q[0, 1, 10:13].mean(0) @ gate.q_proj[1]
    kb = k[0, 0, 0:5]
    kg = torch.cat([kb.amax(0), kb.amin(0), kb.mean(0)]) @ gate.k_proj[1]
    logits = torch.stack([qg @ (torch.cat([k[0, 0, s:e].amax(0), k[0, 0, s:e].amin(0), k[0, 0, s:e].mean(0)]) @ gate.k_proj[1]) for s, e in ((0, 5), (5, 10), (10, 13))]) / math.sqrt(8)
    torch.testing.assert_close(probs[0, 1, 2], torch.softmax(logits, 0))
    assert torch.isclose(logits[0], qg @ kg / math.sqrt(8))


def test_seer_distillation_target_and_training():
    torch.manual_seed(1)
    q, k, _ = _qkv(1, 2, 20, d=4, seed=2)
    target = attnzoo.nn.seer_distillation_target(q, k, block_size=4, causal=True)
    p = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), -INF), -1)
    pooled = p.view(1, 2, 5, 4, 5, 4).amax(dim=(3, 5)).float()
    torch.testing.assert_close(target, pooled / pooled.sum(-1, keepdim=True))
    assert float(attnzoo.nn.seer_distillation_loss(target, target)) == 0.0
    gate = attnzoo.nn.SeerAttentionGate(num_heads=2, head_dim=4, hidden=16, block_size=4)
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    qf, kf = q.float(), k.float()
    losses = []
    for _ in range(60):  # the gate learns the max-pooled map of a fixed input
        loss = attnzoo.nn.seer_distillation_loss(gate(qf, kf, causal=True), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("backend", ["reference", "fused", "tiled"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_gate_keeps_exactly_the_blocks_above_threshold(backend, causal):
    q, k, v = (x.float() for x in _qkv(1, 2, 200, seed=8))
    if backend == "fused" and not block_sparse.native_usable(q.device, q.dtype):
        pytest.skip("the C++ kernel is not built here")
    scores = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    got = attnzoo.block_gate_attention(q, k, v, block_scores=scores, threshold=0.4, block_size=64, causal=causal, backend=backend)
    keep = scores > 0.4
    if causal:
        keep = (keep & torch.ones(4, 4, dtype=torch.bool).tril()) | torch.eye(4, dtype=torch.bool)
    allowed = keep.repeat_interleave(64, 2).repeat_interleave(64, 3)[:, :, :200, :200]
    if causal:
        allowed = allowed & torch.ones(200, 200, dtype=torch.bool).tril()
    want = attnzoo.softmax_attention(q, k, v, mask_mod=lambda b, h, i, j: allowed[0, h, i, j], backend="reference")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
