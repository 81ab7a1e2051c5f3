"""Modules with timm counterparts (issue 15, part b): each against timm's own module, built
directly with small dims and random weights (no download), plus paper properties and, where
attnzoo departs from timm (HaloNet's padding mask), an oracle loop.

Cases: H2 cascaded group attention (EfficientViT-MSRA), M5 channel attention (DaViT), M9 CLS
cross-attention (CrossViT), M13 halo attention (HaloNet), H3 single-head attention (SHViT), M8
global-query attention (GC ViT), M14 TNT block.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn import (
    CascadedGroupAttention,
    ChannelGroupAttention,
    ClassTokenCrossAttention,
    GlobalQueryAttention,
    GlobalQueryGenerator,
    HaloAttention,
    SingleHeadAttention,
    TNTBlock,
)

timm = pytest.importorskip("timm")  # tests/conftest.py made torchvision importable first

TOL = dict(atol=1e-5, rtol=1e-5)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, biases, norm scales and BatchNorm statistics (timm zero-inits several)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = p.shape[-1] ** -0.5 if p.dim() == 2 else 0.3  # linear weights by fan-in; the rest 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


# ---------------------------------------------------------------- H2 EfficientViT cascaded group attention


def test_h2_from_timm_matches_cascaded_group_attention():
    from timm.models.efficientvit_msra import CascadedGroupAttention as Theirs

    theirs = _randomize(Theirs(24, key_dim=4, num_heads=3, attn_ratio=2, resolution=5, kernels=(3, 5, 3)))
    theirs.eval()  # timm's CascadedGroupAttention.train returns None
    ours = CascadedGroupAttention.from_timm(theirs).eval()
    assert ours.kernel_sizes == (3, 5, 3)
    x = torch.randn(2, 24, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    theirs.train(), ours.train()  # BatchNorm on batch statistics
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_h2_from_timm_matches_local_window_attention_with_padding():
    from timm.models.efficientvit_msra import LocalWindowAttention

    theirs = _randomize(LocalWindowAttention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=10, window_resolution=4, kernels=(3, 3)), 1)
    theirs.eval()
    ours = CascadedGroupAttention.from_timm(theirs).eval()
    x = torch.randn(2, 16, 10, 9)  # padded to 12 x 12: nine 4 x 4 windows
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_h2_cascade_is_eq_3_written_out():
    torch.manual_seed(0)
    layer = _randomize(CascadedGroupAttention(12, num_heads=3, key_dim=2, resolution=4, kernel_sizes=3), 2).double().eval()
    x = torch.randn(1, 12, 4, 4, dtype=torch.float64)
    splits, outs = x.chunk(3, 1), []
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    for j in range(3):
        feat = splits[j] + (outs[-1] if j else 0)
        q, k, v = layer.qkvs[j](feat).split([2, 2, 4], 1)
        q = layer.dws[j](q).flatten(2)[0]
        k, v = k.flatten(2)[0], v.flatten(2)[0]
        logits = torch.empty(16, 16, dtype=torch.float64)
        for a in range(16):
            for c in range(16):
                off = abs(int(ys[a] - ys[c])) * 4 + abs(int(xs[a] - xs[c]))
                logits[a, c] = (q[:, a] @ k[:, c]) / math.sqrt(2) + layer.attention_biases[j, off]
        outs.append((v @ logits.softmax(-1).T).view(1, 4, 4, 4))
    want = layer.proj(torch.relu(torch.cat(outs, 1)))
    torch.testing.assert_close(layer(x), want)


def test_h2_zero_init_proj_and_bad_arguments():
    layer = CascadedGroupAttention(8, num_heads=2, key_dim=2, resolution=4, zero_init_proj=True).eval()
    assert layer(torch.randn(1, 8, 4, 4)).abs().max() == 0
    with pytest.raises(ParameterError, match="num_heads"):
        CascadedGroupAttention(10, num_heads=3)
    with pytest.raises(ParameterError, match="kernel_sizes"):
        CascadedGroupAttention(8, num_heads=2, kernel_sizes=(3, 5, 7))
    with pytest.raises(ShapeError, match="expected"):
        layer(torch.randn(1, 6, 4, 4))


# ---------------------------------------------------------------- M5 DaViT channel group attention


def test_m5_from_timm_matches_davit_channel_attention():
    from timm.models.davit import ChannelAttention

    theirs = _randomize(ChannelAttention(24, num_heads=3, qkv_bias=True)).eval()
    ours = ChannelGroupAttention.from_timm(theirs).eval()
    x = torch.randn(2, 20, 24)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    grid = x.view(2, 4, 5, 24)  # the (B, H, W, C) layout is the same tokens
    torch.testing.assert_close(ours(grid), theirs(x).view(2, 4, 5, 24), **TOL)


def test_m5_is_the_paper_formula_per_group_and_equivariant_over_pixels():

    torch.manual_seed(0)
    layer = ChannelGroupAttention(12, num_heads=3).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    a, b_, c = layer.qkv(x).chunk(3, -1)  # the slices timm/official name q, k, v
    groups = []
    for g in range(3):
        s = slice(4 * g, 4 * g + 4)
        # A = softmax(K^T V / sqrt(C_g)) is C_g x C_g; applied to the remaining slice
        attn = torch.softmax(b_[..., s].transpose(1, 2) @ c[..., s] / 2.0, dim=-1)
        assert attn.shape == (2, 4, 4)
        groups.append((attn @ a[..., s].transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(layer(x), layer.proj(torch.cat(groups, -1)))
    perm = torch.randperm(7)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm])
    with pytest.raises(ParameterError, match="num_heads"):
        ChannelGroupAttention(10, num_heads=4)


# ---------------------------------------------------------------- M9 CrossViT CLS cross-attention


def test_m9_from_timm_matches_crossvit_cross_attention():
    from timm.models.crossvit import CrossAttention

    theirs = _randomize(CrossAttention(24, num_heads=3, qkv_bias=True)).eval()
    ours = ClassTokenCrossAttention.from_timm(theirs).eval()
    x = torch.randn(2, 11, 24)
    want = theirs(x)
    assert want.shape == (2, 1, 24)
    torch.testing.assert_close(ours(x), want, **TOL)
    torch.testing.assert_close(ours(x[:, :1], x[:, 1:]), want, **TOL)  # (cls, context) form


def test_m9_one_query_softmax_written_out_and_errors():

    torch.manual_seed(0)
    layer = ClassTokenCrossAttention(8, num_heads=2).double()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    q, k, v = layer.wq(x[:, 0]), layer.wk(x), layer.wv(x)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(torch.einsum("bd,bnd->bn", q[:, s], k[:, :, s]) / 2.0, -1)
        heads.append(torch.einsum("bn,bnd->bd", w, v[:, :, s]))
    torch.testing.assert_close(layer(x), layer.proj(torch.cat(heads, -1)).unsqueeze(1))
    with pytest.raises(ShapeError, match="expected"):
        layer(x[:, :2], x)
    with pytest.raises(ShapeError, match="expected"):
        layer(x[:, :1], x[:2])


# ---------------------------------------------------------------- M13 HaloNet halo attention


@pytest.mark.parametrize(
    "cfg",
    [
        dict(dim=16, num_heads=2, block_size=4, halo_size=1),
        dict(dim=16, dim_out=24, num_heads=3, dim_head=4, block_size=2, halo_size=2, qkv_bias=True, scale_pos_embed=True),
        dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2),
        dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2, avg_down=True),
    ],
    ids=["b4-h1", "b2-h2-dimout-scalepos", "stride2", "stride2-avgdown"],
)
def test_m13_from_timm_matches_halo_attn(cfg):
    from timm.layers.halo_attn import HaloAttn

    theirs = _randomize(HaloAttn(**cfg)).eval()
    ours = HaloAttention.from_timm(theirs).eval()
    assert not ours.mask_padding
    x = torch.randn(2, 16, 8, 12)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def _halo_oracle(layer, x):
    """HaloNet attention pixel by pixel: keys are the haloed window's pixels inside the image only."""
    b, h, win = layer.block_size, layer.halo_size, layer.win_size
    heads, dqk, dv = layer.num_heads, layer.dim_head_qk, layer.dim_head_v
    q, kv = layer.q(x), layer.kv(x)
    bsz, _, height, width = x.shape
    out = torch.zeros(bsz, heads * dv, height, width, dtype=x.dtype)
    for n in range(bsz):
        for hd in range(heads):
            kh = kv[n, hd * (dqk + dv) : hd * (dqk + dv) + dqk]
            vh = kv[n, hd * (dqk + dv) + dqk : (hd + 1) * (dqk + dv)]
            for y in range(height):
                for x_ in range(width):
                    qp = q[n, hd * dqk : (hd + 1) * dqk, y, x_]
                    y0, x0 = (y // b) * b - h, (x_ // b) * b - h
                    logits, values = [], []
                    for ky in range(y0, y0 + win):
                        for kx in range(x0, x0 + win):
                            if 0 <= ky < height and 0 <= kx < width:
                                # relative embedding of offset (ky - y, kx - x): entry delta + h + win - 1
                                rel = layer.height_rel[ky - y + h + win - 1] + layer.width_rel[kx - x_ + h + win - 1]
                                logits.append(qp @ kh[:, ky, kx] * layer.scale + qp @ rel)
                                values.append(vh[:, ky, kx])
                    w = torch.softmax(torch.stack(logits), 0)
                    out[n, hd * dv : (hd + 1) * dv, y, x_] = (w[:, None] * torch.stack(values)).sum(0)
    return out


def test_m13_masked_halo_matches_the_oracle_loop_and_differs_from_timm_at_the_border():

    torch.manual_seed(0)
    layer = HaloAttention(8, num_heads=2, block_size=2, halo_size=1).double()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    masked = layer(x)
    torch.testing.assert_close(masked, _halo_oracle(layer, x))
    layer.mask_padding = False
    unmasked = layer(x)
    assert not torch.allclose(masked[..., 0, :], unmasked[..., 0, :])  # border rows see padded keys in timm's mode
    assert torch.allclose(masked[..., 2:4, 2:4], unmasked[..., 2:4, 2:4])  # the centre block's window lies inside
    no_halo = HaloAttention(8, num_heads=2, block_size=2, halo_size=0).double()  # no halo: nothing padded
    y0 = no_halo(x)
    no_halo.mask_padding = False
    torch.testing.assert_close(no_halo(x), y0)


def test_m13_bad_arguments_and_inputs():

    with pytest.raises(ParameterError, match="num_heads"):
        HaloAttention(16, num_heads=3)
    with pytest.raises(ParameterError, match="stride"):
        HaloAttention(16, num_heads=2, stride=3)
    with pytest.raises(ShapeError, match="block_size"):
        HaloAttention(16, num_heads=2, block_size=4)(torch.randn(1, 16, 6, 8))


# ---------------------------------------------------------------- H3 SHViT single-head attention


def test_h3_from_timm_matches_shvit_shsa():
    from timm.models.shvit import SHSA

    theirs = _randomize(SHSA(24, qk_dim=8, pdim=6)).eval()
    ours = SingleHeadAttention.from_timm(theirs).eval()
    x = torch.randn(2, 24, 5, 7)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    theirs.train(), ours.train()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_h3_one_head_on_the_slice_written_out_and_the_rest_passes_through():

    torch.manual_seed(0)
    layer = _randomize(SingleHeadAttention(10, qk_dim=3, pdim=4), 3).double().eval()
    layer.proj = nn.Identity()  # look at what enters the projection
    x = torch.randn(2, 10, 3, 4, dtype=torch.float64)
    xa = x[:, :4]
    xa = (xa - xa.mean((1, 2, 3), keepdim=True)) / torch.sqrt(xa.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    xa = xa * layer.pre_norm.weight.view(1, -1, 1, 1) + layer.pre_norm.bias.view(1, -1, 1, 1)
    q, k, v = layer.qkv(xa).flatten(2).split([3, 3, 4], 1)
    attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(3), -1)  # (B, HW, HW), one head
    want = torch.relu(torch.cat([(v @ attn.transpose(1, 2)).view(2, 4, 3, 4), x[:, 4:]], 1))
    torch.testing.assert_close(layer(x), want)
    zero = SingleHeadAttention(8, qk_dim=2, pdim=4, zero_init_proj=True).eval()
    assert zero(torch.randn(1, 8, 3, 3)).abs().max() == 0
    with pytest.raises(ParameterError, match="pdim"):
        SingleHeadAttention(8, qk_dim=2, pdim=9)


# ---------------------------------------------------------------- M8 GC ViT global-query attention


@pytest.mark.parametrize("use_global", [True, False], ids=["global", "local"])
def test_m8_from_timm_matches_window_attention_global(use_global):
    from timm.models.gcvit import WindowAttentionGlobal, window_partition, window_reverse

    theirs = _randomize(WindowAttentionGlobal(16, num_heads=2, window_size=(3, 4), use_global=use_global)).eval()
    ours = GlobalQueryAttention.from_timm(theirs).eval()
    x, q_global = torch.randn(2, 6, 8, 16), torch.randn(2, 3, 4, 16)
    x_win = window_partition(x, (3, 4)).view(-1, 12, 16)  # the GlobalContextVitBlock's windowing
    want = window_reverse(theirs(x_win, q_global if use_global else None), (3, 4), (6, 8))
    torch.testing.assert_close(ours(x, q_global), want, **TOL)
    if use_global:
        torch.testing.assert_close(ours(x, q_global.flatten(1, 2)), want, **TOL)


def test_m8_generator_matches_timm_feature_block_and_feeds_the_attention():
    from timm.models.gcvit import FeatureBlock

    for levels in (0, 2):
        theirs = _randomize(FeatureBlock(16, levels=levels), levels).eval()
        ours = GlobalQueryGenerator.from_timm(theirs).eval()
        x = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(ours(x.permute(0, 2, 3, 1)), theirs(x).permute(0, 2, 3, 1), **TOL)
    x = torch.randn(2, 8, 8, 16)
    q = GlobalQueryGenerator(16, levels=1)(x)
    assert q.shape == (2, 4, 4, 16)
    assert GlobalQueryAttention(16, num_heads=2, window_size=4)(x, q).shape == x.shape


def test_m8_every_window_uses_its_images_query_and_the_formula_written_out():

    torch.manual_seed(0)
    layer = GlobalQueryAttention(8, num_heads=2, window_size=2).double()
    x, qg = torch.randn(2, 4, 2, 8, dtype=torch.float64), torch.randn(2, 2, 2, 8, dtype=torch.float64)
    x[:, 2:] = x[:, :2]  # two identical windows per image: the same global query gives the same output
    y = layer(x, qg)
    torch.testing.assert_close(y[:, 2:], y[:, :2])
    k, v = layer.qkv(x[1, :2].reshape(4, 8)).chunk(2, -1)  # image 1, window 0
    q = qg[1].reshape(4, 8)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        bias = torch.empty(4, 4, dtype=torch.float64)
        for i in range(4):
            for j in range(4):
                dy, dx = i // 2 - j // 2, i % 2 - j % 2
                bias[i, j] = layer.relative_position_bias_table[(dy + 1) * 3 + (dx + 1), h]
        heads.append(torch.softmax(q[:, s] @ k[:, s].T / 2.0 + bias, -1) @ v[:, s])
    torch.testing.assert_close(y[1, :2].reshape(4, 8), layer.proj(torch.cat(heads, -1)))
    with pytest.raises(ParameterError, match="q_global"):
        layer(x)
    with pytest.raises(ShapeError, match="q_global"):
        layer(x, qg[:1])
    with pytest.raises(ShapeError, match="expected"):
        layer(torch.randn(2, 3, 2, 8, dtype=torch.float64), qg)


# ---------------------------------------------------------------- M14 Transformer in Transformer


@pytest.mark.parametrize("legacy", [False, True], ids=["timm", "legacy"])
def test_m14_from_timm_matches_tnt_block(legacy):
    from timm.models.tnt import Block

    theirs = _randomize(Block(8, 24, num_pixel=4, num_heads_in=2, num_heads_out=3, mlp_ratio=2.0, qkv_bias=True, legacy=legacy)).eval()
    ours = TNTBlock.from_timm(theirs).eval()
    patches, pixels = torch.randn(2, 7, 24), torch.randn(12, 4, 8)
    want_pixels, want_patches = theirs(pixels, patches)
    got_patches, got_pixels = ours(patches, pixels)
    torch.testing.assert_close(got_pixels, want_pixels, **TOL)
    torch.testing.assert_close(got_patches, want_patches, **TOL)


def test_m14_inner_attention_stays_within_a_patch_and_errors():

    torch.manual_seed(0)
    block = TNTBlock(8, 16, num_pixel=4, inner_heads=2, outer_heads=2).double()
    patches, pixels = torch.randn(1, 4, 16, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    _, out = block(patches, pixels)
    changed = pixels.clone()
    changed[2] += 1.0  # another patch's pixels: the inner block of patch 0 does not see them
    _, again = block(patches, changed)
    torch.testing.assert_close(again[:2], out[:2])
    with pytest.raises(ShapeError, match="pixel_embed"):
        block(patches, pixels[:2])
    with pytest.raises(ParameterError, match="outer_heads"):
        TNTBlock(8, 16, num_pixel=4, outer_heads=3)
