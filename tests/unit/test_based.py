"""based (F5) and the Based layer mix (attnzoo.nn.linear.based).

External oracles, written out here from the official formulations (not imported):
* flash-linear-attention's ``naive_parallel_based`` (fla/ops/based/naive.py): q scaled by
  D^-0.5, scores 1 + a + a^2/2, lower-triangular, normalized by the row sum + 1e-6;
* Based's own layer (HazyResearch/based ``TaylorExp`` + zoology ``Based``): the flattened map
  [1, x / d^(1/4), vec(x x^T) / (sqrt 2 sqrt d)] of d^2 + d + 1 features and the cumulative-sum
  form y = phi(q) . cumsum(phi(k) v^T) / (phi(q) . cumsum(phi(k)) + eps).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.linear.based import based_attention
from attnzoo.nn.linear.based import MIXER_KINDS, BaseConv, BasedMixer, SlidingWindowAttention, TaylorLinearAttention
from attnzoo.nn.mha import ShortConvolution
from .padding import N as PAD_N, assert_padded_equals_alone
from .qkv import random_qkv as _padding_qkv

BASED = attnzoo.get("based")
F64 = torch.float64


def _qkv(b=2, hq=3, hkv=None, nq=70, nk=None, d=16, dv=12, seed=0, dtype=F64, grad=False):
    gen = torch.Generator().manual_seed(seed)
    hkv, nk = hq if hkv is None else hkv, nq if nk is None else nk
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv))
    return tuple(torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(grad) for s in shapes)


# --------------------------------------------------------------------------------------------
# the oracles
# --------------------------------------------------------------------------------------------
def fla_naive_parallel_based(q, k, v, use_norm=True):
    """fla's naive_parallel_based, restated one query at a time: q * D^-0.5, w = 1 + a + a^2/2 over j <= i."""
    q = q * q.shape[-1] ** -0.5
    rows = []
    for i in range(q.shape[2]):
        a = torch.einsum("bhd,bhjd->bhj", q[:, :, i], k[:, :, : i + 1])
        w = 1 + a + 0.5 * a**2
        num = torch.einsum("bhj,bhjv->bhv", w, v[:, :, : i + 1])
        rows.append(num / (w.sum(-1, keepdim=True) + 1e-6) if use_norm else num)
    return torch.stack(rows, dim=2)


def based_taylor_exp(x):
    """Based's TaylorExp: [1, x / d^(1/4), vec(x x^T) / (sqrt 2 * sqrt d)], d^2 + d + 1 features."""
    d = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, outer / (math.sqrt(2) * math.sqrt(d))], dim=-1)


def based_official_layer_attention(q, k, v, causal=True, eps=1e-12):
    """zoology's Based.forward after the projections: cumulative sums of phi(k) v^T and phi(k)."""
    fq, fk = based_taylor_exp(q).unsqueeze(-2), based_taylor_exp(k).unsqueeze(-2)  # (B, H, N, 1, F)
    kv = fk * v.unsqueeze(-1)  # (B, H, N, Dv, F)
    if causal:
        return (fq * kv.cumsum(2)).sum(-1) / ((fq * fk.cumsum(2)).sum(-1) + eps)
    return (fq * kv.sum(2, keepdim=True)).sum(-1) / ((fq * fk.sum(2, keepdim=True)).sum(-1) + eps)


# --------------------------------------------------------------------------------------------
# the mechanism
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("backend", ["reference", "chunked", "recurrent"])
def test_equals_fla_naive_parallel_based(backend, use_norm):
    q, k, v = _qkv(d=16, dv=24, nq=50)
    got = based_attention(q, k, v, normalize=use_norm, chunk_size=16, backend=backend)  # every default otherwise
    torch.testing.assert_close(got, fla_naive_parallel_based(q, k, v, use_norm=use_norm), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["reference", "chunked", "recurrent"])
def test_equals_based_official_layer_form(backend, causal):
    q, k, v = _qkv(d=8, dv=10, nq=45, seed=1)
    got = based_attention(q, k, v, feature_dim=8, causal=causal, eps=1e-12, chunk_size=9, backend=backend)
    torch.testing.assert_close(got, based_official_layer_attention(q, k, v, causal=causal), rtol=1e-10, atol=1e-10)


CASES = {
    "self-causal": dict(nq=70, causal=True),
    "self-bidirectional": dict(nq=70, causal=False),
    "cross-causal-Nq<Nk": dict(nq=23, nk=70, causal=True),
    "cross-causal-Nq>Nk": dict(nq=41, nk=30, causal=True),
    "cross-bidirectional": dict(nq=23, nk=57, causal=False),
    "gqa": dict(hq=4, hkv=2, nq=50, causal=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend, chunk_size", [("chunked", 5), ("chunked", 16), ("chunked", 64), ("recurrent", 64)])
def test_forms_equal_reference_outputs_and_gradients(backend, chunk_size, case):
    opts = dict(CASES[case])
    causal = opts.pop("causal")
    q, k, v = _qkv(grad=True, d=20, seed=2, **opts)
    params = dict(feature_dim=12, causal=causal, chunk_size=chunk_size)
    outs, grads = [], []
    for name in ("reference", backend):
        out = based_attention(q, k, v, backend=name, **params)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for got, expected, name in zip(grads[1], grads[0], "qkv"):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def test_bare_sum_forms_agree():
    q, k, v = _qkv(nq=61, seed=3)
    ref = based_attention(q, k, v, normalize=False, backend="reference")
    torch.testing.assert_close(based_attention(q, k, v, normalize=False, chunk_size=13), ref, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("splits", [[1] * 9, [3, 5, 1, 7, 2], [12, 1, 30]])
def test_decoding_equals_full_causal_forward(splits):
    q, k, v = _qkv(nq=40, seed=4)
    params = dict(feature_dim=16, causal=True, chunk_size=8, normalize=True, eps=1e-6, scale=None)
    full = based_attention(q, k, v, **{n: params[n] for n in ("feature_dim", "chunk_size")})
    state = BASED.init_state(q, k, v, **params)
    outs, start = [], 0
    for size in splits + [q.shape[2]]:
        stop = min(q.shape[2], start + size)
        if stop == start:
            break
        out, state = BASED.step(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, **params)
        outs.append(out)
        start = stop
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-10, atol=1e-10)
    assert state.kv.shape[-2:] == (1 + 16 + 16 * 17 // 2, v.shape[-1] + 1)  # the Taylor state, not a cache


def test_is_linear_with_the_taylor_map_and_based_scale():
    q, k, v = _qkv(d=16, seed=5)
    expected = attnzoo.get("linear")(q, k, v, feature_map="taylor", feature_dim=16, scale=16**-0.5, causal=True, backend="reference")
    torch.testing.assert_close(based_attention(q, k, v, backend="reference"), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_wider_heads_use_their_first_feature_dim_channels(backend):
    q, k, v = _qkv(d=24, seed=6)
    expected = based_attention(q[..., :16], k[..., :16], v, feature_dim=16, backend=backend)
    torch.testing.assert_close(based_attention(q, k, v, feature_dim=16, backend=backend), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        based_attention(q, k, v, feature_dim=None, backend=backend), based_attention(q, k, v, feature_dim=24, backend=backend), rtol=0, atol=0
    )


def test_half_precision_inputs_compute_in_float32():
    q, k, v = _qkv(seed=7)
    got = based_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), based_attention(q, k, v), rtol=2e-2, atol=2e-2)


def test_state_size_is_the_taylor_state():
    assert BASED.state_size(16) == 153 * 17
    assert BASED.state_size(64, 64) == 153 * 65  # d = 16 by default, whatever D
    assert BASED.state_size(64, 32, feature_dim=8, normalize=False) == 45 * 32
    assert BASED.state_size(8, feature_dim=None) == 45 * 9


def test_feature_dim_beyond_the_head_dim_is_refused():
    q, k, v = _qkv(d=8)
    with pytest.raises(ParameterError) as info:
        based_attention(q, k, v)  # the default d = 16 > D = 8
    assert info.value.argument == "feature_dim" and "D=8" in str(info.value)


# --------------------------------------------------------------------------------------------
# the modules
# --------------------------------------------------------------------------------------------
def _tokens(b=2, n=37, d=24, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _mixers():
    torch.manual_seed(0)
    return {
        "conv": BaseConv(24, kernel_size=3),
        "linear": TaylorLinearAttention(24, num_heads=2, feature_dim=6, chunk_size=8),
        "window": SlidingWindowAttention(24, num_heads=3, window=5),
        "short-conv": ShortConvolution(24, kernel_size=4),
        "two-layer": torch.nn.Sequential(BasedMixer.for_layer(24, 0), BasedMixer.for_layer(24, 1, feature_dim=4)),
    }


@pytest.mark.parametrize("name", list(_mixers()))
def test_modules_are_causal_shaped_and_differentiable(name):
    layer = _mixers()[name].double()
    x = _tokens()
    y = layer(x)
    assert y.shape == x.shape
    for cut in (0, 11, 36):
        changed = x.clone()
        changed[:, cut + 1 :] = torch.randn_like(changed[:, cut + 1 :]) * 3
        torch.testing.assert_close(layer(changed)[:, : cut + 1], y[:, : cut + 1], rtol=1e-12, atol=1e-12)
    x.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


def test_taylor_layer_is_the_functional_form_on_its_projections():
    layer = _mixers()["linear"].double()
    x = _tokens(seed=1)
    q, k, v = layer.project(x)
    assert q.shape == (2, 2, 37, 6) and v.shape == (2, 2, 37, 12)
    out = based_attention(q, k, v, feature_dim=6, eps=1e-12, backend="reference")
    torch.testing.assert_close(layer(x), layer.out_proj(out.transpose(1, 2).reshape(2, 37, 24)), rtol=1e-12, atol=1e-12)
    # and the official layer's arithmetic on the same projections
    official = based_official_layer_attention(q, k, v).transpose(1, 2).reshape(2, 37, 24)
    torch.testing.assert_close(layer(x), layer.out_proj(official), rtol=1e-10, atol=1e-10)


def test_window_layer_is_softmax_over_the_last_window_keys():
    layer = _mixers()["window"].double()
    x = _tokens(seed=2)
    q, k, v = (t.view(2, 37, 3, 8).transpose(1, 2) for t in layer.qkv(x).chunk(3, dim=-1))
    i, j = torch.arange(37).view(-1, 1), torch.arange(37).view(1, -1)
    hidden = (j > i) | (j < i - 5)  # query t sees keys t-5 .. t
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(hidden, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 37, 24)
    torch.testing.assert_close(layer(x), layer.out_proj(out), rtol=1e-10, atol=1e-10)


def test_base_conv_is_a_gated_causal_depthwise_convolution():
    layer = _mixers()["conv"].double()
    x = _tokens(seed=3)
    w, b = layer.conv.weight.t(), layer.conv.bias  # (C, K), (C,)
    conv = torch.stack([b + sum(w[:, 2 - s] * x[:, t - s] for s in range(3) if t - s >= 0) for t in range(37)], dim=1)
    torch.testing.assert_close(layer(x), conv * layer.projection(x) + x, rtol=1e-12, atol=1e-12)
    layer.residual = False
    torch.testing.assert_close(layer(x), conv * layer.projection(x), rtol=1e-12, atol=1e-12)


def test_mixer_kinds_options_and_state_sizes():
    assert [BasedMixer.for_layer(16, i).kind for i in range(4)] == ["conv", "linear", "conv", "linear"]
    assert [BasedMixer.for_layer(16, i, kinds=MIXER_KINDS).kind for i in range(3)] == list(MIXER_KINDS)
    linear = BasedMixer(64, "linear", feature_dim=16, window=64, kernel_size=3)  # the other kinds' options are ignored
    assert linear.state_size() == 153 * 65
    assert BasedMixer(64, "window", window=64).state_size() == 2 * 64 * 64
    assert BasedMixer(64, "conv", kernel_size=3).state_size() == 2 * 64
    with pytest.raises(ParameterError, match="kind"):
        BasedMixer(64, "mamba")
    with pytest.raises(ParameterError, match="feature_dims"):
        BasedMixer(64, "linear", feature_dims=8)
    with pytest.raises(ParameterError, match="num_heads"):
        TaylorLinearAttention(30, num_heads=4)


# --------------------------------------------------------------------------------------------
# key_padding_mask (True = ignore the key): a padded batch equals each sequence alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference", "chunked", "recurrent"))
@pytest.mark.parametrize("causal", (False, True), ids=("bidirectional", "causal"))
@pytest.mark.parametrize("side", ("right", "left"))
@pytest.mark.parametrize("normalize", (True, False), ids=("normalized", "bare"))
def test_padded_batch_equals_each_sequence_alone(backend, causal, side, normalize):
    """w_ij >= 1/2 for every pair: without the mask a pad would weigh as much as a real key."""
    q, k, v = _padding_qkv(3, 4, PAD_N, PAD_N, 6, 5, kv_heads=2)

    def attend(q, k, v, **kw):
        return based_attention(q, k, v, feature_dim=3, causal=causal, normalize=normalize, chunk_size=4, backend=backend, **kw)

    assert_padded_equals_alone(attend, q, k, v, side)
