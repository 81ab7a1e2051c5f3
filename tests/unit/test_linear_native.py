"""The C++ kernel of the linear family (kernels/csrc/linear_scan.cpp) against the PyTorch path.

Engine level: ``_native_causal`` against ``_ChunkedCausal`` (the torch tiling) over decay,
strictness, the implicit normalizer column, a starting state, chunk sizes that do and do not
divide N, feature and value widths off the 8/16-lane blocks, and strided token slices; the
backward of ``_NativeCausal`` (three kernel passes) against the tiling's gradients. Fused level: ``fused_causal_forward`` (feature map and division inside) against the same
sums written with torch, GQA included. Mechanism level: the ``chunked`` backend of ``linear``
and ``retention`` without autograd (the path that takes the fused kernel) against each
mechanism's reference, and decoding from a state. All skip without a C++ toolchain.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.kernels import linear_scan
from attnzoo.functional.linear.feature_maps import taylor_features
from attnzoo.kernels.linear_scan import NATIVE_MAPS, append_ones, chunked_scan, fused_causal_forward

from .qkv import random_qkv

pytestmark = pytest.mark.skipif(linear_scan._native_scan() is None, reason="no C++ toolchain for the native linear-attention kernel")

def _assert_close(got, want):
    """float32 against float32 with a different summation order: errors scale with the largest entry."""
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6 * float(want.abs().max()))
LOG_DECAY = torch.tensor([0.5, 0.9, 0.999]).log()
PHI = {"identity": lambda x: x, "elu": lambda x: F.elu(x) + 1, "relu": torch.relu, "taylor": lambda x: taylor_features(x, 5)}


def _torch_scan(q, k, v, log_decay, state, length, scale, strict, normalizer):
    """The torch tiling, forced (it is what autograd runs)."""
    values = append_ones(v) if normalizer else v
    return linear_scan._ChunkedCausal.apply(q.contiguous(), k.contiguous(), values.contiguous(), state, log_decay, length, strict, scale)


def _positive(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 0.1


@pytest.mark.parametrize("n, length", [(37, 1), (37, 3), (37, 16), (37, 64), (128, 32), (129, 64)], ids=lambda x: str(x))
@pytest.mark.parametrize("f, dv", [(8, 16), (3, 5), (33, 24), (64, 64)], ids=["F8-Dv16", "F3-Dv5", "F33-Dv24", "F64-Dv64"])
@pytest.mark.parametrize("decayed", [False, True], ids=["no_decay", "decay"])
@pytest.mark.parametrize("normalizer", [False, True], ids=["bare", "normalizer"])
def test_engine_matches_torch_tiling(n, length, f, dv, decayed, normalizer):
    q, k = _positive(2, 3, n, f, seed=0), _positive(2, 3, n, f, seed=1)
    v = torch.randn(2, 3, n, dv, generator=torch.Generator().manual_seed(2))
    log_decay = LOG_DECAY if decayed else None
    with torch.no_grad():
        got, got_state = linear_scan._native_causal(q, k, v, log_decay, None, min(length, n), 0.7, False, normalizer)
        want, want_state = _torch_scan(q, k, v, log_decay, None, min(length, n), 0.7, False, normalizer)
    _assert_close(got, want)
    _assert_close(got_state, want_state)


@pytest.mark.parametrize("decayed", [False, True], ids=["no_decay", "decay"])
@pytest.mark.parametrize("normalizer", [False, True], ids=["bare", "normalizer"])
def test_engine_strict_and_from_a_state(decayed, normalizer):
    """The bidirectional pass's strict mask, and a starting state (decoding), as the torch tiling."""
    q, k = _positive(1, 3, 50, 12, seed=3), _positive(1, 3, 50, 12, seed=4)
    v = torch.randn(1, 3, 50, 10, generator=torch.Generator().manual_seed(5))
    state = torch.rand(1, 3, 12, 10 + normalizer, generator=torch.Generator().manual_seed(6))
    log_decay = LOG_DECAY if decayed else None
    for strict, start in ((True, None), (False, state), (True, state)):
        with torch.no_grad():
            got = linear_scan._native_causal(q, k, v, log_decay, start, 16, 0.5, strict, normalizer)
            want = _torch_scan(q, k, v, log_decay, start, 16, 0.5, strict, normalizer)
        for g, w in zip(got, want):
            _assert_close(g, w)


def test_engine_reads_strided_token_slices():
    """A piece of a longer sequence goes in as a view (no copy) and gives the same result."""
    q, k, v = (x.float() for x in random_qkv(2, 3, 80, 80, 16, 16, seed=7))
    q, k = q.abs(), k.abs()
    piece = slice(20, 60)
    views = [x[:, :, piece] for x in (q, k, v)]
    assert not views[0].is_contiguous()
    with torch.no_grad():
        got, _ = linear_scan._native_causal(*views, None, None, 16, 1.0, False, True)
        want, _ = linear_scan._native_causal(*(x.contiguous() for x in views), None, None, 16, 1.0, False, True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("feature_map", sorted(NATIVE_MAPS))
@pytest.mark.parametrize("eps", [None, 1e-3], ids=["bare", "normalized"])
@pytest.mark.parametrize("decayed", [False, True], ids=["no_decay", "decay"])
@pytest.mark.parametrize("kv_heads", [3, 1], ids=["MHA", "MQA"])
def test_fused_forward_matches_its_formula(feature_map, eps, decayed, kv_heads):
    """phi(c q), phi(k), the decayed causal sums and the division, as torch computes them."""
    if feature_map == "identity" and eps is not None:
        pytest.skip("identity's denominator has no sign: normalizing it amplifies rounding")
    q, k, v = (x.float() for x in random_qkv(2, 3, 45, 45, 20, 12, kv_heads=kv_heads, seed=8))
    q, k = q * 3, k * 3  # reach deep into elu's exponential branch
    log_decay = LOG_DECAY if decayed else None
    with torch.no_grad():
        feature_dim = 5 if feature_map == "taylor" else None  # of 20 channels: the map reads a prefix
        got = fused_causal_forward(
            q, k, v, feature_map=feature_map, query_scale=0.3, scale=0.8, log_decay=log_decay, chunk_size=16, eps=eps, feature_dim=feature_dim
        )
    phi = PHI[feature_map]
    heads = [x.repeat_interleave(3 // kv_heads, dim=1) for x in (k, v)]
    want, _ = chunked_scan(phi(0.3 * q).double(), phi(heads[0]).double(), heads[1].double(), log_decay=log_decay, scale=0.8, normalizer=eps is not None)
    if eps is not None:
        want = want[..., :-1] / (want[..., -1:] + eps)
    _assert_close(got, want.float())


def test_fused_elu_exponential_is_accurate():
    """The kernel's vector exp (elu's negative branch) against torch's, down to where it flushes.

    With v the identity, out_i[j] = phi(q_i) . phi(k_j); the last 8 queries are 0 on one feature
    and -200 (phi ~ 1e-38) on the others, so they read phi(k_j) back feature by feature.
    """
    n = 8 * 17 + 8
    k = torch.cat([torch.linspace(-100.0, 5.0, (n - 8) * 8).view(n - 8, 8), torch.zeros(8, 8)])
    q = torch.full((n, 8), -200.0)
    q[n - 8 :].fill_diagonal_(0.0)
    with torch.no_grad():
        out = fused_causal_forward(q[None, None], k[None, None], torch.eye(n)[None, None], feature_map="elu")
    keys = k[: n - 8]
    exact = torch.where(keys > 0, keys + 1, keys.exp())  # elu(x) + 1 cancels to 0 below x ~ -17 in float32; exp does not
    torch.testing.assert_close(out[0, 0, n - 8 :, : n - 8].T, exact, rtol=3e-6, atol=1e-30)


def test_fused_declines_what_it_cannot_run():
    q, k, v = (x.float() for x in random_qkv(1, 2, 8, 8, 4, 4, seed=9))
    with torch.no_grad():
        assert fused_causal_forward(q.double(), k.double(), v.double()) is None  # float32 only
        assert fused_causal_forward(q, k, v, feature_map="softmax_kernel") is None
        assert fused_causal_forward(q, k, v, feature_map=torch.sigmoid) is None  # a callable
        assert fused_causal_forward(q, k[:, :, :5], v[:, :, :5]) is None  # Nq != Nk
    with torch.enable_grad():
        assert fused_causal_forward(q.requires_grad_(), k, v) is None  # no backward in C++


@pytest.mark.parametrize(
    "name, params",
    [
        ("linear", {}),
        ("linear", {"feature_map": "relu"}),
        ("linear", {"feature_map": "identity", "normalize": False}),
        ("linear", {"feature_map": "taylor", "feature_dim": 6}),
        ("linear", {"feature_map": "softmax_kernel", "seed": 0}),  # not fused: pieces through the engine
        ("retention", {}),
        ("retention", {"normalize_decay": True, "normalize_scores": True}),  # not fused either
        ("based", {}),
        ("transnormer", {}),
        ("transnormer", {"feature_map": "relu", "norm": "rms", "norm_scope": "head"}),
    ],
    ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()) or "defaults",
)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_chunked_backend_without_autograd_matches_reference(name, params, kv_heads):
    q, k, v = (x.float() for x in random_qkv(2, 4, 150, 150, 16, 8, kv_heads=kv_heads, seed=10))
    with torch.no_grad():
        got = attnzoo.attention(q, k, v, name, backend="chunked", causal=True, chunk_size=32, **params)
        want = attnzoo.attention(q.double(), k.double(), v.double(), name, backend="reference", causal=True, **params)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


def test_bidirectional_decayed_pass_without_autograd_matches_reference():
    q, k, v = (x.float() for x in random_qkv(2, 3, 70, 70, 8, 8, seed=11))
    with torch.no_grad():
        got = attnzoo.attention(q, k, v, "retention", backend="chunked", causal=False, chunk_size=16)
        want = attnzoo.attention(q.double(), k.double(), v.double(), "retention", backend="reference", causal=False)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["linear", "retention"])
def test_decoding_from_a_state_matches_the_full_forward(name):
    """Prefill then steps of 1 to 23 tokens (the native engine from a state) equal one causal pass."""
    q, k, v = (x.float() for x in random_qkv(1, 2, 60, 60, 8, 8, seed=12))
    mech = attnzoo.get(name)
    state = mech.init_state(q, k, v, causal=True, chunk_size=8)
    outs = []
    with torch.no_grad():
        for t0, t1 in ((0, 23), (23, 24), (24, 25), (25, 27), (27, 30), (30, 47), (47, 60)):  # one-token steps take the kernel too
            out, state = mech.step(q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], state, causal=True, chunk_size=8)
            outs.append(out)
        want = attnzoo.attention(q.double(), k.double(), v.double(), name, backend="reference", causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=2), want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["linear", "retention", "transnormer", "based"])
def test_causal_forward_without_autograd_is_one_native_call(name, monkeypatch):
    """The fast path is taken (and only one call: no pieces, no separate map or division)."""
    calls = []
    native = linear_scan._native_causal
    monkeypatch.setattr(linear_scan, "_native_causal", lambda *a, **kw: calls.append(a[0].shape) or native(*a, **kw))
    q, k, v = (x.float() for x in random_qkv(1, 2, 5000, 5000, 16, 8, seed=13))  # based reads 16 channels
    with torch.no_grad():
        attnzoo.attention(q, k, v, name, causal=True)
    assert calls == [q.shape]


@pytest.mark.parametrize("decayed", [False, True], ids=["no_decay", "decay"])
@pytest.mark.parametrize("normalizer", [False, True], ids=["bare", "normalizer"])
@pytest.mark.parametrize("strict", [False, True], ids=["inclusive", "strict"])
@pytest.mark.parametrize("final_state", [False, True], ids=["out", "out+state"])
@pytest.mark.parametrize("n, length, f, dv", [(37, 16, 8, 16), (50, 7, 3, 5), (64, 64, 33, 24)], ids=lambda x: str(x))
def test_native_backward_matches_torch_tiling(decayed, normalizer, strict, final_state, n, length, f, dv):
    """Three reversed or not passes of the kernel give the gradients of the torch tiling, the
    final state's gradient included."""
    q, k = _positive(2, 3, n, f, seed=14), _positive(2, 3, n, f, seed=15)
    v = torch.randn(2, 3, n, dv, generator=torch.Generator().manual_seed(16))
    log_decay = LOG_DECAY if decayed else None
    gen = torch.Generator().manual_seed(17)
    weight = torch.randn(2, 3, n, dv + normalizer, generator=gen)
    state_weight = torch.randn(2, 3, f, dv + normalizer, generator=gen) if final_state else None
    results = []
    for native in (True, False):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        if native:
            out, end = linear_scan._NativeCausal.apply(*inputs, log_decay, length, strict, 0.6, normalizer)
        else:
            out, end = _torch_scan(*inputs, log_decay, None, length, 0.6, strict, normalizer)
        loss = (out * weight).sum() + ((end * state_weight).sum() if final_state else 0)
        results.append(torch.autograd.grad(loss, inputs))
    for got, want in zip(*results):
        _assert_close(got, want)


def test_training_step_takes_the_native_backward(monkeypatch):
    """With autograd on float32 CPU inputs, the chunked backend runs _NativeCausal, and its
    gradients equal the reference's."""
    calls = []
    apply = linear_scan._NativeCausal.apply
    monkeypatch.setattr(linear_scan._NativeCausal, "apply", lambda *a: calls.append(1) or apply(*a))
    q, k, v = (x.float().requires_grad_() for x in random_qkv(1, 2, 90, 90, 8, 8, seed=18))
    out = attnzoo.attention(q, k, v, "linear", backend="chunked", causal=True, chunk_size=16)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert calls == [1]
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out_ref = attnzoo.attention(*ref, "linear", backend="reference", causal=True)
    for got, want in zip(grads, torch.autograd.grad(out_ref.square().sum(), ref)):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_forward_reads_16_bit_inputs_in_float32(dtype):
    """16-bit inputs are widened in the kernel: the result is the float32 one, rounded once."""
    q, k, v = (x.to(dtype) for x in random_qkv(2, 4, 150, 150, 16, 8, kv_heads=2, seed=19))
    with torch.no_grad():
        got = fused_causal_forward(q, k, v, feature_map="elu", query_scale=0.25, chunk_size=32, eps=1e-6)
        wide = fused_causal_forward(q.float(), k.float(), v.float(), feature_map="elu", query_scale=0.25, chunk_size=32, eps=1e-6)
        kept = fused_causal_forward(q, k, v, feature_map="elu", query_scale=0.25, chunk_size=32, eps=1e-6, dtype=torch.float32)
    assert got.dtype == dtype and kept.dtype == torch.float32
    torch.testing.assert_close(kept, wide, rtol=0, atol=0)
    torch.testing.assert_close(got, wide.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear", "retention", "transnormer", "based"])
def test_16_bit_causal_forward_is_one_native_call(name, monkeypatch):
    calls = []
    native = linear_scan._native_causal
    monkeypatch.setattr(linear_scan, "_native_causal", lambda *a, **kw: calls.append(a[0].dtype) or native(*a, **kw))
    q, k, v = (x.to(torch.bfloat16) for x in random_qkv(1, 2, 200, 200, 16, 8, seed=20))
    with torch.no_grad():
        got = attnzoo.attention(q, k, v, name, causal=True, chunk_size=32)
        want = attnzoo.attention(q.double(), k.double(), v.double(), name, backend="reference", causal=True)
    assert calls == [torch.bfloat16] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
