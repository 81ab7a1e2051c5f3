"""transnormer / transnormer_diag (F7, TransNormer): every backend against the official layers'
formulation written out (OpenNLPLab/fairseq-evo NormLinearAttention and NormLocalAttention:
heads merged before the norm, zero-padded chunks), fast == reference in float64 for outputs and
gradients (norm gains included), chunk sizes that do not divide N, decoding == the full causal
forward, the module against its pipeline, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.linear.transnormer import transnormer_attention, transnormer_diag_attention
from attnzoo.nn.linear.transnormer import TransNormerAttention

from .qkv import random_qkv
from .padding import N as PAD_N, assert_padded_equals_alone, padding

TINY = 1e-300  # a positive norm eps that changes nothing: the oracle's norms take eps = 0
NORM = attnzoo.get("transnormer")
DIAG = attnzoo.get("transnormer_diag")


def _inputs(b=2, h=3, nq=13, nk=13, d=6, dv=4, seed=0, dtype=torch.float64, kv_heads=None):
    return random_qkv(b, h, nq, nk, d, dv, kv_heads=kv_heads, seed=seed, dtype=dtype)

# --------------------------------------------------------------------------------------------
# oracles: the official layers' computation, (time, batch, channels) layout as fairseq's
# --------------------------------------------------------------------------------------------
def _to_fairseq(x):
    """(B, H, N, d) heads -> (N, B, H d) channels, the official layers' layout."""
    b, h, n, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(n, b, h * d)


def _bmm_heads(x, b, h):
    """(N, B, H d) -> (B H, N, d): the official ``view(-1, bsz * num_heads, head_dim).transpose(0, 1)``."""
    n = x.shape[0]
    return x.contiguous().view(n, b * h, -1).transpose(0, 1)


def _official_norm_linear(q, k, v, act, causal, norm, weight, bias):
    """NormLinearAttention.forward after its projections: act on q and k, no scaling, no
    denominator, masked bmm when causal, heads merged, then the norm over embed_dim."""
    b, h, nq = q.shape[:3]
    q, k, v = (_bmm_heads(_to_fairseq(t), b, h) for t in (q, k, v))
    q, k = act(q), act(k)
    if causal:
        mask = (torch.triu(torch.ones(nq, nq)) == 1).transpose(0, 1)
        weights = torch.bmm(q, k.transpose(1, 2)).masked_fill(~mask, 0)
        output = torch.bmm(weights, v)
    else:
        output = torch.bmm(q, torch.matmul(k.transpose(1, 2), v))
    output = output.transpose(0, 1).contiguous().view(nq, b, -1)  # (N, B, H dv)
    if norm == "layer":
        output = F.layer_norm(output, output.shape[-1:], weight.flatten(), bias.flatten(), eps=0.0)
    else:  # the official RMSNorm: x / (|x| / sqrt(d)), eps = 0
        output = output / (output.norm(2, dim=-1, keepdim=True) * output.shape[-1] ** -0.5) * weight.flatten()
    return output.view(nq, b, h, -1).permute(1, 2, 0, 3)  # back to (B, H, N, dv)


def _official_local(q, k, v, chunk, causal, relu):
    """NormLocalAttention.forward_chunk after its projections: q scaled by d^-0.5, every length
    zero-padded to a multiple of the chunk, (B H, g, l, e) chunks, act (relu) on the logits,
    the causal mask, the chunk-wise product, padding cut. With ``relu=False`` softmax takes the
    act's place inside each chunk, over the chunk's real keys (the paper's vanilla attention)."""
    b, h, n, d = q.shape
    pad = (chunk - n % chunk) % chunk
    q = q * d**-0.5
    q, k, v = (F.pad(t, (0, 0, 0, pad)).reshape(b * h, -1, chunk, t.shape[-1]) for t in (q, k, v))
    logits = torch.einsum("bgle,bgse->bgls", q, k)
    keep = torch.ones(chunk, chunk, dtype=torch.bool)
    if causal:
        keep = keep.tril()
    if relu:
        prob = torch.relu(logits).masked_fill(~keep, 0)
    else:
        real = (torch.arange(n + pad) < n).view(-1, chunk)  # (g, s): padded keys are no keys
        prob = torch.softmax(logits.masked_fill(~(keep & real[:, None, :]), float("-inf")), dim=-1)
    out = torch.einsum("bgls,bgsd->bgld", prob, v).reshape(b, h, n + pad, -1)
    return out[:, :, :n]


def _plain_elu(x):
    return F.elu(x)


def _one_plus_elu(x):
    return F.elu(x) + 1


# --------------------------------------------------------------------------------------------
# NormAttention
# --------------------------------------------------------------------------------------------
NORM_BACKENDS = ("reference", "chunked", "recurrent")


@pytest.mark.parametrize("backend", NORM_BACKENDS)
@pytest.mark.parametrize(
    "causal, n, chunk, fmap, norm",
    [
        (False, 13, 64, "elu", "layer"),
        (False, 13, 5, "plain-elu", "rms"),
        (True, 13, 64, "elu", "rms"),
        (True, 37, 5, "plain-elu", "layer"),
        (True, 16, 4, "relu", "layer"),
        (True, 1, 1, "elu", "rms"),
    ],
    ids=["bidir-N13-elu-ln", "bidir-N13-L5-F.elu-rms", "causal-N13-elu-rms", "causal-N37-L5-F.elu-ln", "causal-N16-L4-relu-ln", "causal-N1"],
)
def test_norm_attention_matches_the_official_layer(backend, causal, n, chunk, fmap, norm):
    q, k, v = _inputs(nq=n, nk=n)
    gen = torch.Generator().manual_seed(3)
    weight = 1 + 0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bias = 0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    phi = {"elu": "elu", "plain-elu": _plain_elu, "relu": "relu"}[fmap]
    act = {"elu": _one_plus_elu, "plain-elu": _plain_elu, "relu": torch.relu}[fmap]
    out = transnormer_attention(
        q, k, v, causal=causal, feature_map=phi, norm=norm, norm_weight=weight, norm_bias=bias if norm == "layer" else None,
        norm_eps=TINY, chunk_size=chunk, backend=backend,
    )  # fmt: skip
    want = _official_norm_linear(q, k, v, act, causal, norm, weight, bias)
    torch.testing.assert_close(out, want, atol=1e-11, rtol=1e-10)


def test_no_denominator_and_scale_free():
    """The output is the norm of the bare sum: scaling v (or, with relu, q) leaves it unchanged
    up to the norm's eps, which linear attention's denominator would not explain for v."""
    q, k, v = _inputs(nq=20, nk=20)
    out = transnormer_attention(q, k, v, feature_map="relu", norm="rms", norm_eps=TINY)
    torch.testing.assert_close(transnormer_attention(q * 7, k, v * 3, feature_map="relu", norm="rms", norm_eps=TINY), out, atol=1e-12, rtol=1e-10)
    normalized = attnzoo.functional.linear_attention(q, k, v, feature_map="relu", scale=1.0)
    assert not torch.allclose(out, normalized, atol=1e-3)


@pytest.mark.parametrize("scope", ["token", "head"])
def test_norm_scope(scope):
    """token: mean 0 and variance 1 over each token's H x Dv channels; head: over each head's Dv."""
    q, k, v = _inputs(nq=9, nk=9)
    out = transnormer_attention(q, k, v, norm_scope=scope, norm_eps=TINY, backend="chunked")
    dims = (1, -1) if scope == "token" else (-1,)
    torch.testing.assert_close(out.mean(dims), torch.zeros_like(out.mean(dims)), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.var(dims, unbiased=False), torch.ones_like(out.mean(dims)), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "causal, nq, nk, scope, norm",
    [(False, 11, 11, "token", "layer"), (False, 9, 21, "head", "rms"), (True, 11, 11, "head", "layer"), (True, 7, 12, "token", "rms"), (True, 12, 7, "token", "layer")],
    ids=["bidir-self-token-ln", "bidir-cross-head-rms", "causal-self-head-ln", "causal-Nq<Nk-token-rms", "causal-Nq>Nk-token-ln"],
)
def test_fast_forms_equal_the_reference_with_gradients(causal, nq, nk, scope, norm):
    q, k, v = _inputs(nq=nq, nk=nk, h=4, kv_heads=2)
    gen = torch.Generator().manual_seed(5)
    weight = (1 + 0.3 * torch.randn(4, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    bias = (0.3 * torch.randn(4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    leaves = [t.requires_grad_(True) for t in (q, k, v)] + [weight, bias]
    params = dict(causal=causal, norm=norm, norm_scope=scope, norm_weight=weight, norm_bias=bias, chunk_size=3)
    proj = torch.randn(2, 4, nq, 4, generator=gen, dtype=torch.float64)
    ref = transnormer_attention(q, k, v, backend="reference", **params)
    want = torch.autograd.grad((ref * proj).sum(), leaves)
    for backend in ("chunked", "recurrent"):
        out = transnormer_attention(q, k, v, backend=backend, **params)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        got = torch.autograd.grad((out * proj).sum(), leaves)
        for name, g, w in zip(("q", "k", "v", "norm_weight", "norm_bias"), got, want):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9, msg=lambda m, b=backend, n=name: f"{b} d{n}: {m}")


@pytest.mark.parametrize("splits", [(1, 1, 1, 30), (5, 3, 7, 2, 40), (64,)], ids=["tokens", "mixed", "one-call"])
def test_norm_decoding_equals_the_causal_forward(splits):
    q, k, v = _inputs(nq=33, nk=33, h=4, kv_heads=2, d=8, dv=5)
    weight = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    params = dict(causal=True, norm="rms", norm_weight=weight, chunk_size=4, feature_map=_plain_elu)
    full = NORM(q, k, v, **params)
    state = NORM.init_state(q, k, v, **params)
    outs, start = [], 0
    for size in splits:
        stop = min(33, start + size)
        if stop == start:
            break
        out, state = NORM.step(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, **params)
        outs.append(out)
        start = stop
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-10)
    assert state.kv.shape == (2, 4, 8, 5) and NORM.state_size(8, 5, **params) == 8 * 5


def test_norm_bad_inputs_are_named():
    q, k, v = _inputs()
    for name, bad in [
        ("feature_map", "softmax_kernel"),
        ("norm", "group"),
        ("norm_scope", "batch"),
        ("norm_weight", torch.ones(5)),
        ("norm_bias", torch.ones(2, 4)),
        ("norm_eps", 0.0),
        ("chunk_size", 0),
    ]:
        with pytest.raises(ParameterError) as info:
            transnormer_attention(q, k, v, **{name: bad})
        assert info.value.argument == name and name in str(info.value)


# --------------------------------------------------------------------------------------------
# DiagAttention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "blocks"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n, block", [(32, 8), (37, 8), (5, 8), (13, 1), (16, 16)], ids=["N32-w8", "N37-w8", "N5-w8", "N13-w1", "N16-w16"])
def test_diag_attention_matches_the_official_layer(backend, kernel, causal, n, block):
    q, k, v = _inputs(nq=n, nk=n, d=8, dv=5)
    out = transnormer_diag_attention(q, k, v, block_size=block, causal=causal, kernel=kernel, backend=backend)
    torch.testing.assert_close(out, _official_local(q, k, v, block, causal, kernel == "relu"), atol=1e-12, rtol=1e-10)


def test_block_larger_than_n_is_full_attention():
    q, k, v = _inputs(nq=20, nk=20)
    for causal in (False, True):
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(transnormer_diag_attention(q, k, v, block_size=1000, causal=causal), dense, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_diag_gradients_equal_the_reference(kernel):
    q, k, v = _inputs(nq=29, nk=29, h=4, kv_heads=2)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    proj = torch.randn(2, 4, 29, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for causal in (False, True):
        grads = {}
        for backend in ("reference", "blocks"):
            out = transnormer_diag_attention(q, k, v, block_size=6, causal=causal, kernel=kernel, scale=0.7, backend=backend)
            grads[backend] = torch.autograd.grad((out * proj).sum(), leaves)
        for name, g, w in zip("qkv", grads["blocks"], grads["reference"]):
            torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("splits", [(1,) * 23, (3, 5, 1, 7, 2, 30), (4, 4, 4, 40)], ids=["tokens", "mixed", "block-aligned"])
def test_diag_decoding_equals_the_causal_forward(kernel, splits):
    q, k, v = _inputs(nq=23, nk=23, d=8, dv=3)
    params = dict(block_size=4, causal=True, kernel=kernel)
    full = DIAG(q, k, v, **params)
    state = DIAG.init_state(q, k, v, **params)
    outs, start = [], 0
    for size in splits:
        stop = min(23, start + size)
        if stop == start:
            break
        out, state = DIAG.step(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, **params)
        assert state.k is None or state.k.shape[2] == stop % 4  # only the open block is kept
        outs.append(out)
        start = stop
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-10)
    assert DIAG.state_size(8, 3, **params) == 3 * (8 + 3)


def test_diag_bad_inputs_are_named():
    q, k, v = _inputs()
    for name, bad in [("block_size", 0), ("block_size", -3), ("block_size", 2.0), ("kernel", "exp"), ("scale", 0.0)]:
        with pytest.raises(ParameterError) as info:
            transnormer_diag_attention(q, k, v, **{name: bad})
        assert info.value.argument == name and name in str(info.value)
    with pytest.raises(ShapeError):  # blocks pair queries and keys of one sequence
        transnormer_diag_attention(q, k[:, :, :7], v[:, :, :7])
    with pytest.raises(ParameterError, match="causal"):
        DIAG.step(q, k, v, DIAG.init_state(q, k, v, block_size=4))  # causal=False bound at init_state


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["norm", "diag"])
def test_module_matches_the_official_pipeline(kind):
    torch.manual_seed(0)
    layer = TransNormerAttention(24, 3, kind=kind, causal=True, feature_map=_plain_elu, block_size=5, kernel="relu", norm_eps=TINY).double()
    with torch.no_grad():
        layer.norm_weight.normal_(1, 0.2)
        layer.norm_bias.normal_(0, 0.2)
    x = torch.randn(2, 17, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    qkv = layer.qkv(x).view(2, 17, 3, 3, 8).permute(2, 0, 3, 1, 4)
    if kind == "norm":
        out = _official_norm_linear(qkv[0], qkv[1], qkv[2], _plain_elu, True, "layer", layer.norm_weight, layer.norm_bias)
    else:
        raw = _official_local(qkv[0], qkv[1], qkv[2], 5, True, relu=True)
        merged = F.layer_norm(_to_fairseq(raw), (24,), layer.norm_weight.flatten(), layer.norm_bias.flatten(), eps=0.0)
        out = merged.view(17, 2, 3, 8).permute(1, 2, 0, 3)
    want = layer.proj(out.transpose(1, 2).reshape(2, 17, 24))
    torch.testing.assert_close(y, want, atol=1e-11, rtol=1e-10)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_module_bad_arguments():
    for name, kwargs in [("kind", {"kind": "local"}), ("norm", {"norm": "batch"}), ("norm_scope", {"norm_scope": "all"}), ("num_heads", {"num_heads": 5})]:
        with pytest.raises(ParameterError) as info:
            TransNormerAttention(24, kwargs.pop("num_heads", 3), **kwargs)
        assert info.value.argument == name
    with pytest.raises(ShapeError):
        TransNormerAttention(24, 3)(torch.randn(2, 5, 12))


# --------------------------------------------------------------------------------------------
# key_padding_mask (True = ignore the key): a padded batch equals each sequence alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference", "chunked", "recurrent"))
@pytest.mark.parametrize("causal", (False, True), ids=("noncausal", "causal"))
@pytest.mark.parametrize("side", ("right", "left"))
@pytest.mark.parametrize("feature_map, scope", [("elu", "token"), ("relu", "head"), ("identity", "token")])
def test_norm_attention_padded_batch_equals_each_sequence_alone(backend, causal, side, feature_map, scope):
    q, k, v = random_qkv(3, 4, PAD_N, PAD_N, 6, 5, kv_heads=2)

    def attend(q, k, v, **kw):
        return transnormer_attention(q, k, v, feature_map=feature_map, norm_scope=scope, causal=causal, chunk_size=4, backend=backend, **kw)

    assert_padded_equals_alone(attend, q, k, v, side)


@pytest.mark.parametrize("backend", ("reference", "blocks"))
@pytest.mark.parametrize("causal", (False, True), ids=("noncausal", "causal"))
@pytest.mark.parametrize("kernel", ("softmax", "relu"))
@pytest.mark.parametrize("block_size", (1, 4, 64))
def test_diag_attention_right_padded_batch_equals_each_sequence_alone(backend, causal, kernel, block_size):
    q, k, v = random_qkv(3, 4, PAD_N, PAD_N, 6, 5, kv_heads=2)

    def attend(q, k, v, **kw):
        return transnormer_diag_attention(q, k, v, block_size=block_size, causal=causal, kernel=kernel, backend=backend, **kw)

    assert_padded_equals_alone(attend, q, k, v, "right")


@pytest.mark.parametrize("backend", ("reference", "blocks"))
def test_diag_attention_refuses_left_padding_and_zeroes_rows_without_keys(backend):
    """Left: the blocks are cut from position 0, so pads would move them: refused. A row whose
    block holds only pads (block 2 of entry 1 here) outputs 0, not NaN, and its gradient is finite."""
    q, k, v = random_qkv(2, 2, 12, 12, 4, 3, grad=True)
    with pytest.raises(ParameterError) as info:
        transnormer_diag_attention(q, k, v, block_size=4, key_padding_mask=padding("left", (12, 5), 12), backend=backend)
    assert info.value.argument == "key_padding_mask"
    pad = padding("right", (12, 5), 12)
    out = transnormer_diag_attention(q, k, v, block_size=4, key_padding_mask=pad, backend=backend)
    assert torch.all(out[1, :, 8:] == 0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
