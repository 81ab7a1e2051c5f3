"""Oracles for the permuted block-sparse mechanisms: PBS-Attn (``pbs``) and PAROAttention (``paro``).

Each oracle is written from the paper (and its public code's rules), loop by loop, never by
calling the mechanism's reference backend.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.sparse.permuted import axis_permutation, paro_calibrate, pbs_permutation, pbs_selection

PBS = attnzoo.get("pbs")
PARO = attnzoo.get("paro")


def _qkv(b, hq, hkv, shape, d=16, dv=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, *shape, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, *shape, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, *shape, dv, generator=g, dtype=dtype),
    )


def _softmax_over(qi, keys, values, scale):
    s = torch.stack([scale * torch.dot(qi, kj) for kj in keys])
    p = torch.softmax(s, 0)
    return sum(pj * vj for pj, vj in zip(p, values))


# ============================================================================================
# PBS-Attn
# ============================================================================================
def _pbs_oracle(q, k, v, block, segment, tau):
    """PBS-Attn for one (batch, head), (N, D) tensors, written from Sec. 3 and the code's rules."""
    n, d = q.shape
    scale = d**-0.5
    full = n // segment
    # 1. sort each complete segment's keys by their mean softmax from the last query block
    perm = list(range(n))
    if full > 1 or (full == 1 and n > segment):
        m = full * segment
        last = q[max(0, n - block) :]
        score = [0.0] * m
        for qi in last:
            p = torch.softmax(torch.stack([scale * torch.dot(qi, k[j]) for j in range(m)]), 0)
            for j in range(m):
                score[j] += float(p[j]) / last.shape[0]
        perm = []
        for s in range(full):
            members = range(s * segment, (s + 1) * segment)
            perm += sorted(members, key=lambda j: (-score[j], j))
        perm += list(range(m, n))
    # 2. block selection on the permuted keys, outside the own segment
    nb = math.ceil(n / block)
    per = segment // block
    kept = {}
    for qb in range(nb):
        rows = range(qb * block, min(n, (qb + 1) * block))
        qm = sum(q[i] for i in rows) / len(rows)
        cands = [kb for kb in range(qb + 1) if kb // per != qb // per]
        chosen = set()
        if cands:
            means = []
            for kb in cands:
                members = perm[kb * block : min(n, (kb + 1) * block)]
                means.append(sum(k[j] for j in members) / len(members))
            p = torch.softmax(torch.stack([scale * torch.dot(qm, km) for km in means]), 0).tolist()
            if tau >= 1:
                chosen = set(cands)
            else:
                taken = 0.0
                for idx in sorted(range(len(cands)), key=lambda i: (-p[i], i)):
                    if taken >= tau * sum(p) or p[idx] <= 0:
                        break
                    chosen.add(cands[idx])
                    taken += p[idx]
            first = perm.index(0) // block
            if first in cands:
                chosen.add(first)
        kept[qb] = chosen
    # 3. each query: its segment causally + the kept permuted blocks
    out = torch.zeros(n, v.shape[-1], dtype=q.dtype)
    for i in range(n):
        keys = {j for j in range(n) if j // segment == i // segment and j <= i}
        for kb in kept[i // block]:
            keys |= set(perm[kb * block : min(n, (kb + 1) * block)])
        keys = sorted(keys)
        out[i] = _softmax_over(q[i], [k[j] for j in keys], [v[j] for j in keys], scale)
    return out


@pytest.mark.parametrize("n, block, segment, tau", [(40, 4, 8, 0.5), (37, 4, 12, 0.8), (30, 3, 3, 0.3), (24, 8, 8, 1.0)])
@pytest.mark.parametrize("backend", ["reference", "tiled", "fused"])
def test_pbs_matches_oracle(n, block, segment, tau, backend):
    q, k, v = _qkv(1, 2, 1, (n,), seed=n)
    dtype = torch.float32 if backend == "fused" else torch.float64
    out = PBS(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend, block_size=block, segment_size=segment, threshold=tau)
    kh, vh = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for h in range(2):
        want = _pbs_oracle(q[0, h], kh[0, h], vh[0, h], block, segment, tau)
        torch.testing.assert_close(out[0, h].double(), want, atol=1e-5 if backend == "fused" else 1e-10, rtol=1e-5 if backend == "fused" else 1e-8)


@pytest.mark.parametrize("backend", ["reference", "tiled", "fused"])
@pytest.mark.parametrize("n, block, segment", [(200, 16, 32), (130, 8, 24), (256, 64, 128)])
def test_pbs_threshold_one_is_causal_softmax(backend, n, block, segment):
    q, k, v = _qkv(2, 4, 2, (n,), seed=1)
    dtype = torch.float32 if backend == "fused" else torch.float64
    out, lse = PBS(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend, block_size=block, segment_size=segment, threshold=1.0, return_lse=True)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 16**-0.5
    want_lse = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    tol = dict(atol=1e-5, rtol=1e-5) if backend == "fused" else dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(lse.double(), want_lse, **tol)


def test_pbs_permutation_sorts_each_complete_segment():
    q, k, _ = _qkv(1, 1, 1, (50,), seed=3)
    perm = pbs_permutation(q, k, block_size=4, segment_size=16, scale=0.25)[0, 0]
    # a permutation inside each complete segment; the trailing 2 tokens stay in place
    for s in range(3):
        assert sorted(perm[s * 16 : (s + 1) * 16].tolist()) == list(range(s * 16, (s + 1) * 16))
    assert perm[48:].tolist() == [48, 49]
    probs = torch.softmax(q[0, 0, -4:] @ k[0, 0, :48].T * 0.25, -1).mean(0)
    for s in range(3):
        scores = probs[perm[s * 16 : (s + 1) * 16]]
        assert bool((scores[:-1] >= scores[1:]).all()), "keys of a segment not in decreasing score"
    assert not torch.equal(perm[:48], torch.arange(48)), "random keys came out already sorted"
    # one complete segment and nothing else: no permutation
    assert torch.equal(pbs_permutation(q[:, :, :16], k[:, :, :16], block_size=4, segment_size=16, scale=0.25)[0, 0], torch.arange(16))


def test_pbs_permutation_concentrates_vertical_lines():
    """The paper's motivation: heavy keys scattered over every block ("vertical lines") need every
    block unpermuted; sorted to the front of their segment, a few blocks hold the mass."""
    n, d, block, segment = 512, 16, 16, 128
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(d)
    u[0] = 1.0
    q = (3 * u + 0.1 * torch.randn(n, d, generator=g)).double()[None, None]
    k = (0.1 * torch.randn(n, d, generator=g)).double()
    k[3::16] += 12 * u  # one heavy key in every block of 16
    k = k[None, None]
    perm = pbs_permutation(q, k, block_size=block, segment_size=segment, scale=d**-0.5)
    kp = k.gather(2, perm[..., None].expand(-1, -1, -1, d))
    ident = torch.arange(n)[None, None]
    kept_sorted = pbs_selection(q, kp, perm, block_size=block, segment_size=segment, threshold=0.9, scale=d**-0.5).sum()
    kept_plain = pbs_selection(q, k, ident, block_size=block, segment_size=segment, threshold=0.9, scale=d**-0.5).sum()
    assert kept_sorted * 3 < kept_plain, (int(kept_sorted), int(kept_plain))


def test_pbs_gradients_match_reference():
    q, k, v = _qkv(1, 2, 1, (45,), seed=5)
    grads = {}
    for backend in ("reference", "tiled"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = PBS(*leaves, backend=backend, block_size=4, segment_size=8, threshold=0.6, return_lse=True)
        (out.sin().sum() + lse.sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["tiled"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert grads["tiled"][1].abs().sum() > 0


@pytest.mark.parametrize("kwargs, name", [
    ({"block_size": 4, "segment_size": 6}, "segment_size"),
    ({"threshold": 0.0}, "threshold"),
    ({"block_size": 0}, "block_size"),
    ({"key_padding_mask": torch.tensor([[False] * 30 + [True] * 2])}, "key_padding_mask"),
])
def test_pbs_bad_inputs_name_the_argument(kwargs, name):
    q, k, v = _qkv(1, 2, 2, (32,))
    with pytest.raises(ParameterError) as info:
        PBS(q, k, v, **kwargs)
    assert info.value.argument == name and name in str(info.value)


# ============================================================================================
# PAROAttention
# ============================================================================================
def _paro_oracle(q, k, v, shape, order, kept, block):
    """One (batch, head) on a grid: token i meets token j where their blocks, in the grid read in
    ``order``, form a kept pair; softmax over those keys (row-major in and out)."""
    n, d = q.shape
    sizes = [shape[a] for a in order]
    pos = {}
    for p_idx, coords in enumerate(itertools.product(*[range(s) for s in sizes])):
        grid = [0] * len(shape)
        for a, c in zip(order, coords):
            grid[a] = c
        flat = 0
        for a in range(len(shape)):
            flat = flat * shape[a] + grid[a]
        pos[flat] = p_idx
    out = torch.zeros(n, v.shape[-1], dtype=q.dtype)
    for i in range(n):
        keys = [j for j in range(n) if kept[pos[i] // block, pos[j] // block]]
        if keys:
            out[i] = _softmax_over(q[i], [k[j] for j in keys], [v[j] for j in keys], d**-0.5)
    return out


def _calibration_oracle(q, k, shape, block, tau):
    """Per head: post-softmax block masses under every axis order, mass rule per query block, the
    order keeping the fewest blocks (first on ties)."""
    n, d = q.shape
    p = torch.softmax(q @ k.T * d**-0.5, -1)
    nb = math.ceil(n / block)
    best = None
    for order in itertools.permutations(range(len(shape))):
        perm = torch.arange(n).view(*shape).permute(*order).flatten().tolist()
        pos = [0] * n
        for idx, t in enumerate(perm):
            pos[t] = idx
        mass = [[0.0] * nb for _ in range(nb)]
        for i in range(n):
            for j in range(n):
                mass[pos[i] // block][pos[j] // block] += float(p[i, j])
        kept = torch.zeros(nb, nb, dtype=torch.bool)
        for r in range(nb):
            taken = 0.0
            for c in sorted(range(nb), key=lambda c: (-mass[r][c], c)):
                if taken >= tau * sum(mass[r]) or mass[r][c] <= 0:
                    break
                kept[r, c] = True
                taken += mass[r][c]
        if best is None or int(kept.sum()) < int(best[1].sum()):
            best = (order, kept)
    return best


@pytest.mark.parametrize("backend", ["reference", "tiled", "fused"])
@pytest.mark.parametrize("shape, block", [((3, 4, 5), 8), ((6, 5), 7)])
def test_paro_given_orders_and_mask_match_oracle(backend, shape, block):
    q, k, v = _qkv(1, 2, 1, shape, seed=2)
    n = math.prod(shape)
    nb = math.ceil(n / block)
    orders = [tuple(reversed(range(len(shape)))), tuple(range(len(shape)))]
    mask = torch.rand(2, nb, nb, generator=torch.Generator().manual_seed(4)) < 0.4
    mask |= torch.eye(nb, dtype=torch.bool)
    dtype = torch.float32 if backend == "fused" else torch.float64
    out = PARO(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend, block_size=block, orders=orders, block_mask=mask)
    for h in range(2):
        want = _paro_oracle(q[0, h].flatten(0, -2), k[0, 0].flatten(0, -2), v[0, 0].flatten(0, -2), shape, orders[h], mask[h], block)
        tol = dict(atol=1e-5, rtol=1e-5) if backend == "fused" else dict(atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(out[0, h].flatten(0, -2).double(), want, **tol)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_paro_calibration_matches_oracle(backend):
    shape, block, tau = (3, 3, 4), 6, 0.7
    q, k, v = _qkv(1, 2, 2, shape, seed=8)
    out = PARO(q, k, v, backend=backend, block_size=block, threshold=tau)
    orders, masks = [], []
    for h in range(2):
        order, kept = _calibration_oracle(q[0, h].flatten(0, -2), k[0, h].flatten(0, -2), shape, block, tau)
        orders.append(order)
        masks.append(kept)
        want = _paro_oracle(q[0, h].flatten(0, -2), k[0, h].flatten(0, -2), v[0, h].flatten(0, -2), shape, order, kept, block)
        torch.testing.assert_close(out[0, h].flatten(0, -2), want, atol=1e-10, rtol=1e-8)
    got_orders, got_mask = paro_calibrate(q, k, block_size=block, threshold=tau)
    assert got_orders == orders
    assert torch.equal(got_mask, torch.stack(masks))


def test_paro_picks_the_order_that_makes_temporal_attention_blocky():
    """Attention among the frames of one pixel (a temporal head) is strided in row-major order;
    with F innermost it is block-diagonal, and the calibration finds that order."""
    f, hs, w, d = 4, 4, 4, 32
    g = torch.Generator().manual_seed(0)
    pixel = torch.randn(hs * w, d, generator=g).double() * 3
    x = pixel.repeat(f, 1).view(1, 1, f, hs, w, d)  # token (t, y, x) carries its pixel's vector
    orders, mask = paro_calibrate(x, x, block_size=4, threshold=0.9)
    assert orders == [(1, 2, 0)], orders  # (H, W, F): frames innermost, the first such order
    assert torch.equal(mask[0], torch.eye(16, dtype=torch.bool))
    perm = axis_permutation((f, hs, w), (1, 2, 0))
    assert perm[:4].tolist() == [0, 16, 32, 48]  # the 4 frames of pixel (0, 0) form block 0


@pytest.mark.parametrize("backend", ["reference", "tiled", "fused"])
@pytest.mark.parametrize("shape", [(3, 5, 4), (7, 6)])
def test_paro_threshold_one_is_softmax(backend, shape):
    q, k, v = _qkv(2, 4, 2, shape, seed=6)
    dtype = torch.float32 if backend == "fused" else torch.float64
    out = PARO(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend, block_size=8, threshold=1.0)
    flat = [t.flatten(2, -2) for t in (q, k, v)]
    want = F.scaled_dot_product_attention(flat[0], flat[1].repeat_interleave(2, 1), flat[2].repeat_interleave(2, 1)).view(out.shape)
    tol = dict(atol=1e-5, rtol=1e-5) if backend == "fused" else dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out.double(), want, **tol)


def test_paro_gradients_match_reference():
    q, k, v = _qkv(1, 2, 2, (3, 4, 4), seed=9)
    grads = {}
    for backend in ("reference", "tiled"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = PARO(*leaves, backend=backend, block_size=8, threshold=0.6)
        out.sin().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["tiled"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kwargs, name", [
    ({"block_mask": torch.ones(2, 8, 8, dtype=torch.bool)}, "block_mask"),
    ({"orders": [(0, 1, 2)]}, "orders"),
    ({"orders": [(0, 1, 1), (0, 1, 2)]}, "orders"),
    ({"orders": [(0, 1, 2)] * 2, "block_mask": torch.ones(2, 3, 3, dtype=torch.bool)}, "block_mask"),
    ({"threshold": 1.5}, "threshold"),
    ({"key_padding_mask": torch.zeros(1, 4, 4, 4, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True)}, "key_padding_mask"),
])
def test_paro_bad_inputs_name_the_argument(kwargs, name):
    q, k, v = _qkv(1, 2, 2, (4, 4, 4))
    with pytest.raises(ParameterError) as info:
        PARO(q, k, v, block_size=8, **kwargs)
    assert info.value.argument == name and name in str(info.value)
