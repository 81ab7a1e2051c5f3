"""Clustering / grouping attention (catalog S4): oracles written from the papers, one loop per query.

region_attention (RAT's R-MSA), kmeans_routing (Routing Transformer), token_centres (CATANet) and
the nn modules holding their learned centres (RoutingAttention, TokenCentreAttention).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.sparse.clustering import KMEANS_ROUTING, REGION, kmeans_routing_attention, region_attention

FAST = ("gathered", "grouped")


def _qkv(b=2, h=3, nq=37, nk=None, d=16, dv=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nk = nq if nk is None else nk
    return (torch.randn(b, h, nq, d, generator=gen, dtype=dtype), torch.randn(b, h, nk, d, generator=gen, dtype=dtype),
            torch.randn(b, h, nk, dv, generator=gen, dtype=dtype))


def _softmax_row(q_i, kv, scale):
    """One query against a list of (key, value) pairs, written out (float64): (output, log-sum-exp)."""
    keys, values = kv
    if not keys:
        return None, float("-inf")
    s = torch.stack([scale * torch.dot(q_i.double(), key.double()) for key in keys])
    w = torch.exp(s - s.max())
    out = (w[:, None] * torch.stack([x.double() for x in values])).sum(0) / w.sum()
    return out, float(s.max() + torch.log(w.sum()))


# --------------------------------------------------------------------------------------------
# region_attention
# --------------------------------------------------------------------------------------------
def _region_oracle(q, k, v, q_lab, k_lab, causal=False, pad=None):
    """For each query, the keys with its label (and j <= i + Nk - Nq when causal, and not padded)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, h, nq), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                js = [j for j in range(nk) if int(k_lab[bi, j]) == int(q_lab[bi, i]) and (not causal or j <= i + nk - nq)
                      and (pad is None or not bool(pad[bi, j]))]
                o, l_ = _softmax_row(q[bi, hi, i], ([k[bi, hi, j] for j in js], [v[bi, hi, j] for j in js]), d ** -0.5)
                if o is not None:
                    out[bi, hi, i], lse[bi, hi, i] = o, l_
    return out, lse


@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("causal", (False, True))
def test_region_matches_the_per_query_oracle(backend, causal):
    q, k, v = _qkv(nq=29)
    labels = torch.randint(0, 4, (2, 29), generator=torch.Generator().manual_seed(1))
    out, lse = region_attention(q, k, v, labels=labels, causal=causal, return_lse=True, backend=backend)
    want, want_lse = _region_oracle(q, k, v, labels, labels, causal)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_region_cross_attention_with_query_labels(backend):
    q, k, v = _qkv(nq=13, nk=31)
    gen = torch.Generator().manual_seed(2)
    k_lab, q_lab = torch.randint(0, 3, (2, 31), generator=gen), torch.randint(0, 4, (2, 13), generator=gen)  # label 3: no key has it
    for causal in (False, True):
        out, lse = region_attention(q, k, v, labels=k_lab, query_labels=q_lab, causal=causal, return_lse=True, backend=backend)
        want, want_lse = _region_oracle(q, k, v, q_lab, k_lab, causal)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-4)
    lonely = q_lab == 3
    assert lonely.any() and torch.all(out.transpose(1, 2)[lonely] == 0), "a query whose region has no key gets 0"


@pytest.mark.parametrize("backend", FAST)
def test_region_equals_dense_sdpa_with_the_boolean_mask(backend):
    q, k, v = _qkv(b=1, h=4, nq=300, d=32, dv=32)
    labels = torch.randint(0, 7, (1, 300), generator=torch.Generator().manual_seed(3))
    mask = labels[:, None, :, None] == labels[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(region_attention(q, k, v, labels=labels, backend=backend), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_region_one_label_is_softmax_attention(backend):
    q, k, v = _qkv(nq=40)
    out = region_attention(q, k, v, labels=torch.full((2, 40), 5), backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    causal = region_attention(q, k, v, labels=torch.full((2, 40), 5), causal=True, backend=backend)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("side", ("right", "left", "scattered"))
def test_region_padding_is_exact(backend, side):
    q, k, v = _qkv(b=2, nq=23, dtype=torch.float32)
    labels = torch.randint(0, 3, (2, 23), generator=torch.Generator().manual_seed(4))
    pad = torch.zeros(2, 23, dtype=torch.bool)
    if side == "right":
        pad[1, 15:] = True
    elif side == "left":
        pad[1, :8] = True
    else:
        pad[1, ::3] = True
    out = region_attention(q, k, v, labels=labels, key_padding_mask=pad, backend=backend)
    want, _ = _region_oracle(q, k, v, labels, labels, pad=pad)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    real = ~pad[1]
    alone = region_attention(q[1:, :, real], k[1:, :, real], v[1:, :, real], labels=labels[1:, real], backend=backend)
    torch.testing.assert_close(out[1:, :, real], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FAST)
def test_region_gradients_match_the_reference(backend):
    dtype = torch.float64 if backend == "grouped" else torch.float32
    q, k, v = (t.requires_grad_() for t in _qkv(nq=31, dtype=dtype))
    labels = torch.randint(0, 4, (2, 31), generator=torch.Generator().manual_seed(5))
    w = torch.randn(2, 3, 31, 8, dtype=dtype)
    grads = {}
    for name in ("reference", backend):
        out, lse = region_attention(q, k, v, labels=labels, causal=True, return_lse=True, backend=name)
        grads[name] = torch.autograd.grad((out * w).sum() + lse.sum(), (q, k, v))
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_region_bad_inputs_name_the_argument():
    q, k, v = _qkv(nq=10)
    with pytest.raises(ParameterError) as info:
        region_attention(q, k, v, labels=torch.zeros(2, 9, dtype=torch.long))
    assert info.value.argument == "labels"
    with pytest.raises(ParameterError) as info:
        region_attention(q, k, v, labels=torch.zeros(2, 10))  # float labels
    assert info.value.argument == "labels"
    q2, k2, v2 = _qkv(nq=6, nk=10)
    with pytest.raises(ParameterError) as info:
        region_attention(q2, k2, v2, labels=torch.zeros(2, 10, dtype=torch.long))
    assert info.value.argument == "query_labels"


def test_region_fast_backends_hold_no_n_by_n_tensor():
    assert not REGION.backends["gathered"].materializes_scores and not REGION.backends["grouped"].materializes_scores
    # 8192 tokens, 64 regions: an N x N float32 score matrix per head would be 256 MiB; the groups hold 1/64 of it
    q, k, v = _qkv(b=1, h=1, nq=8192, d=16, dv=16)
    labels = torch.randint(0, 64, (1, 8192), generator=torch.Generator().manual_seed(6))
    for backend in FAST:
        out = region_attention(q, k, v, labels=labels, backend=backend)
        rows = torch.tensor([0, 4000, 8191])
        for i in rows.tolist():
            keys = (labels[0] == labels[0, i]).nonzero().squeeze(1)
            p = torch.softmax(q[0, 0, i] @ k[0, 0, keys].T * 0.25, -1)
            torch.testing.assert_close(out[0, 0, i], p @ v[0, 0, keys], atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# kmeans_routing
# --------------------------------------------------------------------------------------------
def _cos(x, mu):
    return float(torch.dot(x.double(), mu.double()) / (x.double().norm() * mu.double().norm()))


def _kmeans_oracle(q, k, v, centroids, window, causal=False):
    """Balanced routing written out: per head and cluster, the window queries and keys of largest cosine
    (ties: lowest position), per query the mean of its per-cluster softmax outputs."""
    b, h, nq, d = q.shape
    nk, n_c = k.shape[2], centroids.shape[1]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            outs = {i: [] for i in range(nq)}
            for c in range(n_c):
                mu = centroids[hi, c]
                qs = sorted(range(nq), key=lambda i: (-_cos(q[bi, hi, i], mu), i))[: min(window, nq)]
                ks = sorted(range(nk), key=lambda j: (-_cos(k[bi, hi, j], mu), j))[: min(window, nk)]
                for i in qs:
                    js = [j for j in sorted(ks) if not causal or j <= i + nk - nq]
                    if js:
                        outs[i].append(_softmax_row(q[bi, hi, i], ([k[bi, hi, j] for j in js], [v[bi, hi, j] for j in js]), d ** -0.5)[0])
            for i, got in outs.items():
                if got:
                    out[bi, hi, i] = torch.stack(got).mean(0)
    return out


def _nearest_oracle(q, k, v, centroids, causal=False, pad=None):
    """Each token to its nearest centroid (cosine), a query attends the keys of its cluster."""
    b, h = q.shape[:2]
    out = torch.zeros(b, h, q.shape[2], v.shape[-1], dtype=torch.float64)
    for hi in range(h):
        n_c = centroids.shape[1]
        q_lab = torch.tensor([[max(range(n_c), key=lambda c: (_cos(q[bi, hi, i], centroids[hi, c]), -c)) for i in range(q.shape[2])] for bi in range(b)])
        k_lab = torch.tensor([[max(range(n_c), key=lambda c: (_cos(k[bi, hi, j], centroids[hi, c]), -c)) for j in range(k.shape[2])] for bi in range(b)])
        out[:, hi : hi + 1] = _region_oracle(q[:, hi : hi + 1], k[:, hi : hi + 1], v[:, hi : hi + 1], q_lab, k_lab, causal, pad)[0]
    return out


@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("causal", (False, True))
def test_kmeans_balanced_matches_the_per_cluster_oracle(backend, causal):
    q, k, v = _qkv(b=1, h=2, nq=26)
    centroids = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(7))
    out = kmeans_routing_attention(q, k, v, centroids=centroids, window=6, causal=causal, backend=backend)
    torch.testing.assert_close(out.double(), _kmeans_oracle(q, k, v, centroids, 6, causal), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_kmeans_cross_attention_routes_queries_and_keys_separately(backend):
    q, k, v = _qkv(b=1, h=2, nq=11, nk=30)
    centroids = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(8))
    out = kmeans_routing_attention(q, k, v, centroids=centroids, window=5, backend=backend)
    torch.testing.assert_close(out.double(), _kmeans_oracle(q, k, v, centroids, 5), atol=2e-5, rtol=1e-4)


def test_kmeans_a_query_in_no_cluster_gets_zero_and_in_two_the_mean():
    # two clusters on opposite axes; window 1: only the nearest query of each cluster is routed
    q = torch.tensor([[[[1.0, 0.0], [0.1, 1.0], [0.9, 0.1], [-1.0, 0.2]]]])
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]]]])
    v = torch.arange(8.0).view(1, 1, 4, 2)
    centroids = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    for backend in ("reference",) + FAST:
        out = kmeans_routing_attention(q, k, v, centroids=centroids, window=1, backend=backend)
        assert torch.equal(out[0, 0, 1], torch.zeros(2)) and torch.equal(out[0, 0, 2], torch.zeros(2)), "unrouted queries get 0"
        torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])  # cluster 0: query 0 with key 0 alone
        torch.testing.assert_close(out[0, 0, 3], v[0, 0, 2])  # cluster 1: query 3 with key 2 alone
    # one centroid, window 2, with the query nearest to it twice (a duplicate centroid): the mean of equal outputs
    twice = kmeans_routing_attention(q, k, v, centroids=torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), window=2)
    once = kmeans_routing_attention(q, k, v, centroids=torch.tensor([[[1.0, 0.0]]]), window=2)
    torch.testing.assert_close(twice, once)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_kmeans_one_cluster_holding_every_token_is_softmax(backend):
    q, k, v = _qkv(nq=33)
    centroids = torch.randn(3, 1, 16)
    out = kmeans_routing_attention(q, k, v, centroids=centroids, window=33, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    out = kmeans_routing_attention(q, k, v, centroids=centroids, window=None, causal=True, backend=backend)  # ceil(N / 1) = N
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("causal", (False, True))
def test_kmeans_nearest_centroid_routing(backend, causal):
    q, k, v = _qkv(b=2, h=2, nq=21)
    centroids = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(9))
    out = kmeans_routing_attention(q, k, v, centroids=centroids, balanced=False, causal=causal, backend=backend)
    torch.testing.assert_close(out.double(), _nearest_oracle(q, k, v, centroids, causal), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_kmeans_padding_exact_for_nearest_refused_for_balanced(backend):
    q, k, v = _qkv(b=2, h=2, nq=19)
    centroids = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(10))
    pad = torch.zeros(2, 19, dtype=torch.bool)
    pad[0, 12:] = True
    pad[1, :3] = True
    out = kmeans_routing_attention(q, k, v, centroids=centroids, balanced=False, key_padding_mask=pad, backend=backend)
    torch.testing.assert_close(out.double(), _nearest_oracle(q, k, v, centroids, pad=pad), atol=2e-5, rtol=1e-4)
    with pytest.raises(ParameterError) as info:
        kmeans_routing_attention(q, k, v, centroids=centroids, key_padding_mask=pad, backend=backend)
    assert info.value.argument == "key_padding_mask" and "balanced" in str(info.value)


def test_kmeans_selection_is_not_differentiable_attention_is():
    q, k, v = (t.double().requires_grad_() for t in _qkv(b=1, h=2, nq=24))
    centroids = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 24, 8, dtype=torch.float64)
    grads = {}
    for name in ("reference", "grouped"):
        out = kmeans_routing_attention(q, k, v, centroids=centroids, window=7, causal=True, backend=name)
        grads[name] = torch.autograd.grad((out * w).sum(), (q, k, v, centroids), allow_unused=True)
    assert grads["reference"][3] is None and grads["grouped"][3] is None, "no gradient reaches the centroids through the routing"
    for got, want in zip(grads["grouped"][:3], grads["reference"][:3]):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    assert grads["grouped"][0].abs().sum() > 0


def test_kmeans_bad_inputs_name_the_argument():
    q, k, v = _qkv(nq=10)
    for bad in (torch.zeros(2, 4, 16), torch.zeros(3, 4, 8), torch.zeros(3, 0, 16), "c"):
        with pytest.raises(ParameterError) as info:
            kmeans_routing_attention(q, k, v, centroids=bad)
        assert info.value.argument == "centroids"
    with pytest.raises(ParameterError) as info:
        kmeans_routing_attention(q, k, v, centroids=torch.randn(3, 2, 16), window=0)
    assert info.value.argument == "window"


def test_kmeans_sparsity_params_set_the_density():
    q, k, v = _qkv(b=1, h=2, nq=64)
    problem = KMEANS_ROUTING.describe(q, k, v)
    full = KMEANS_ROUTING.sparsity_params(problem, 1.0)
    torch.testing.assert_close(kmeans_routing_attention(q, k, v, **full), F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    quarter = KMEANS_ROUTING.sparsity_params(problem, 0.25)
    assert quarter["centroids"].shape[1] == 4 and quarter["window"] == 16


def test_kmeans_is_registered_and_exported():
    assert attnzoo.get("kmeans_routing") is KMEANS_ROUTING and attnzoo.get("region_attention") is REGION
    assert attnzoo.functional.sparse.region_attention is region_attention


# --------------------------------------------------------------------------------------------
# nn.RoutingAttention: online k-means
# --------------------------------------------------------------------------------------------
def _update_written_out(centroids, x, decay):
    """The paper's EMA, per head and centroid, over the unit-normalised tokens of the batch."""
    h, n_c, d = centroids.shape
    new = centroids.clone().double()
    for hi in range(h):
        tokens = [F.normalize(x[bi, hi, t].double(), dim=0) for bi in range(x.shape[0]) for t in range(x.shape[2])]
        owner = [max(range(n_c), key=lambda c: (_cos(t, centroids[hi, c]), -c)) for t in tokens]
        for c in range(n_c):
            mine = [t for t, o in zip(tokens, owner) if o == c]
            if mine:
                total = torch.stack(mine).sum(0)
                new[hi, c] = decay * centroids[hi, c].double() + (1 - decay) * total / total.norm()
    return new.to(centroids.dtype)


def test_routing_attention_layer_shapes_gradients_and_update_rule():
    from attnzoo.nn import RoutingAttention

    torch.manual_seed(0)
    layer = RoutingAttention(32, num_heads=2, num_clusters=3, window=8, decay=0.9)
    x = torch.randn(2, 20, 32, requires_grad=True)
    before = layer.centroids.clone()
    with torch.no_grad():
        q = layer.q_proj(x).view(2, 20, 2, 16).transpose(1, 2)
        k = layer.k_proj(x).view(2, 20, 2, 16).transpose(1, 2)
    want = _update_written_out(before, torch.cat([q, k], dim=2), 0.9)
    y = layer(x)
    assert y.shape == (2, 20, 32)
    torch.testing.assert_close(layer.centroids, want, atol=1e-6, rtol=1e-6)
    assert not torch.equal(layer.centroids, before), "training mode moves the centroids"
    # the commitment loss written out: commitment * mean ||x - mu_{c(x)}||^2 over normalised q and k
    tokens = F.normalize(torch.cat([q, k], dim=2), dim=-1)
    mu = F.normalize(before, dim=-1)
    owner = torch.einsum("bhnd,hcd->bhnc", tokens, mu).argmax(-1)
    routed = torch.stack([mu[hi][owner[:, hi]] for hi in range(2)], dim=1)
    torch.testing.assert_close(layer.aux_loss.detach(), 1e-4 * ((tokens - routed) ** 2).mean(), atol=1e-9, rtol=1e-5)
    (y.sum() + layer.aux_loss * 1e4).backward()
    assert x.grad is not None and layer.q_proj.weight.grad.abs().sum() > 0 and layer.k_proj.weight.grad.abs().sum() > 0
    layer.eval()
    frozen = layer.centroids.clone()
    layer(x)
    assert torch.equal(layer.centroids, frozen), "eval mode leaves the centroids"


def test_routing_attention_layer_bad_arguments():
    from attnzoo.nn import RoutingAttention

    for kwargs, name in (({"num_clusters": 0}, "num_clusters"), ({"num_clusters": 2, "decay": 1.0}, "decay"), ({"num_clusters": 2, "window": 0}, "window")):
        with pytest.raises(ParameterError) as info:
            RoutingAttention(32, 2, **kwargs)
        assert info.value.argument == name


# --------------------------------------------------------------------------------------------
# token_centres (CATANet)
# --------------------------------------------------------------------------------------------
from attnzoo.functional.sparse.clustering import TOKEN_CENTRES, token_centres_attention  # noqa: E402


def _centres_oracle(q, k, v, centres, group_size, groups=None, centre_values=None):
    """Per head: each token's group (given, or nearest centre of its key), the order sorted by (group,
    position), chunks of group_size; a query attends its chunk and the next; plus the centre softmax."""
    b, h, n, d = q.shape
    gs = min(group_size, n)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            if groups is not None:
                gid = [int(groups[bi, j]) for j in range(n)]
            else:
                gid = [max(range(centres.shape[1]), key=lambda m: (_cos(k[bi, hi, j], centres[hi, m]), -m)) for j in range(n)]
            order = sorted(range(n), key=lambda j: (gid[j], j))
            for place, i in enumerate(order):
                first = (place // gs) * gs
                js = order[first : first + 2 * gs]
                out[bi, hi, i] = _softmax_row(q[bi, hi, i], ([k[bi, hi, j] for j in js], [v[bi, hi, j] for j in js]), d ** -0.5)[0]
                if centre_values is not None:
                    m = centres.shape[1]
                    out[bi, hi, i] += _softmax_row(q[bi, hi, i], ([centres[hi, c] for c in range(m)], [centre_values[hi, c] for c in range(m)]), d ** -0.5)[0]
    return out


@pytest.mark.parametrize("backend", ("reference", "grouped"))
@pytest.mark.parametrize("group_size", (1, 4, 7, 40))
def test_token_centres_match_the_sorted_chunk_oracle(backend, group_size):
    q, k, v = _qkv(b=2, h=2, nq=23)
    gen = torch.Generator().manual_seed(11)
    centres, values = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 8, generator=gen)
    groups = torch.randint(0, 4, (2, 23), generator=gen)
    for kwargs in ({}, {"centre_values": values}, {"groups": groups, "centre_values": values}):
        out = token_centres_attention(q, k, v, centres=centres, group_size=group_size, backend=backend, **kwargs)
        want = _centres_oracle(q, k, v, centres, group_size, **kwargs)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ("reference", "grouped"))
def test_token_centres_one_chunk_is_softmax(backend):
    q, k, v = _qkv(nq=30)
    centres = torch.randn(3, 5, 16)
    out = token_centres_attention(q, k, v, centres=centres, group_size=30, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    problem = TOKEN_CENTRES.describe(q, k, v)
    full = TOKEN_CENTRES.sparsity_params(problem, 1.0)
    torch.testing.assert_close(token_centres_attention(q, k, v, backend=backend, **full), F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    assert TOKEN_CENTRES.sparsity_params(problem, 0.2)["group_size"] == 3  # 2 chunks of 3 = 20% of 30 keys


def test_token_centres_tokens_of_one_group_stay_together():
    # two groups given by hand, group_size = the size of a group: a query sees its own group and the next chunk only
    q, k, v = _qkv(b=1, h=1, nq=8)
    groups = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0]])
    out = token_centres_attention(q, k, v, centres=torch.randn(1, 2, 16), group_size=4, groups=groups)
    ones = groups[0] == 1  # the second chunk: it has no next chunk, so it attends its own group alone
    idx = ones.nonzero().squeeze(1)
    want = F.scaled_dot_product_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx])
    torch.testing.assert_close(out[:, :, idx], want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, :, ~ones], F.scaled_dot_product_attention(q[:, :, ~ones], k, v), atol=2e-5, rtol=1e-4)


def test_token_centres_gradients_reach_the_centres_through_the_inter_branch():
    q, k, v = (t.double().requires_grad_() for t in _qkv(b=1, h=2, nq=19))
    centres = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 19, 8, dtype=torch.float64)
    grads = {}
    for name in ("reference", "grouped"):
        out = token_centres_attention(q, k, v, centres=centres, group_size=5, centre_values=values, backend=name)
        grads[name] = torch.autograd.grad((out * w).sum(), (q, k, v, centres, values))
    for got, want in zip(grads["grouped"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    assert grads["grouped"][3].abs().sum() > 0 and grads["grouped"][4].abs().sum() > 0


def test_token_centres_bad_inputs_name_the_argument():
    q, k, v = _qkv(nq=10)
    c = torch.randn(3, 4, 16)
    cases = (
        ({"centres": c, "group_size": 0}, "group_size"),
        ({"centres": c, "group_size": 4, "centre_values": torch.randn(3, 5, 8)}, "centre_values"),
        ({"centres": c, "group_size": 4, "key_padding_mask": torch.zeros(2, 10, dtype=torch.bool)}, "key_padding_mask"),
        ({"centres": c, "group_size": 4, "groups": torch.zeros(2, 10)}, "groups"),
        ({"centres": torch.randn(3, 4, 8), "group_size": 4}, "centres"),
    )
    for kwargs, name in cases:
        with pytest.raises(ParameterError) as info:
            token_centres_attention(q, k, v, **kwargs)
        assert info.value.argument == name


def _kmeans_step_written_out(x, centres):
    """CATANet's center_iter, token by token: normalised tokens to the nearest normalised centre,
    each centre the normalised sum of its tokens, or itself (normalised) when none joined."""
    cn = [F.normalize(c.double(), dim=0) for c in centres]
    sums = [torch.zeros_like(c) for c in cn]
    joined = [0] * len(cn)
    for token in x.reshape(-1, x.shape[-1]):
        t = F.normalize(token.double(), dim=0)
        m = max(range(len(cn)), key=lambda i: (float(torch.dot(t, cn[i])), -i))
        sums[m] += t
        joined[m] += 1
    return torch.stack([s / s.norm() if n else c for s, n, c in zip(sums, joined, cn)]).to(centres.dtype)


def test_token_centre_attention_layer_update_rule():
    from attnzoo.nn import TokenCentreAttention

    torch.manual_seed(1)
    layer = TokenCentreAttention(16, num_heads=2, num_centres=3, group_size=4, qk_dim=8, n_iter=2, decay=0.9)
    x = torch.randn(2, 12, 16, requires_grad=True)
    # first call: centres start as the means of 3 contiguous chunks of 4 tokens, then 2 k-means steps, copied
    start = torch.stack([x.detach()[:, 4 * i : 4 * i + 4].mean((0, 1)) for i in range(3)])
    refined = _kmeans_step_written_out(x.detach(), _kmeans_step_written_out(x.detach(), start))
    y = layer(x)
    assert y.shape == (2, 12, 16) and bool(layer.initted)
    torch.testing.assert_close(layer.centres, refined, atol=1e-6, rtol=1e-6)
    # the groups of the attention are the nearest refined centres; the inter branch uses their projections
    groups = torch.einsum("bnc,mc->bnm", F.normalize(x.detach(), dim=-1), F.normalize(refined, dim=-1)).argmax(-1)
    q = layer.to_q(x).view(2, 12, 2, 4).transpose(1, 2)
    k = layer.to_k(x).view(2, 12, 2, 4).transpose(1, 2)
    v = layer.to_v(x).view(2, 12, 2, 8).transpose(1, 2)
    ck = layer.centre_k(refined).view(3, 2, 4).transpose(0, 1)
    cv = layer.centre_v(refined).view(3, 2, 8).transpose(0, 1)
    want = layer.proj(token_centres_attention(q, k, v, centres=ck, group_size=4, groups=groups, centre_values=cv).transpose(1, 2).reshape(2, 12, 16))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # second call: the EMA of the buffer and this batch's refined centres
    x2 = torch.randn(2, 12, 16)
    before = layer.centres.clone()
    refined2 = _kmeans_step_written_out(x2, _kmeans_step_written_out(x2, before))
    layer(x2)
    torch.testing.assert_close(layer.centres, 0.9 * before + 0.1 * refined2, atol=1e-6, rtol=1e-6)
    y.sum().backward()
    assert layer.centre_k.weight.grad.abs().sum() > 0 and layer.to_q.weight.grad.abs().sum() > 0 and x.grad is not None
    layer.eval()
    frozen = layer.centres.clone()
    layer(x2)
    assert torch.equal(layer.centres, frozen), "eval mode leaves the centres"


# --------------------------------------------------------------------------------------------
# histogram_bins (Histoformer)
# --------------------------------------------------------------------------------------------
from attnzoo.functional.sparse.clustering import HISTOGRAM, histogram_attention  # noqa: E402


def _histogram_oracle(q, k, v, bins, mode, intensity=None, pad=None):
    """Per head: the real tokens sorted by intensity (ties by position), place r -> bin r // ceil(n / bins)
    or r % bins, a query attends the keys of its bin."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        real = [j for j in range(n) if pad is None or not bool(pad[bi, j])]
        size = max(1, math.ceil(len(real) / bins))
        for hi in range(h):
            key = {j: float(intensity[bi, j]) if intensity is not None else float(v[bi, hi, j].double().mean()) for j in real}
            order = sorted(real, key=lambda j: (key[j], j))
            bin_of = {j: (r // size if mode == "bin" else r % bins) for r, j in enumerate(order)}
            for i in real:
                js = [j for j in real if bin_of[j] == bin_of[i]]
                out[bi, hi, i] = _softmax_row(q[bi, hi, i], ([k[bi, hi, j] for j in js], [v[bi, hi, j] for j in js]), d ** -0.5)[0]
    return out


@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("mode", ("bin", "frequency"))
@pytest.mark.parametrize("bins", (1, 3, 8))
def test_histogram_matches_the_sorted_bins_oracle(backend, mode, bins):
    q, k, v = _qkv(b=2, h=2, nq=22)
    out = histogram_attention(q, k, v, bins=bins, mode=mode, backend=backend)
    torch.testing.assert_close(out.double(), _histogram_oracle(q, k, v, bins, mode), atol=2e-5, rtol=1e-4)
    intensity = torch.rand(2, 22, generator=torch.Generator().manual_seed(12))
    out = histogram_attention(q, k, v, bins=bins, mode=mode, intensity=intensity, backend=backend)
    torch.testing.assert_close(out.double(), _histogram_oracle(q, k, v, bins, mode, intensity), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FAST)
def test_histogram_equals_dense_sdpa_with_the_bin_mask(backend):
    q, k, v = _qkv(b=1, h=2, nq=256, d=32, dv=32)
    intensity = torch.randn(1, 256, generator=torch.Generator().manual_seed(13))
    rank = torch.argsort(torch.argsort(intensity[0]))  # no ties
    for mode, bin_of in (("bin", rank // 64), ("frequency", rank % 4)):
        mask = bin_of[:, None] == bin_of[None, :]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = histogram_attention(q, k, v, bins=4, mode=mode, intensity=intensity, backend=backend)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # a 'bin' bin holds tokens of neighbouring intensity; a 'frequency' bin spans the whole range
    low, high = rank < 64, rank >= 192
    freq_mask = (rank % 4)[:, None] == (rank % 4)[None, :]
    assert (freq_mask & low[:, None] & high[None, :]).any() and not ((rank // 64)[:, None] == (rank // 64)[None, :])[low][:, high].any()


@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("mode", ("bin", "frequency"))
def test_histogram_one_bin_is_softmax_and_padding_is_exact(backend, mode):
    q, k, v = _qkv(nq=27)
    torch.testing.assert_close(histogram_attention(q, k, v, bins=1, mode=mode, backend=backend), F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    pad = torch.zeros(2, 27, dtype=torch.bool)
    pad[0, 20:] = True
    pad[1, ::4] = True
    out = histogram_attention(q, k, v, bins=3, mode=mode, key_padding_mask=pad, backend=backend)
    torch.testing.assert_close(out.double(), _histogram_oracle(q, k, v, 3, mode, pad=pad), atol=2e-5, rtol=1e-4)
    for bi in range(2):
        real = ~pad[bi]
        alone = histogram_attention(q[bi : bi + 1, :, real], k[bi : bi + 1, :, real], v[bi : bi + 1, :, real], bins=3, mode=mode, backend=backend)
        torch.testing.assert_close(out[bi : bi + 1, :, real], alone, atol=2e-5, rtol=1e-4)


def test_histogram_sparsity_and_bad_inputs():
    q, k, v = _qkv(nq=40)
    problem = HISTOGRAM.describe(q, k, v)
    assert HISTOGRAM.sparsity_params(problem, 1.0) == {"bins": 1} and HISTOGRAM.sparsity_params(problem, 0.125) == {"bins": 8}
    for kwargs, name in (({"bins": 0}, "bins"), ({"bins": 2, "mode": "box"}, "mode"), ({"bins": 2, "intensity": torch.zeros(2, 39)}, "intensity")):
        with pytest.raises(ParameterError) as info:
            histogram_attention(q, k, v, **kwargs)
        assert info.value.argument == name
