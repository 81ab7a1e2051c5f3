"""Core Context Aware attention (S7, CCA-Attention, ICML 2025): an oracle written out from the paper,
query by query, against both backends; the limits (window >= N: softmax; g = 1: every past token
its own core); the window's shape; gradients; bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.sparse import core_context_attention
from attnzoo.functional.sparse.core_context import pooled_groups

BACKENDS = ("reference", "chunked")


def _qkv(b, hq, hkv, n, d=8, dv=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, d, generator=gen, dtype=dtype), torch.randn(b, hkv, n, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, n, dv, generator=gen, dtype=dtype))


def _oracle(q, k, v, g, w, scale=None):
    """Sec. 3 of the paper, one query at a time: pool each complete group before the window with its
    last query, then one softmax over [those cores; the raw tokens from the first unpooled group to i]."""
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for h in range(hq):
            K, V, Q = k[bi, h // group], v[bi, h // group], q[bi, h]
            for i in range(n):
                pooled = max(0, math.floor((i + 1 - w) / g))
                keys, values = [], []
                for p in range(pooled):
                    lo, hi = p * g, (p + 1) * g
                    weights = torch.softmax(scale * (K[lo:hi] @ Q[hi - 1]), 0)
                    keys.append(weights @ K[lo:hi])
                    values.append(weights @ V[lo:hi])
                for j in range(pooled * g, i + 1):
                    keys.append(K[j])
                    values.append(V[j])
                att = torch.softmax(scale * (torch.stack(keys) @ Q[i]), 0)
                out[bi, h, i] = att @ torch.stack(values)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, g, w", [(1, 4, 3), (23, 4, 5), (40, 3, 1), (70, 8, 20), (33, 1, 2)])
def test_matches_the_paper_query_by_query(backend, n, g, w):
    q, k, v = _qkv(2, 4, 2, n, seed=n + g + w)
    want = _oracle(q, k, v, g, w)
    got = core_context_attention(q, k, v, group_size=g, window=w, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_covering_the_sequence_is_causal_softmax(backend):
    q, k, v = _qkv(1, 2, 2, 50, seed=3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = core_context_attention(q, k, v, group_size=7, window=50, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_of_one_are_softmax(backend):
    """g = 1: a core is its token (weight softmax of one score = 1), so every key is seen as itself."""
    q, k, v = _qkv(1, 2, 1, 30, seed=4)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1), is_causal=True)
    got = core_context_attention(q, k, v, group_size=1, window=3, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_the_raw_window_is_group_aligned_and_the_cores_cover_the_rest():
    g, w = 8, 20
    i = torch.arange(200)
    m = pooled_groups(i, g, w)
    raw = i + 1 - m * g
    assert torch.all(raw[i + 1 >= w] >= w) and torch.all(raw[i + 1 >= w] <= w + g - 1)
    assert torch.all(raw[i + 1 < w] == (i + 1)[i + 1 < w])  # before a full window: everything raw
    assert m[199].item() == (200 - 20) // 8


def test_pooling_weights_follow_the_last_query():
    """A last query aligned with one key of its group puts (almost) all the pooling weight there."""
    q, k, v = _qkv(1, 1, 1, 24, d=4, seed=5)
    k[0, 0, 0:4] = 0.0
    k[0, 0, 1] = torch.tensor([40.0, 0.0, 0.0, 0.0])
    q[0, 0, 3] = torch.tensor([40.0, 0.0, 0.0, 0.0])  # last query of group 0 picks key 1
    from attnzoo.functional.sparse.core_context import core_tokens

    kc, vc, _ = core_tokens(q, k, v, 4, torch.ones(1, 24, dtype=torch.bool), 0.5)
    torch.testing.assert_close(vc[0, 0, 0], v[0, 0, 1], atol=1e-8, rtol=0)


def test_gradients_of_the_fast_path_match_the_oracle():
    q, k, v = _qkv(1, 2, 1, 26, seed=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    weight = torch.randn(1, 2, 26, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (core_context_attention(*leaves, group_size=3, window=4, backend="chunked") * weight).sum().backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    (_oracle(*ref, 3, 4) * weight).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-9, rtol=1e-8)


def test_right_padding_is_exact_and_left_padding_refused():
    q, k, v = _qkv(2, 2, 2, 30, seed=7)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 21:] = True
    out = core_context_attention(q, k, v, group_size=4, window=5, key_padding_mask=pad, backend="chunked")
    alone = core_context_attention(q[1:, :, :21], k[1:, :, :21], v[1:, :, :21], group_size=4, window=5)
    torch.testing.assert_close(out[1:, :, :21], alone, atol=1e-10, rtol=1e-9)
    with pytest.raises(ParameterError) as err:
        core_context_attention(q, k, v, group_size=4, window=5, key_padding_mask=pad.flip(-1))
    assert err.value.argument == "key_padding_mask"


@pytest.mark.parametrize("name, value", [("group_size", 0), ("group_size", 2.0), ("window", -1), ("window", "8")])
def test_bad_parameters_name_the_argument(name, value):
    q, k, v = _qkv(1, 1, 1, 10)
    with pytest.raises(ParameterError) as err:
        core_context_attention(q, k, v, **{name: value})
    assert err.value.argument == name and name in str(err.value)


def test_registered_with_sparsity_knob():
    mech = attnzoo.get("core_context")
    q, k, v = _qkv(1, 1, 1, 64)
    p = mech.describe(q, k, v)
    full = mech.sparsity_params(p, 1.0)
    torch.testing.assert_close(mech(q, k, v, **full), torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    half = mech.sparsity_params(p, 0.25)
    assert half["window"] < 64 and half["group_size"] > 1
