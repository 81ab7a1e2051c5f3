"""CNN attention blocks (catalog C1-C9): each against its paper's equations written out here (loops and
einsums over the module's weights, not calls of its internals), against timm where timm has the block
(ECA, coordinate attention + SE), the papers' properties (zero-init gains give the identity, gates in (0, 1),
maps that sum to 1, padded frames ignored) and ``create_attn``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn import (
    AttentiveStatisticsPooling,
    ChannelAttentionModule,
    EfficientChannelAttention,
    EfficientLocalAttention,
    PartialChannelAttention,
    PartialSpatialAttention,
    PolarizedSelfAttention,
    PositionAttentionModule,
    SECoordAttention,
    SentenceAttentionBlock,
    SERes2Block,
    SubspaceAttention,
)
from attnzoo.nn.cnn import ATTN_NAMES, create_attn, eca_kernel_size

D = torch.float64


def image(b=2, c=16, h=6, w=7, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=D)


def randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Every parameter and BatchNorm statistic random (zero-init gains and unit BN stats hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
    return module


def bn_eval(x, bn, channels=slice(None)):
    """BatchNorm in eval mode over dim 1 (its ``channels`` slice), written out."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var, weight, bias = (t[channels].view(shape) for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    return (x - mean) / torch.sqrt(var + bn.eps) * weight + bias


def hardsigmoid(z):
    return torch.clamp(z / 6 + 0.5, 0, 1)


# --------------------------------------------------------------------------------------------- C1 ECA


@pytest.mark.parametrize("channels,k", [(1, 1), (4, 1), (7, 1), (8, 3), (16, 3), (64, 3), (128, 5), (256, 5), (1024, 5), (2048, 7)])
def test_eca_kernel_is_the_papers_adaptive_odd_size(channels, k):
    # |log2(C)/2 + 1/2|_odd, computed as the authors' code: int(t), +1 when even
    t = int(abs(math.log2(channels) / 2 + 0.5))
    assert eca_kernel_size(channels) == (t if t % 2 else t + 1) == k
    assert EfficientChannelAttention(channels).kernel_size == k


def test_eca_equals_eq7_written_out():
    eca = randomize(EfficientChannelAttention(16, kernel_size=5).to(D))
    x = image()
    w = eca.conv.weight.view(-1)
    y = x.mean(dim=(2, 3))  # GAP
    gate = torch.zeros_like(y)
    for c in range(16):
        for j in range(5):
            src = c + j - 2
            if 0 <= src < 16:  # zero padding across the channel axis
                gate[:, c] += w[j] * y[:, src]
    want = x * torch.sigmoid(gate)[:, :, None, None]
    torch.testing.assert_close(eca(x), want)


@pytest.mark.parametrize("channels", [4, 16, 256])
def test_eca_from_timm_matches_timm(channels):
    timm = pytest.importorskip("timm")  # noqa: F841
    from timm.layers.eca import EcaModule

    torch.manual_seed(0)
    ref = EcaModule(channels=channels)
    with torch.no_grad():
        ref.conv.weight.normal_()
    ours = EfficientChannelAttention.from_timm(ref, channels)
    x = torch.randn(2, channels, 5, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    # timm clamps k >= 3; the paper does not: they differ below C = 8 only
    assert ours.kernel_size == max(eca_kernel_size(channels), 3)
    assert (EfficientChannelAttention(channels).kernel_size == ours.kernel_size) == (channels >= 8)


def test_eca_from_timm_refuses_the_mlp_variant():
    pytest.importorskip("timm")
    from timm.layers.eca import EcaModule

    with pytest.raises(ParameterError, match="use_mlp"):
        EfficientChannelAttention.from_timm(EcaModule(channels=16, use_mlp=True), 16)
    with pytest.raises(ParameterError, match="kernel_size"):
        EfficientChannelAttention(16, kernel_size=4)


# ---------------------------------------------------------------------------------------- C6 PAM / CAM


def test_pam_and_cam_are_the_identity_at_init():
    x = image()
    for module in (PositionAttentionModule(16), ChannelAttentionModule(16)):
        assert module.gamma.item() == 0.0
        torch.testing.assert_close(module.to(D)(x), x, rtol=0, atol=0)


def test_pam_equals_danet_eq1_eq2_written_out():
    pam = randomize(PositionAttentionModule(16).to(D))
    x = image()
    b, c, h, w = x.shape
    n = h * w
    a = x.reshape(b, c, n)

    def conv(m):
        return torch.einsum("oi,bin->bon", m.weight[:, :, 0, 0], a) + m.bias[None, :, None]

    q, k, v = conv(pam.query), conv(pam.key), conv(pam.value)
    s = torch.einsum("bci,bcj->bij", q, k)  # B_i . C_j, no scale
    s = torch.exp(s - s.amax(-1, keepdim=True))
    s = s / s.sum(-1, keepdim=True)  # normalised over the keys j, per query i
    out = torch.einsum("bij,bcj->bci", s, v)
    want = pam.gamma * out.view(b, c, h, w) + x
    torch.testing.assert_close(pam(x), want)


def test_cam_equals_danet_eq3_eq4_as_the_code_computes():
    cam = ChannelAttentionModule(16, gamma_init=0.7).to(D)
    x = image() * 0.2
    b, c, h, w = x.shape
    a = x.reshape(b, c, h * w)
    energy = a @ a.transpose(1, 2)
    energy = energy.amax(-1, keepdim=True) - energy  # the official code's max - E
    attn = torch.exp(energy - energy.amax(-1, keepdim=True))
    attn = attn / attn.sum(-1, keepdim=True)
    want = 0.7 * (attn @ a).view(b, c, h, w) + x
    torch.testing.assert_close(cam(x), want)


def test_pam_refuses_a_reduction_wider_than_the_channels():
    with pytest.raises(ParameterError, match="reduction"):
        PositionAttentionModule(4, reduction=8)


# ------------------------------------------------------------------------------------------- C4 PSA


def _conv1x1(m, x):
    out = torch.einsum("oi,bihw->bohw", m.weight[:, :, 0, 0], x)
    return out if m.bias is None else out + m.bias[None, :, None, None]


def _psa_oracle(psa, x):
    """DeLightCMU's PSA_p / PSA_s arithmetic, branch by branch."""
    b, c, h, w = x.shape

    def channel(x):
        v = _conv1x1(psa.ch_value, x).reshape(b, c // 2, h * w)
        q = torch.softmax(_conv1x1(psa.ch_query, x).reshape(b, 1, h * w), dim=-1)
        z = torch.einsum("bcn,bn->bc", v, q[:, 0])[:, :, None, None]
        if psa.mode == "parallel":
            z = _conv1x1(psa.ch_out, z)
        else:
            conv1, ln, _, conv2 = psa.ch_out
            z = _conv1x1(conv1, z)
            mu, var = z.mean(1, keepdim=True), z.var(1, unbiased=False, keepdim=True)
            z = (z - mu) / torch.sqrt(var + ln.eps) * ln.weight[None] + ln.bias[None]
            z = _conv1x1(conv2, torch.relu(z))
        return x * torch.sigmoid(z)

    def spatial(x):
        g = _conv1x1(psa.sp_query, x).mean(dim=(2, 3))  # (B, C/2)
        theta = _conv1x1(psa.sp_value, x).reshape(b, c // 2, h * w)
        if psa.mode == "parallel":
            ctx = torch.softmax(torch.einsum("bc,bcn->bn", g, theta), dim=-1)
        else:
            ctx = torch.einsum("bc,bcn->bn", g, torch.softmax(theta, dim=-1))
        return x * torch.sigmoid(ctx).view(b, 1, h, w)

    return channel(x) + spatial(x) if psa.mode == "parallel" else spatial(channel(x))


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_psa_equals_the_official_arithmetic(mode):
    psa = randomize(PolarizedSelfAttention(16, mode).to(D))
    x = image()
    torch.testing.assert_close(psa(x), _psa_oracle(psa, x))
    g_ch, g_sp = psa.channel_gate(x), psa.spatial_gate(x)
    assert g_ch.shape == (2, 16, 1, 1) and g_sp.shape == (2, 1, 6, 7)
    assert ((g_ch > 0) & (g_ch < 1)).all() and ((g_sp > 0) & (g_sp < 1)).all()


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_psa_paper_arithmetic_equals_eq1_and_eq3_as_printed(mode):
    psa = randomize(PolarizedSelfAttention(12, mode, arithmetic="paper").to(D))
    x = image(c=12)
    b, c, h, w = x.shape

    def channel(x):  # Eq. 1: sigmoid(LN(W_z(W_v X softmax_HW(W_q X))))
        v = _conv1x1(psa.ch_value, x).reshape(b, c // 2, h * w)
        q = torch.softmax(_conv1x1(psa.ch_query, x).reshape(b, h * w), dim=-1)
        z = torch.einsum("oi,bi->bo", psa.ch_out[0].weight[:, :, 0, 0], torch.einsum("bcn,bn->bc", v, q))
        ln = psa.ch_out[1]
        z = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + ln.eps) * ln.weight.view(1, c) + ln.bias.view(1, c)
        return x * torch.sigmoid(z)[:, :, None, None]

    def spatial(x):  # Eq. 3: sigmoid(softmax_C(GAP(W_q X))^T W_v X)
        g = torch.softmax(_conv1x1(psa.sp_query, x).mean(dim=(2, 3)), dim=-1)
        v = _conv1x1(psa.sp_value, x).reshape(b, c // 2, h * w)
        return x * torch.sigmoid(torch.einsum("bc,bcn->bn", g, v)).view(b, 1, h, w)

    want = channel(x) + spatial(x) if mode == "parallel" else spatial(channel(x))
    torch.testing.assert_close(psa(x), want)


def test_psa_arguments_are_checked():
    with pytest.raises(ParameterError, match="mode"):
        PolarizedSelfAttention(16, mode="both")
    with pytest.raises(ParameterError, match="multiple of 8"):
        PolarizedSelfAttention(12, mode="sequential")
    with pytest.raises(ParameterError, match="arithmetic"):
        PolarizedSelfAttention(16, arithmetic="ea")
    assert create_attn("psa_p", 16).mode == "parallel" and create_attn("psa_s", 16).mode == "sequential"


# ------------------------------------------------------------------------------------------- C2 ELA


def _group_norm(z, norm):
    b, c, n = z.shape
    g = z.reshape(b, norm.num_groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return g.reshape(b, c, n) * norm.weight[None, :, None] + norm.bias[None, :, None]


def _depthwise_1d(z, weight, groups):
    """A grouped 1D conv with zero 'same' padding, as loops over taps."""
    b, c, n = z.shape
    k = weight.shape[-1]
    per = c // groups
    out = torch.zeros_like(z)
    zp = F.pad(z, (k // 2, k // 2))
    for o in range(c):
        g = o // per
        for i in range(per):
            for j in range(k):
                out[:, o] += weight[o, i, j] * zp[:, g * per + i, j : j + n]
    return out


@pytest.mark.parametrize("version,channels", [("B", 16), ("S", 16), ("T", 32)])
def test_ela_equals_the_papers_shared_conv_and_groupnorm(version, channels):
    ela = randomize(EfficientLocalAttention(channels, version).to(D))
    x = image(c=channels)
    groups = ela.conv.groups

    def gate(z):
        return torch.sigmoid(_group_norm(_depthwise_1d(z, ela.conv.weight, groups), ela.norm))

    want = x * gate(x.mean(3))[:, :, :, None] * gate(x.mean(2))[:, :, None, :]
    torch.testing.assert_close(ela(x), want)
    # one conv and one GroupNorm serve both axes
    k = {"B": 7, "S": 5, "T": 5}[version]
    assert sum(p.numel() for p in ela.parameters()) == channels * (channels // groups) * k + 2 * channels


def test_ela_equals_timms_variant_once_tied_and_without_silu():
    pytest.importorskip("timm")
    from timm.layers.coord_attn import EfficientLocalAttn

    ela = randomize(EfficientLocalAttention(16, "B"))
    ref = EfficientLocalAttn(16, kernel_size=7, act_layer=nn.Identity, norm_layer=lambda c, **dd: nn.GroupNorm(16, c, **dd))
    with torch.no_grad():
        ref.conv_h.weight.copy_(ela.conv.weight[:, :, :, None])
        ref.conv_w.weight.copy_(ela.conv.weight[:, :, None, :])
        for norm in (ref.norm_h, ref.norm_w):
            norm.load_state_dict(ela.norm.state_dict())
    x = torch.randn(2, 16, 6, 7)
    torch.testing.assert_close(ela(x), ref(x), rtol=1e-5, atol=1e-5)


def test_ela_refuses_groupnorm_groups_that_do_not_divide_c():
    with pytest.raises(ParameterError, match="num_groups"):
        EfficientLocalAttention(16, "T")  # GN(32) on 16 channels
    EfficientLocalAttention(16, "T", num_groups=8)


# ----------------------------------------------------------------------------------------- C3 ULSAM


@pytest.mark.parametrize("norm_act", [False, True])
def test_ulsam_equals_eq1_to_eq3_per_subspace(norm_act):
    g = 4
    ulsam = randomize(SubspaceAttention(16, g, norm_act=norm_act).to(D)).eval()
    x = image()
    b, c, h, w = x.shape
    size = c // g
    outs = []
    for n in range(g):
        f = x[:, n * size : (n + 1) * size]
        sl = slice(n * size, (n + 1) * size)
        dw = f * ulsam.depthwise.weight[sl, 0, 0, 0][None, :, None, None]  # DW 1x1: a per-channel scale
        if ulsam.depthwise.bias is not None:
            dw = dw + ulsam.depthwise.bias[sl][None, :, None, None]
        if norm_act:
            dw = torch.relu(bn_eval(dw, ulsam.dw_post[0], sl))
        mp = F.max_pool2d(dw, 3, stride=1, padding=1)
        pw = torch.einsum("c,bchw->bhw", ulsam.pointwise.weight[n, :, 0, 0], mp)
        if norm_act:
            bn = ulsam.pw_post[0]
            pw = torch.relu((pw - bn.running_mean[n]) / torch.sqrt(bn.running_var[n] + bn.eps) * bn.weight[n] + bn.bias[n])
        a = torch.softmax(pw.reshape(b, -1), dim=-1).view(b, 1, h, w)  # one map over H W
        outs.append(a * f + f)
    torch.testing.assert_close(ulsam(x), torch.cat(outs, dim=1))
    torch.testing.assert_close(ulsam.maps(x).sum(dim=(2, 3)), torch.ones(b, g, dtype=D))


def test_ulsam_max_pool_equals_torchs():
    from attnzoo.nn.cnn.ulsam import max_pool3x3

    x = torch.randn(2, 5, 7, 9)
    torch.testing.assert_close(max_pool3x3(x), F.max_pool2d(x, 3, stride=1, padding=1), rtol=0, atol=0)


def test_ulsam_refuses_a_split_that_does_not_divide_c():
    with pytest.raises(ParameterError, match="num_splits"):
        SubspaceAttention(16, 3)


# ------------------------------------------------------------------------------------ C5 SE + coord


def _timm_pair(channels):
    from timm.layers.coord_attn import CoordAttn
    from timm.layers.squeeze_excite import SEModule

    coord = CoordAttn(channels, rd_channels=channels // 8, bias=False, act_layer=nn.ReLU)
    se = SEModule(channels, rd_channels=max(channels // 16, 1), bias=False)
    return randomize(coord), randomize(se, seed=2)


@pytest.mark.parametrize("train", [False, True])
def test_se_coord_branches_match_timm_and_mix_by_sigmoid_alpha(train):
    pytest.importorskip("timm")
    coord, se = _timm_pair(32)
    ours = SECoordAttention.from_timm(coord, se, alpha=0.3)
    for m in (coord, se, ours):
        m.train(train)
    x = torch.randn(2, 32, 6, 7)
    torch.testing.assert_close(ours.coordinate_branch(x), coord(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.se_branch(x), se(x), rtol=1e-5, atol=1e-5)
    s = 1 / (1 + math.exp(-0.3))
    torch.testing.assert_close(ours(x), s * coord(x) + (1 - s) * se(x), rtol=1e-5, atol=1e-5)


def test_se_coord_equals_its_equations_written_out():
    att = randomize(SECoordAttention(16).to(D)).eval()
    x = image()
    b, c, h, w = x.shape
    z = torch.cat([x.mean(3), x.mean(2)], dim=2)  # (B, C, H + W)
    f = torch.relu(bn_eval(torch.einsum("oc,bcn->bon", att.coord.conv1.weight[:, :, 0, 0], z), att.coord.bn1))
    g_h = torch.sigmoid(torch.einsum("oc,bcn->bon", att.coord.conv_h.weight[:, :, 0, 0], f[:, :, :h]))
    g_w = torch.sigmoid(torch.einsum("oc,bcn->bon", att.coord.conv_w.weight[:, :, 0, 0], f[:, :, h:]))
    ca = x * g_h[:, :, :, None] * g_w[:, :, None, :]
    s_se = torch.sigmoid(att.se.fc2.weight[:, :, 0, 0] @ torch.relu(att.se.fc1.weight[:, :, 0, 0] @ x.mean(dim=(2, 3)).T)).T
    se = x * s_se[:, :, None, None]
    a = torch.sigmoid(att.alpha)
    torch.testing.assert_close(att(x), a * ca + (1 - a) * se)
    assert abs(SECoordAttention(16).fusion_weight().item() - 1 / (1 + math.exp(-0.5))) < 1e-7


# --------------------------------------------------------------------------------------- C7 ECAPA


def _tdnn_oracle(x, block, dilation=1):
    conv = block.conv
    k = conv.kernel_size[0]
    p = dilation * (k - 1) // 2
    xp = F.pad(x, (p, p), mode="reflect") if p else x
    t = x.shape[2]
    out = conv.bias[None, :, None].expand(x.shape[0], -1, t).clone()
    for j in range(k):
        out = out + torch.einsum("oi,bit->bot", conv.weight[:, :, j], xp[:, :, j * dilation : j * dilation + t])
    return bn_eval(torch.relu(out), block.norm)


@pytest.mark.parametrize("global_context", [True, False])
def test_asp_equals_eq1_to_eq4_written_out(global_context):
    pool = randomize(AttentiveStatisticsPooling(16, 8, global_context=global_context).to(D)).eval()
    x = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(3), dtype=D)
    h = x
    if global_context:
        mu = x.mean(2, keepdim=True)
        sd = torch.sqrt(((x - mu) ** 2).mean(2, keepdim=True))
        h = torch.cat([x, mu.expand_as(x), sd.expand_as(x)], dim=1)
    e = torch.einsum("ca,bat->bct", pool.score.weight[:, :, 0], torch.tanh(_tdnn_oracle(h, pool.tdnn)))  # Eq. 1
    alpha = torch.softmax(e, dim=2)  # Eq. 2
    mean = (alpha * x).sum(2)  # Eq. 3
    std = torch.sqrt((alpha * x**2).sum(2) - mean**2)  # Eq. 4
    out = pool(x)
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, torch.cat([mean, std], dim=1))
    torch.testing.assert_close(pool.attention(x).sum(2), torch.ones(2, 16, dtype=D))


@pytest.mark.parametrize("cls,kwargs", [(AttentiveStatisticsPooling, dict(attention_channels=8)), (SERes2Block, dict(scale=4, se_channels=8))])
def test_ecapa_blocks_ignore_padded_frames(cls, kwargs):
    layer = randomize(cls(16, **kwargs).to(D)).eval()
    x = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(4), dtype=D)
    padded = layer(x, torch.tensor([1.0, 0.5], dtype=D))
    alone = layer(x[1:, :, :10])
    if cls is AttentiveStatisticsPooling:
        torch.testing.assert_close(padded[1:], alone)
        torch.testing.assert_close(padded[:1], layer(x[:1]))
    else:  # the SE mean skips padded frames; the convs see them (SpeechBrain's behaviour), so compare the gate
        h = layer.tdnn2(layer.res2(layer.tdnn1(x)))
        want = h[1:, :, :10].mean(2, keepdim=True)
        gate = torch.sigmoid(layer.se2(torch.relu(layer.se1(want))))
        torch.testing.assert_close(layer.se_gate(h, torch.tensor([1.0, 0.5], dtype=D))[1:], gate)
    with pytest.raises(ShapeError, match="lengths"):
        layer(x, torch.ones(3, dtype=D))


@pytest.mark.parametrize("out_channels,dilation", [(None, 2), (24, 3)])
def test_se_res2_block_equals_its_stages_written_out(out_channels, dilation):
    block = randomize(SERes2Block(16, out_channels, scale=4, se_channels=8, kernel_size=3, dilation=dilation).to(D)).eval()
    x = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(5), dtype=D)
    h = _tdnn_oracle(x, block.tdnn1)
    parts = torch.chunk(h, 4, dim=1)
    ys = [parts[0]]
    for i in range(1, 4):  # Res2: y_i = K_i(x_i + y_{i-1}), y_1 = x_1, y_2 = K_2(x_2)
        inp = parts[i] if i == 1 else parts[i] + ys[-1]
        ys.append(_tdnn_oracle(inp, block.res2.blocks[i - 1], dilation))
    h = _tdnn_oracle(torch.cat(ys, 1), block.tdnn2)
    z = h.mean(2)  # SE, Eq. 5-7
    s = torch.sigmoid(block.se2.weight[:, :, 0] @ torch.relu(block.se1.weight[:, :, 0] @ z.T + block.se1.bias[:, None]) + block.se2.bias[:, None]).T
    res = x if block.shortcut is None else torch.einsum("oi,bit->bot", block.shortcut.weight[:, :, 0], x) + block.shortcut.bias[None, :, None]
    torch.testing.assert_close(block(x), h * s[:, :, None] + res)


def test_se_res2_block_needs_more_frames_than_its_dilation():
    with pytest.raises(ShapeError, match="dilation"):
        SERes2Block(16, scale=4, se_channels=8, dilation=4)(torch.randn(1, 16, 4))


# ----------------------------------------------------------------------------------------- C8 PAT


def test_pat_ch_equals_the_official_partial_conv3_se():
    pat = randomize(PartialChannelAttention(16, n_div=4).to(D)).eval()
    x = image()
    xp, xu = x[:, :4], x[:, 4:]
    yp = F.conv2d(xp, pat.conv.weight, padding=1)
    flat = xu.reshape(2, 12, -1)
    mean = flat.mean(-1)
    std = torch.sqrt(((flat - mean[..., None]) ** 2).sum(-1) / (flat.shape[-1] - 1))  # unbiased
    w = pat.stats.weight[:, :, 0]  # (C_u, C_u, 2)
    z = torch.einsum("oi,bi->bo", w[:, :, 0], mean) + torch.einsum("oi,bi->bo", w[:, :, 1], std)
    yu = bn_eval(xu * hardsigmoid(z)[:, :, None, None], pat.norm)
    torch.testing.assert_close(pat(x), torch.cat([yp, yu], dim=1))


def test_pat_sp_equals_the_official_partial_spatial_layer():
    pat = randomize(PartialSpatialAttention(16, partial=0.25).to(D)).eval()
    x = image()
    xa, xc = x[:, :12], x[:, 12:]
    m = hardsigmoid(torch.einsum("c,bchw->bhw", pat.attn.weight[0, :, 0, 0], xa))[:, None]
    ya = bn_eval(xa * m, pat.norm_attn)
    yc = torch.einsum("oi,bihw->bohw", pat.conv.weight[:, :, 0, 0], bn_eval(xc, pat.norm_conv))
    torch.testing.assert_close(pat(x), torch.cat([ya, yc], dim=1))


def test_pat_arguments_are_checked():
    with pytest.raises(ParameterError, match="n_div"):
        PartialChannelAttention(4, n_div=8)
    with pytest.raises(ParameterError, match="partial"):
        PartialSpatialAttention(16, partial=1.0)


# ----------------------------------------------------------------------------------- C9 sentence


@pytest.mark.parametrize("use_image", [True, False])
def test_sentence_block_gates_channels_from_image_and_text(use_image):
    sab = randomize(SentenceAttentionBlock(16, 12, reduction=4, use_image=use_image).to(D))
    x = image()
    t = torch.randn(2, 12, generator=torch.Generator().manual_seed(6), dtype=D)
    u = torch.cat([x.mean(dim=(2, 3)), t], 1) if use_image else t
    s = torch.sigmoid(torch.relu(u @ sab.fc1.weight.T + sab.fc1.bias) @ sab.fc2.weight.T + sab.fc2.bias)
    torch.testing.assert_close(sab(x, t), x * s[:, :, None, None])
    assert not torch.allclose(sab(x, t), sab(x, -t))  # the sentence changes the gates
    with pytest.raises(ShapeError, match="text"):
        sab(x, torch.randn(2, 11, dtype=D))


# ---------------------------------------------------------------------------------- create_attn


def test_create_attn_builds_every_name_and_lists_them_for_an_unknown_one():
    x, seq = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 12)
    for name in ATTN_NAMES:
        kw = dict(text_dim=5) if name == "sentence" else {}
        layer = create_attn(name.upper() if name == "eca" else name, 16, **kw)
        if name == "sentence":
            out = layer(x, torch.randn(2, 5))
        elif name in ("asp", "se_res2"):
            out = layer(seq)
        else:
            out = layer(x)
        assert torch.isfinite(out).all(), name
    assert create_attn("eca", 16, kernel_size=5).kernel_size == 5
    assert create_attn(None, 16) is None and create_attn("", 16) is None
    with pytest.raises(ParameterError) as err:
        create_attn("cbam", 16)
    assert all(name in str(err.value) for name in ("eca", "ela", "ulsam", "psa_p", "psa_s", "se_coord", "pam", "cam"))
