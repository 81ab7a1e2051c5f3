"""Score-level variants (catalog V2): each against its paper's formula written out per query."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError


def _qkv(b=2, h=2, n=12, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))


def _loop(q, k, v, phi, causal):
    out = torch.zeros_like(q[..., : v.shape[-1]])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                for j in range(k.shape[2]):
                    if causal and j > i + k.shape[2] - q.shape[2]:
                        continue
                    out[b, h, i] += phi(float(q[b, h, i] @ k[b, h, j]) / math.sqrt(q.shape[-1])) * v[b, h, j]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_sigmoid_is_ramapuram_formula_with_minus_log_n(causal, backend):
    q, k, v = _qkv()
    want = _loop(q, k, v, lambda s: 1 / (1 + math.exp(-(s - math.log(12)))), causal)
    torch.testing.assert_close(attnzoo.sigmoid_attention(q, k, v, causal=causal, backend=backend), want)
    want_b = _loop(q, k, v, lambda s: 1 / (1 + math.exp(-(s + 0.5))), causal)
    torch.testing.assert_close(attnzoo.sigmoid_attention(q, k, v, causal=causal, bias=0.5, backend=backend), want_b)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_relu_divides_by_n(backend):
    q, k, v = _qkv(n=10)
    want = _loop(q, k, v, lambda s: max(s, 0.0) / 10, causal=False)
    torch.testing.assert_close(attnzoo.relu_attention(q, k, v, backend=backend), want)
    torch.testing.assert_close(attnzoo.relu_attention(q, k, v, length=40, backend=backend), want / 4)


def test_chunks_cover_long_sequences_and_gradients(monkeypatch):
    from attnzoo.functional.variants import elementwise

    monkeypatch.setattr(elementwise, "CHUNK", 7)  # several chunks, a short last one
    q, k, v = (t.requires_grad_() for t in _qkv(n=30))
    for name in ("sigmoid", "relu"):
        mech = attnzoo.get(name)
        fast = mech(q, k, v, causal=True, backend="chunked")
        ref = mech(q, k, v, causal=True, backend="reference")
        torch.testing.assert_close(fast, ref)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad((fast * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
            torch.testing.assert_close(a, b)


def test_padding_uses_each_sequences_real_key_count():
    q, k, v = _qkv(b=1, n=9)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, 9:] = True  # sequence 0: 9 real keys on the left of 12
    qp, kp, vp = (torch.cat([torch.nn.functional.pad(t, (0, 0, 0, 3)), torch.randn(1, 2, 12, 8, dtype=torch.float64)]) for t in (q, k, v))
    out = attnzoo.sigmoid_attention(qp, kp, vp, key_padding_mask=pad)
    torch.testing.assert_close(out[:1, :, :9], attnzoo.sigmoid_attention(q, k, v))  # n = 9, not 12


def test_rows_are_not_normalized_and_inf_is_named():
    q, k, v = _qkv()
    from attnzoo.hooks import weights_of

    w, is_distribution = weights_of(attnzoo.get("sigmoid"), q, k, v)
    assert not is_distribution and not torch.allclose(w.sum(-1), torch.ones(()).double())
    k = k.clone()
    k[0, 0, 3, 0] = -float("inf")  # sigmoid(-inf) = 0 would hide it
    with pytest.raises(attnzoo.errors.NonFiniteError) as info:
        attnzoo.sigmoid_attention(q, k, v)
    assert info.value.argument == "k"


def test_decoding_needs_a_fixed_length():
    q, k, v = _qkv(b=1, n=6)
    with pytest.raises(ParameterError) as info:
        attnzoo.get("relu").init_state(q, k, v, causal=True)
    assert info.value.argument == "length"
    state = attnzoo.get("relu").init_state(q, k, v, causal=True, length=6)
    out, state = attnzoo.get("relu").step(q[:, :, :4], k[:, :, :4], v[:, :, :4], state)
    out2, _ = attnzoo.get("relu").step(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state)
    torch.testing.assert_close(torch.cat([out, out2], 2), attnzoo.relu_attention(q, k, v, causal=True))


def test_bad_bias_is_named():
    q, k, v = _qkv()
    with pytest.raises(ParameterError) as info:
        attnzoo.sigmoid_attention(q, k, v, bias=float("nan"))
    assert info.value.argument == "bias"
