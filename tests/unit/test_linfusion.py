"""linfusion (F8, LinFusion): both backends against the official GeneralizedLinearAttention's
formulation written out (Huage001/LinFusion: heads in the batch, z = q . mean(k) + 1e-4,
kv = (k^T / sqrt N)(v / sqrt N)), its identity with ``linear`` (scale 1, eps x Nk), fast ==
reference in float64 with gradients, causal refused, the module against the official pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.linear import linear_attention
from attnzoo.functional.linear.linfusion import linfusion_attention
from attnzoo.nn.linear.linfusion import LinFusionAttention

from .qkv import random_qkv
from .padding import N as PAD_N, assert_padded_equals_alone

BACKENDS = ("reference", "factorized")


def _inputs(b=2, h=3, nq=13, nk=13, d=6, dv=4, seed=0, dtype=torch.float64, kv_heads=None):
    return random_qkv(b, h, nq, nk, d, dv, kv_heads=kv_heads, seed=seed, dtype=dtype)

def _official(query, key, value):
    """GeneralizedLinearAttention.forward between head_to_batch_dim and batch_to_head_dim:
    (B H, N, d) tensors; sequence_length is the query count (self-attention)."""
    sequence_length = query.shape[1]
    query = F.elu(query) + 1.0
    key = F.elu(key) + 1.0
    z = query @ key.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    kv = (key.transpose(-2, -1) * (sequence_length**-0.5)) @ (value * (sequence_length**-0.5))
    return query @ kv / z


def _batch_heads(x):
    return x.reshape(-1, *x.shape[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 13, 64, 257])
def test_matches_the_official_formulation(backend, n):
    q, k, v = _inputs(nq=n, nk=n)
    out = linfusion_attention(q, k, v, backend=backend)
    want = _official(_batch_heads(q), _batch_heads(k), _batch_heads(v)).view(out.shape)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("nq, nk", [(13, 13), (9, 21), (21, 5)])
def test_is_linear_attention_with_an_eps_times_nk(nq, nk):
    q, k, v = _inputs(nq=nq, nk=nk, h=4, kv_heads=2)
    want = linear_attention(q, k, v, scale=1.0, eps=1e-3 * nk)
    for backend in BACKENDS:
        torch.testing.assert_close(linfusion_attention(q, k, v, eps=1e-3, backend=backend), want, atol=1e-12, rtol=1e-10)


def test_eps_weighs_the_same_whatever_n():
    """A query whose features vanish outputs v's mean weighted by eps against the mean feature:
    with relu and a large negative q, out = 0 whatever Nk (eps stays on the mean scale)."""
    q, k, v = _inputs(nq=3, nk=40)
    out = linfusion_attention(-10 - q.abs(), k, v, feature_map="relu")
    assert out.abs().max() == 0
    small, large = linfusion_attention(q, k, v, eps=1e-12), linfusion_attention(q, k, v, eps=1.0)
    assert not torch.allclose(small, large, atol=1e-3)


def test_gradients_match_the_reference():
    q, k, v = _inputs(nq=17, nk=11, h=4, kv_heads=2)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    proj = torch.randn(2, 4, 17, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for fmap in ("elu", "relu", torch.sigmoid, (torch.sigmoid, torch.exp)):
        grads = {b: torch.autograd.grad((linfusion_attention(q, k, v, feature_map=fmap, backend=b) * proj).sum(), leaves) for b in BACKENDS}
        for name, g, w in zip("qkv", grads["factorized"], grads["reference"]):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=lambda m, n=name, f=fmap: f"{f} d{n}: {m}")


def test_half_inputs_are_computed_in_float32():
    q, k, v = _inputs(dtype=torch.bfloat16, nq=64, nk=64, d=16, dv=16)
    out = linfusion_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    want = linfusion_attention(q.float(), k.float(), v.float(), backend="reference")
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)


def test_causal_and_bad_inputs_are_refused():
    q, k, v = _inputs()
    mech = attnzoo.get("linfusion")
    assert mech.patterns == {"noncausal_self", "noncausal_cross"} and mech.decoder is None
    with pytest.raises(ParameterError) as info:
        attnzoo.attention(q, k, v, "linfusion", causal=True)
    assert info.value.argument == "causal"
    for name, bad in [("feature_map", "identity"), ("feature_map", "softmax_kernel"), ("eps", 0.0), ("eps", float("nan"))]:
        with pytest.raises(ParameterError) as info:
            linfusion_attention(q, k, v, **{name: bad})
        assert info.value.argument == name and name in str(info.value)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
def _official_layer(layer, x, context=None):
    """GeneralizedLinearAttention.forward with this layer's weights, written out (heads in the batch)."""
    c = x if context is None else context
    b, n, dim = x.shape
    h = layer.num_heads

    def mlp(seq, t):
        lin1, ln, _, lin2 = seq
        return lin2(F.leaky_relu(F.layer_norm(lin1(t), ln.normalized_shape, ln.weight, ln.bias, ln.eps), 0.01))

    def head_to_batch_dim(t):
        return t.reshape(b, t.shape[1], h, dim // h).permute(0, 2, 1, 3).reshape(b * h, t.shape[1], dim // h)

    query = head_to_batch_dim(layer.to_q(x + mlp(layer.to_q_, x)))
    key = head_to_batch_dim(layer.to_k(c + mlp(layer.to_k_, c)))
    value = head_to_batch_dim(layer.to_v(c))
    out = _official(query, key, value)
    return layer.to_out(out.reshape(b, h, n, dim // h).permute(0, 2, 1, 3).reshape(b, n, dim))


def test_module_matches_the_official_layer():
    torch.manual_seed(0)
    layer = LinFusionAttention(32, 4, projection_mid_dim=16).double()
    x = torch.randn(2, 50, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, _official_layer(layer, x), atol=1e-12, rtol=1e-10)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert x.grad.abs().sum() > 0


def test_module_cross_attention_and_no_mlp():
    torch.manual_seed(1)
    layer = LinFusionAttention(16, 2, context_dim=16, projection_mid_dim=-1).double()
    assert layer.to_q_ is None and layer.to_k_ is None  # q = W_q x (the official -1 adds an identity: W_q 2x)
    x, ctx = torch.randn(1, 9, 16, dtype=torch.float64), torch.randn(1, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x, ctx), layer.to_out(
        linfusion_attention(*(t.view(1, 9, 2, 8).transpose(1, 2) for t in (layer.to_q(x), layer.to_k(ctx), layer.to_v(ctx)))).transpose(1, 2).reshape(1, 9, 16)
    ), atol=1e-12, rtol=1e-10)  # fmt: skip
    cross = LinFusionAttention(16, 2, context_dim=8)
    assert cross(torch.randn(2, 5, 16), torch.randn(2, 11, 8)).shape == (2, 5, 16)
    with pytest.raises(ShapeError):
        cross(torch.randn(2, 5, 16), torch.randn(2, 11, 16))
    for name, kwargs in [("num_heads", {"num_heads": 3}), ("projection_mid_dim", {"projection_mid_dim": 0})]:
        with pytest.raises(ParameterError) as info:
            LinFusionAttention(16, **{"num_heads": 2, **kwargs})
        assert info.value.argument == name


# --------------------------------------------------------------------------------------------
# key_padding_mask (True = ignore the key): a padded batch equals each sequence alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference", "factorized"))
@pytest.mark.parametrize("side", ("right", "left"))
@pytest.mark.parametrize("cross", (False, True), ids=("self", "cross"))
def test_padded_batch_equals_each_sequence_alone(backend, side, cross):
    """Both means (numerator and denominator) over the real keys: eps weighs as for the sequence alone."""
    q, k, v = random_qkv(3, 4, 5 if cross else PAD_N, PAD_N, 6, 5, kv_heads=2)
    attend = lambda q, k, v, **kw: linfusion_attention(q, k, v, backend=backend, **kw)  # noqa: E731
    assert_padded_equals_alone(attend, q, k, v, side, cross=cross)
