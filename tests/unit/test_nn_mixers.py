"""Oracles for the attention-free comparison mixers (catalog M16), each written out from the paper's
equations / the official code's arithmetic with loops and einsums (explicit DFT sums, explicit
depthwise-convolution sums, explicit norms), independently of the modules, plus the papers' properties."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn.vision.mixers import (
    FFNifiedAttention,
    GLUMixer,
    NetworkInNetworkGating,
    RecursiveGatedConv,
    ScaleAwareModulation,
    SpectralGating,
)

DT = torch.float64


def _dwconv(x, w, b=None):
    """Depthwise conv, zero 'same' padding, as an explicit sum over kernel offsets: x (B, C, H, W), w (C, 1, k, k)."""
    k = w.shape[-1]
    p = k // 2
    hh, ww = x.shape[-2:]
    xp = torch.nn.functional.pad(x, (p, p, p, p))
    out = torch.zeros_like(x)
    for i in range(k):
        for j in range(k):
            out = out + w[:, 0, i, j][None, :, None, None] * xp[:, :, i : i + hh, j : j + ww]
    return out if b is None else out + b[None, :, None, None]


def _pw(x, w, b=None):
    """1x1 conv (B, Cin, H, W) -> (B, Cout, H, W)."""
    out = torch.einsum("oc,bchw->bohw", w[:, :, 0, 0], x)
    return out if b is None else out + b[None, :, None, None]


def _bn_eval(x, bn):
    return (x - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps) * bn.weight[
        None, :, None, None
    ] + bn.bias[None, :, None, None]


def _randomize_bn(module):
    g = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g, dtype=m.weight.dtype))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype))


def _ln(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


# ------------------------------------------------------------------------ SpectFormer spectral gating


def _spectral_oracle(x, weight):
    """y = irfft2(W * rfft2(x)) with orthonormal DFT sums written out (x (B, H, W, C), W (H, W//2+1, C) complex)."""
    b, hh, ww, c = x.shape
    wf = ww // 2 + 1
    m = torch.arange(hh, dtype=DT)
    n = torch.arange(ww, dtype=DT)
    fh = torch.exp(-2j * math.pi * torch.outer(m, m) / hh)  # (k, m)
    fw = torch.exp(-2j * math.pi * torch.outer(torch.arange(wf, dtype=DT), n) / ww)  # (l, n)
    xc = x.to(torch.complex128)
    spec = torch.einsum("km,ln,bmnc->bklc", fh, fw, xc) / math.sqrt(hh * ww)
    spec = spec * weight
    # inverse: y[m, n] = sum_l c_l Re(sum_k Y[k, l] e^{2 pi i (k m / H + l n / W)}) / sqrt(HW)
    cl = torch.full((wf,), 2.0, dtype=DT)
    cl[0] = 1.0
    if ww % 2 == 0:
        cl[-1] = 1.0
    z = torch.einsum("km,ln,bklc->bmnlc", fh.conj(), fw.conj(), spec)
    return (z.real * cl[None, None, None, :, None]).sum(3) / math.sqrt(hh * ww)


@pytest.mark.parametrize("grid", [(6, 8), (5, 7)])
def test_spectral_gating_matches_explicit_dft(grid):
    torch.manual_seed(0)
    layer = SpectralGating(4, grid_size=grid).to(DT)
    with torch.no_grad():
        layer.complex_weight.normal_()
    x = torch.randn(2, *grid, 4, dtype=DT)
    ref = _spectral_oracle(x, torch.view_as_complex(layer.complex_weight.detach()))
    torch.testing.assert_close(layer(x), ref)


def test_spectral_gating_with_unit_weights_is_identity_and_float32_follows():
    layer = SpectralGating(8, grid_size=(6, 5))
    with torch.no_grad():
        layer.complex_weight.zero_()
        layer.complex_weight[..., 0] = 1.0
    x = torch.randn(2, 6, 5, 8)
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_spectral_gating_refuses_another_grid():
    with pytest.raises(ShapeError, match="expected"):
        SpectralGating(8, grid_size=(6, 5))(torch.randn(1, 6, 6, 8))
    with pytest.raises(ParameterError, match="grid_size"):
        SpectralGating(8, grid_size=(6, 0))


# ------------------------------------------------------------------------ HorNet g^n Conv


def _gnconv_oracle(layer, x):
    c, n = layer.dim, layer.order
    dims = [c // 2 ** (n - 1 - k) for k in range(n)]  # C_0 = C / 2^{n-1} ... C_{n-1} = C
    y = _pw(x, layer.proj_in.weight, layer.proj_in.bias)
    p, q = y[:, : dims[0]], y[:, dims[0] :]
    q = _dwconv(q, layer.dwconv.weight, layer.dwconv.bias) * layer.scale
    qs, start = [], 0
    for d in dims:
        qs.append(q[:, start : start + d])
        start += d
    p = p * qs[0]
    for k in range(1, n):
        p = _pw(p, layer.pws[k - 1].weight, layer.pws[k - 1].bias) * qs[k]
    return _pw(p, layer.proj_out.weight, layer.proj_out.bias)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_gnconv_matches_the_recursion(order):
    torch.manual_seed(0)
    layer = RecursiveGatedConv(16, order, kernel_size=5).to(DT)
    x = torch.randn(2, 16, 6, 7, dtype=DT)
    torch.testing.assert_close(layer(x), _gnconv_oracle(layer, x))


def test_gnconv_order_one_is_the_gated_conv():
    # n = 1: y = phi_out(p_0 * s DWConv(q_0)), p_0 and q_0 the two halves of phi_in(x)
    torch.manual_seed(1)
    layer = RecursiveGatedConv(8, 1, scale=0.5).to(DT)
    assert layer.dims == [8] and len(layer.pws) == 0
    x = torch.randn(1, 8, 9, 9, dtype=DT)
    y = _pw(x, layer.proj_in.weight, layer.proj_in.bias)
    p0, q0 = y[:, :8], y[:, 8:]
    ref = _pw(p0 * 0.5 * _dwconv(q0, layer.dwconv.weight, layer.dwconv.bias), layer.proj_out.weight, layer.proj_out.bias)
    torch.testing.assert_close(layer(x), ref)


def test_gnconv_channel_split_and_refusals():
    assert RecursiveGatedConv(64, 4).dims == [8, 16, 32, 64]
    with pytest.raises(ParameterError, match="order"):
        RecursiveGatedConv(24, 5)
    with pytest.raises(ShapeError, match="expected"):
        RecursiveGatedConv(16, 2)(torch.randn(1, 8, 8, 16))


# ------------------------------------------------------------------------ SMT scale-aware modulation


def test_smt_sam_matches_official_arithmetic():
    torch.manual_seed(0)
    c, heads, r = 12, 3, 2
    layer = ScaleAwareModulation(c, heads, expand_ratio=r, qkv_bias=True).to(DT)
    with torch.no_grad():
        _randomize_bn(layer)
    layer.eval()
    x = torch.randn(2, 5, 6, c, dtype=DT)
    v = x @ layer.v.weight.T + layer.v.bias
    s = (x @ layer.s.weight.T + layer.s.bias).permute(0, 3, 1, 2)
    g = c // heads
    outs = []
    for i in range(heads):  # MHMC: head i, kernel 3 + 2 i
        conv = layer.local_convs[i]
        assert conv.kernel_size == (3 + 2 * i, 3 + 2 * i)
        outs.append(_dwconv(s[:, i * g : (i + 1) * g], conv.weight, conv.bias))
    z = torch.empty_like(s)
    for j in range(g):  # SAA: channel j of every head, side by side
        for i in range(heads):
            z[:, j * heads + i] = outs[i][:, j]
    w0 = layer.proj0.weight[:, :, 0, 0]  # (C r, heads): group j maps channels [j h, (j+1) h) to [j h r, (j+1) h r)
    y0 = torch.cat(
        [torch.einsum("oc,bchw->bohw", w0[j * heads * r : (j + 1) * heads * r], z[:, j * heads : (j + 1) * heads]) for j in range(g)], 1
    ) + layer.proj0.bias[None, :, None, None]
    mod = _pw(_gelu(_bn_eval(y0, layer.bn)), layer.proj1.weight, layer.proj1.bias).permute(0, 2, 3, 1)
    ref = (mod * v) @ layer.proj.weight.T + layer.proj.bias
    torch.testing.assert_close(layer(x), ref)


def test_smt_sam_is_local():
    # no attention: an output pixel only sees its neighbours within the largest kernel (7 for 3 heads)
    torch.manual_seed(0)
    layer = ScaleAwareModulation(12, 3).to(DT).eval()
    x = torch.randn(1, 16, 16, 12, dtype=DT)
    x2 = x.clone()
    x2[0, 15, 15] += 1.0
    d = (layer(x) - layer(x2)).abs().sum(-1)[0]
    assert d[15, 15] > 0 and d[:12].abs().max() == 0 and d[:, :12].abs().max() == 0


# ------------------------------------------------------------------------ Activator GLU mixer


def test_glu_mixer_matches_formula_and_mixes_channels_only():
    torch.manual_seed(0)
    layer = GLUMixer(8, 12).to(DT)
    with torch.no_grad():
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    x = torch.randn(2, 5, 8, dtype=DT)
    u = _ln(_gelu(x @ layer.proj_1.weight.T + layer.proj_1.bias), layer.norm.weight, layer.norm.bias)
    v = _ln(x @ layer.proj_2.weight.T + layer.proj_2.bias, layer.norm.weight, layer.norm.bias)  # the SAME norm
    torch.testing.assert_close(layer(x), (u * v) @ layer.proj_3.weight.T + layer.proj_3.bias)
    perm = torch.randperm(5)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm])


# ------------------------------------------------------------------------ MetaMixer FFNified attention


@pytest.mark.parametrize("ks", [(3, 3), (7, 7), (5, 7)])
def test_ffnified_attention_matches_official_arithmetic(ks):
    torch.manual_seed(0)
    layer = FFNifiedAttention(6, kernel_sizes=ks).to(DT)
    with torch.no_grad():
        _randomize_bn(layer)
    layer.eval()
    x = torch.randn(2, 6, 9, 8, dtype=DT)

    def dw(mod, t, k):
        if k == 7:  # RepVGGDW: Conv-BN 7x7 + Conv-BN 3x3
            return _bn_eval(_dwconv(t, mod.conv.c.weight), mod.conv.bn) + _bn_eval(_dwconv(t, mod.conv1.c.weight), mod.conv1.bn)
        return _dwconv(t, mod.weight, mod.bias)

    q = _bn_eval(_pw(x, layer.fc.c.weight), layer.fc.bn)
    ref = dw(layer.conv2, _gelu(dw(layer.conv1, q, ks[0])), ks[1])
    torch.testing.assert_close(layer(x), ref)


def test_ffnified_repvgg_branch_reparameterises_into_one_7x7_conv():
    torch.manual_seed(0)
    layer = FFNifiedAttention(4, kernel_sizes=(7, 7)).to(DT)
    with torch.no_grad():
        _randomize_bn(layer)
    layer.eval()
    rep = layer.conv1

    def fuse(cb):
        scale = cb.bn.weight / torch.sqrt(cb.bn.running_var + cb.bn.eps)
        return cb.c.weight * scale[:, None, None, None], cb.bn.bias - cb.bn.running_mean * scale

    w7, b7 = fuse(rep.conv)
    w3, b3 = fuse(rep.conv1)
    w = w7 + torch.nn.functional.pad(w3, (2, 2, 2, 2))
    x = torch.randn(1, 4, 8, 8, dtype=DT)
    torch.testing.assert_close(rep(x), _dwconv(x, w, b7 + b3))


# ------------------------------------------------------------------------ NiNformer gating


def _mlp(x, seq):
    return _gelu(x @ seq[0].weight.T + seq[0].bias) @ seq[2].weight.T + seq[2].bias


def test_nin_gating_matches_official_arithmetic():
    torch.manual_seed(0)
    layer = NetworkInNetworkGating(8, seq_len=6, hidden_dim=10, token_dim=7).to(DT)
    x = torch.randn(2, 6, 8, dtype=DT)
    t = _ln(x, layer.norm_tok.weight, layer.norm_tok.bias)
    z = x + _mlp(t.transpose(1, 2), layer.token_mlp).transpose(1, 2)
    g = z + _mlp(_ln(z, layer.norm_ch.weight, layer.norm_ch.bias), layer.channel_mlp)
    ref = (x @ layer.proj.weight.T + layer.proj.bias) * g
    torch.testing.assert_close(layer(x), ref)


def test_nin_gating_with_a_unit_linear_path_is_the_mixer_block_and_mixes_tokens():
    torch.manual_seed(0)
    layer = NetworkInNetworkGating(8, seq_len=6, hidden_dim=10).to(DT)
    with torch.no_grad():
        layer.proj.weight.zero_()
        layer.proj.bias.fill_(1.0)
    x = torch.randn(1, 6, 8, dtype=DT)
    torch.testing.assert_close(layer(x), layer.mixer(x))
    x2 = x.clone()
    x2[0, 0] += 1.0
    assert (layer(x) - layer(x2))[0, 1:].abs().max() > 0  # the gate sees the whole sequence
    with pytest.raises(ShapeError, match="seq_len"):
        layer(torch.randn(1, 5, 8, dtype=DT))
