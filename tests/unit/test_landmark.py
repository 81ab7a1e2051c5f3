"""Landmark Attention (S6, NeurIPS 2023): an oracle written out from the paper's grouped softmax,
query by query, against both backends (training form and top-k retrieval); the landmark's role
(it routes weight, it carries no value); one block is causal softmax; gradients; bad inputs."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.sparse import landmark_attention

BACKENDS = ("reference", "blockwise")


def _qkv(b, hq, hkv, n, d=8, dv=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, d, generator=gen, dtype=dtype), torch.randn(b, hkv, n, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, n, dv, generator=gen, dtype=dtype))


def _oracle(q, k, v, block_size, top_k=None, scale=None):
    """Sec. 3 of the paper, one query at a time. Blocks of block_size tokens + 1 landmark (the last
    position). Query i in block c: one softmax over its own block's tokens up to i (the own landmark
    left out) and the landmarks of earlier blocks (the top_k best of them if retrieving); a
    landmark's probability is shared among its block's tokens by the softmax within that block."""
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    p_len = block_size + 1
    out = torch.zeros(b, hq, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for h in range(hq):
            K, V, Q = k[bi, h // group], v[bi, h // group], q[bi, h]
            for i in range(n):
                c = i // p_len
                own = [j for j in range(c * p_len, i + 1) if j % p_len != block_size]
                blocks = list(range(c))  # earlier blocks are complete: their landmark exists
                landmark_score = {blk: float((scale * Q[i] @ K[blk * p_len + block_size]).detach()) for blk in blocks}
                if top_k is not None:
                    blocks = sorted(blocks, key=lambda blk: (-landmark_score[blk], blk))[:top_k]
                logits = [scale * Q[i] @ K[j] for j in own] + [scale * Q[i] @ K[blk * p_len + block_size] for blk in blocks]
                probs = torch.softmax(torch.stack(logits), 0)
                acc = sum(probs[t] * V[j] for t, j in enumerate(own))
                for t, blk in enumerate(blocks):
                    members = list(range(blk * p_len, blk * p_len + block_size))
                    inner = torch.softmax(torch.stack([scale * Q[i] @ K[j] for j in members]), 0)
                    acc = acc + probs[len(own) + t] * sum(inner[u] * V[j] for u, j in enumerate(members))
                out[bi, h, i] = acc
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, block_size, top_k", [(1, 3, None), (23, 3, None), (40, 4, 1), (40, 4, 2), (61, 2, 3), (30, 1, None), (45, 7, 9)])
def test_matches_the_paper_query_by_query(backend, n, block_size, top_k):
    q, k, v = _qkv(2, 4, 2, n, seed=n + block_size)
    want = _oracle(q, k, v, block_size, top_k)
    got = landmark_attention(q, k, v, block_size=block_size, top_k=top_k, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_block_is_causal_softmax(backend):
    q, k, v = _qkv(1, 2, 2, 30, seed=2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = landmark_attention(q, k, v, block_size=30, backend=backend)  # no landmark inside N
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_landmarks_route_weight_but_carry_no_value(backend):
    q, k, v = _qkv(1, 2, 2, 40, seed=3)
    landmarks = torch.arange(40) % 5 == 4
    v2 = v.clone()
    v2[:, :, landmarks] = 100.0
    a = landmark_attention(q, k, v, block_size=4, backend=backend)
    torch.testing.assert_close(landmark_attention(q, k, v2, block_size=4, backend=backend), a, atol=1e-12, rtol=0)
    k2 = k.clone()
    k2[:, :, 4] += 3.0  # the first landmark's key: every query after block 0 changes
    b = landmark_attention(q, k2, v, block_size=4, backend=backend)
    assert torch.equal(b[:, :, :5], a[:, :, :5])
    assert (b[:, :, 5:] - a[:, :, 5:]).abs().amax(-1).gt(1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_reads_only_the_blocks_of_the_best_landmarks(backend):
    """top_k = 1: the last query reads its own block and the one block whose landmark key matches it."""
    q, k, v = _qkv(1, 1, 1, 30, d=4, seed=4)
    q[0, 0, -1] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    k[0, 0, 4::5] = 0.0
    k[0, 0, 14] = torch.tensor([5.0, 0.0, 0.0, 0.0])  # landmark of block 2 (positions 10..14)
    base = landmark_attention(q, k, v, block_size=4, top_k=1, backend=backend)[0, 0, -1]
    other = v.clone()
    other[0, 0, 0:4] += 10.0  # block 0, not retrieved
    torch.testing.assert_close(landmark_attention(q, k, other, block_size=4, top_k=1, backend=backend)[0, 0, -1], base, atol=1e-12, rtol=0)
    chosen = v.clone()
    chosen[0, 0, 10:14] += 10.0  # block 2, retrieved
    assert (landmark_attention(q, k, chosen, block_size=4, top_k=1, backend=backend)[0, 0, -1] - base).abs().min() > 1.0


def test_top_k_covering_every_block_is_the_training_form():
    q, k, v = _qkv(1, 2, 1, 50, seed=5)
    torch.testing.assert_close(landmark_attention(q, k, v, block_size=4, top_k=10), landmark_attention(q, k, v, block_size=4))


def test_gradients_of_the_fast_path_match_the_oracle():
    q, k, v = _qkv(1, 2, 1, 27, seed=6)
    weight = torch.randn(1, 2, 27, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for top_k in (None, 2):
        fast = [t.clone().requires_grad_() for t in (q, k, v)]
        (landmark_attention(*fast, block_size=3, top_k=top_k, backend="blockwise") * weight).sum().backward()
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        (_oracle(*ref, 3, top_k) * weight).sum().backward()
        for got, want in zip(fast, ref):
            torch.testing.assert_close(got.grad, want.grad, atol=1e-9, rtol=1e-8)


def test_right_padding_is_exact_and_left_padding_refused():
    q, k, v = _qkv(2, 2, 2, 30, seed=7)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 17:] = True
    out = landmark_attention(q, k, v, block_size=3, top_k=2, key_padding_mask=pad, backend="blockwise")
    alone = landmark_attention(q[1:, :, :17], k[1:, :, :17], v[1:, :, :17], block_size=3, top_k=2)
    torch.testing.assert_close(out[1:, :, :17], alone, atol=1e-10, rtol=1e-9)
    with pytest.raises(ParameterError) as err:
        landmark_attention(q, k, v, block_size=3, key_padding_mask=pad.flip(-1))
    assert err.value.argument == "key_padding_mask"


@pytest.mark.parametrize("name, value", [("block_size", 0), ("block_size", 3.0), ("top_k", 0), ("top_k", True), ("top_k", "2")])
def test_bad_parameters_name_the_argument(name, value):
    q, k, v = _qkv(1, 1, 1, 10)
    with pytest.raises(ParameterError) as err:
        landmark_attention(q, k, v, **{name: value})
    assert err.value.argument == name and name in str(err.value)


def test_sparsity_knob_sets_the_retrieved_blocks():
    mech = attnzoo.get("landmark")
    q, k, v = _qkv(1, 1, 1, 160)
    p = mech.describe(q, k, v)
    assert mech.sparsity_params(p, 1.0)["top_k"] is None
    assert mech.sparsity_params(p, 0.25)["top_k"] == 4
