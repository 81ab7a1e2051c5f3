"""inline (F8, InLine): both backends against the official code's formulation written out
(LeapLabTHU/InLine ``InLineAttention.forward``: kv first, the mean subtracted, 1/N added),
the causal variant against a per-query loop, gradients, decoding, chunk sizes that do not
divide N, bad inputs, and the module against its pipeline written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.linear.inline import inline_attention
from attnzoo.nn.linear.inline import InLineAttention

from .qkv import random_qkv
from .padding import N as PAD_N, assert_padded_equals_alone

MAPS = ("identity", "relu", "leaky_relu", "exp")
KERNEL_FUNCS = {"identity": lambda x: x, "relu": torch.relu, "leaky_relu": F.leaky_relu, "exp": lambda x: (0.2 * x).exp()}


def _inputs(b=2, hq=4, hkv=2, nq=13, nk=13, d=8, dv=5, seed=0, dtype=torch.float64, grad=False):
    return random_qkv(b, hq, nq, nk, d, dv, kv_heads=hkv, seed=seed, dtype=dtype, grad=grad)

def _official(q, k, v, kernel_func):
    """The official forward's attention lines (heads of equal count), non-causal."""
    q, k = KERNEL_FUNCS[kernel_func](q), KERNEL_FUNCS[kernel_func](k)
    n, scale = k.shape[2], q.shape[-1] ** -0.5
    kv = (k.transpose(-2, -1) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
    return q @ kv + (1 - q @ k.mean(dim=2, keepdim=True).transpose(-2, -1) * scale) * v.mean(dim=2, keepdim=True)


def _causal_loop(q, k, v, kernel_func, scale):
    """Each query i: the eq. 5 weights over its visible keys j <= i + Nk - Nq, one at a time."""
    phi = KERNEL_FUNCS[kernel_func]
    nq, nk = q.shape[2], k.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for i in range(nq):
        last = i + nk - nq
        if last < 0:
            continue
        a = scale * torch.einsum("bhd,bhjd->bhj", phi(q[:, :, i]), phi(k[:, :, : last + 1]))
        n = last + 1
        w = (a - a.mean(-1, keepdim=True) + 1) / n
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", w, v[:, :, : last + 1])
    return out


@pytest.mark.parametrize("backend", ("reference", "chunked"))
@pytest.mark.parametrize("kernel_func", MAPS)
@pytest.mark.parametrize("nq, nk", [(13, 13), (9, 21), (21, 5)])
def test_matches_the_official_formulation(backend, kernel_func, nq, nk):
    q, k, v = _inputs(hkv=4, nq=nq, nk=nk)
    out = inline_attention(q, k, v, feature_map=kernel_func, backend=backend)
    torch.testing.assert_close(out, _official(q, k, v, kernel_func), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ("reference", "chunked"))
@pytest.mark.parametrize("kernel_func", ("identity", "exp"))
@pytest.mark.parametrize("nq, nk", [(13, 13), (9, 21), (21, 5)])
def test_causal_matches_a_per_query_loop(backend, kernel_func, nq, nk):
    q, k, v = _inputs(hkv=4, nq=nq, nk=nk, seed=1)
    out = inline_attention(q, k, v, feature_map=kernel_func, causal=True, scale=0.3, chunk_size=4, backend=backend)
    torch.testing.assert_close(out, _causal_loop(q, k, v, kernel_func, 0.3), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", (False, True))
def test_rows_sum_to_one_and_scale_matters(causal):
    """Constant values pass through (each row of weights sums to 1), and unlike normalized linear
    attention, scaling a query changes its output: the map q -> row is injective."""
    q, k, v = _inputs(hkv=4)
    ones = torch.ones_like(v)
    torch.testing.assert_close(inline_attention(q, k, ones, causal=causal), ones[:, :, : q.shape[2]], atol=1e-12, rtol=0)
    assert not torch.allclose(inline_attention(q, k, v, causal=causal), inline_attention(2 * q, k, v, causal=causal))
    linear = attnzoo.get("linear")
    torch.testing.assert_close(
        linear(q, k, v, feature_map="relu", causal=causal, eps=1e-300), linear(2 * q, k, v, feature_map="relu", causal=causal, eps=1e-300)
    )


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("chunk_size", (1, 5, 64))
@pytest.mark.parametrize("feature_map", ("identity", "relu"))
def test_chunked_equals_reference_forward_and_gradients(causal, chunk_size, feature_map):
    q, k, v = _inputs(nq=23, nk=23, grad=True, seed=2)
    grads = []
    for backend in ("reference", "chunked"):
        out = inline_attention(q, k, v, causal=causal, feature_map=feature_map, chunk_size=chunk_size, backend=backend)
        grads.append((out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(), (q, k, v))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("splits", [(1,) * 9, (4, 1, 3, 1), (9,), (2, 7)])
def test_decoding_equals_the_causal_forward(splits):
    q, k, v = _inputs(nq=9, nk=9, seed=3)
    mech = attnzoo.get("inline")
    full = inline_attention(q, k, v, causal=True, feature_map="exp")
    params = mech.bind(mech.describe(q, k, v), {"causal": True, "feature_map": "exp"})
    state, outs, start = mech.decoder.init_state(mech.describe(q, k, v), **params), [], 0
    for size in splits:
        piece = slice(start, start + size)
        out, state = mech.decoder.step(q[:, :, piece], k[:, :, piece], v[:, :, piece], state, **params)
        outs.append(out)
        start += size
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-12, rtol=1e-10)
    assert state.kv.shape[-2:] == (8, 6) and state.values.shape[-1] == 5
    assert mech.state_size(8, 5) == 8 * 6 + 5


def test_float32_close_to_float64():
    q, k, v = _inputs(nq=200, nk=200, d=32, dv=32, seed=4)
    exact = inline_attention(q, k, v, causal=True)
    fast = inline_attention(q.float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(fast.double(), exact, atol=2e-5, rtol=2e-4)


def test_bad_inputs_are_named():
    q, k, v = _inputs()
    for name, bad in (("feature_map", "softmax"), ("scale", 0.0), ("causal", 1), ("chunk_size", 0)):
        with pytest.raises(ParameterError, match=name) as info:
            inline_attention(q, k, v, **{name: bad})
        assert info.value.argument == name
    mech = attnzoo.get("inline")
    params = mech.bind(mech.describe(q, k, v), {})
    with pytest.raises(ParameterError, match="causal"):
        mech.decoder.step(q, k, v, mech.decoder.init_state(mech.describe(q, k, v)), **params)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
def _module_pipeline(m: InLineAttention, x: torch.Tensor) -> torch.Tensor:
    """The official InLine-Swin forward written out for a (B, H, W, C) grid."""
    b, hh, ww, c = x.shape
    n, heads = hh * ww, m.num_heads
    tokens = x.reshape(b, n, c)
    q, k, v = F.linear(tokens, m.qkv.weight, m.qkv.bias).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    phi = KERNEL_FUNCS[m.feature_map]
    q, k = phi(q), phi(k)
    split = lambda t: t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    res_weight = m.residual(tokens.mean(dim=1).unsqueeze(dim=-1)).reshape(b * c, 1, 3, 3)
    scale = (c // heads) ** -0.5
    kv = (k.transpose(-2, -1) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
    out = q @ kv + (1 - q @ k.mean(dim=2, keepdim=True).transpose(-2, -1) * scale) * v.mean(dim=2, keepdim=True)
    out = out.transpose(1, 2).reshape(b, n, c)
    grid = v.transpose(1, 2).reshape(b, hh, ww, c).permute(0, 3, 1, 2).reshape(1, b * c, hh, ww)
    out = out + F.conv2d(grid, res_weight, None, padding=(1, 1), groups=b * c).reshape(b, c, n).permute(0, 2, 1)
    return F.linear(out, m.proj.weight, m.proj.bias).reshape(x.shape)


@pytest.mark.parametrize("feature_map", ("identity", "relu"))
def test_module_matches_the_official_pipeline(feature_map):
    torch.manual_seed(0)
    m = InLineAttention(24, 3, feature_map=feature_map).double()
    x = torch.randn(2, 5, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(m(x), _module_pipeline(m, x), atol=1e-12, rtol=1e-10)


def test_module_1d_and_without_local_term():
    torch.manual_seed(1)
    m = InLineAttention(16, 2, spatial_dims=1, kernel_size=5).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape and m.residual[2].weight.grad is not None
    bare = InLineAttention(16, 2, spatial_dims=1, kernel_size=None).double()
    bare.load_state_dict({k_: v_ for k_, v_ in m.state_dict().items() if not k_.startswith("residual")})
    q, k, v = bare.heads(x)
    torch.testing.assert_close(bare(x), bare.proj(bare.merge(inline_attention(q, k, v))))


def test_module_bad_arguments_are_named():
    for name, kwargs in (("spatial_dims", {"spatial_dims": 3}), ("kernel_size", {"kernel_size": 4}), ("num_heads", {"num_heads": 5})):
        with pytest.raises(ParameterError, match=name):
            InLineAttention(16, kwargs.pop("num_heads", 2), **kwargs)
    with pytest.raises(ShapeError, match="x"):
        InLineAttention(16, 2)(torch.randn(2, 9, 16))


# --------------------------------------------------------------------------------------------
# key_padding_mask (True = ignore the key): a padded batch equals each sequence alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference", "chunked"))
@pytest.mark.parametrize("causal", (False, True), ids=("noncausal", "causal"))
@pytest.mark.parametrize("side", ("right", "left"))
@pytest.mark.parametrize("feature_map", ("identity", "relu"))
def test_padded_batch_equals_each_sequence_alone(backend, causal, side, feature_map):
    """The mean, 1/n and v_bar run over the visible real keys: the count is the sequence's."""
    q, k, v = random_qkv(3, 4, PAD_N, PAD_N, 6, 5, kv_heads=2)

    def attend(q, k, v, **kw):
        return inline_attention(q, k, v, feature_map=feature_map, causal=causal, chunk_size=4, backend=backend, **kw)

    assert_padded_equals_alone(attend, q, k, v, side)


@pytest.mark.parametrize("backend", ("reference", "chunked"))
@pytest.mark.parametrize("causal", (False, True), ids=("noncausal", "causal"))
def test_cross_attention_with_padded_keys(backend, causal):
    """Causal cross-attention is bottom-right aligned to the last key: padded on the left, the
    real keys end where the sequence alone ends (exact); padded on the right they would not."""
    q, _, _ = random_qkv(3, 2, 5, 5, 5, 4, seed=1)
    _, k, v = random_qkv(3, 2, PAD_N, PAD_N, 5, 4, seed=2)
    attend = lambda q, k, v, **kw: inline_attention(q, k, v, causal=causal, backend=backend, **kw)  # noqa: E731
    assert_padded_equals_alone(attend, q, k, v, "left" if causal else "right", cross=True)
