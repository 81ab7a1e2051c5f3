"""Vision token mixers without a timm counterpart, checked against the official code's arithmetic.

Each oracle below is written out independently from the paper's equations and the official
repository's arithmetic (dense masks, loops over windows, einsums per head), reading only the
module's parameters; none calls the module's own helpers. Properties of the papers follow each
oracle (e.g. HiLo with alpha = 0 is window attention; LSDA with one group is full attention).
Sizes are tiny and everything runs in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn.vision.crossformer import LongShortDistanceAttention
from attnzoo.nn.vision.fcaformer import ForwardCrossAttention
from attnzoo.nn.vision.hat import ConvChannelAttentionBlock, OverlappingCrossAttention
from attnzoo.nn.vision.hilo import HiLoAttention
from attnzoo.nn.vision.rgt import RecursiveGeneralizationAttention
from attnzoo.nn.vision.strip import StripSelfAttention
from attnzoo.nn.vision.styleswin import DoubleWindowAttention
from attnzoo.nn.vision.transnext import AggregatedAttention, ConvolutionalGLU, LengthScaledCosineAttention

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny tensors: one intra-op thread (two threads spin for ~0.1 s per SDPA call on a busy machine)."""
    yield


def lin(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def heads_attention(q, k, v, scale, bias=None, allowed=None):
    """q (B, Nq, h, d), k/v (B, Nk, h, d) -> (B, Nq, h, d); bias (h, Nq, Nk); allowed (Nq, Nk) bool."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)


def seeded(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # random everything, biases included, so no term hides behind a zero init
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module.to(DT).eval()


def grid(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ---------------------------------------------------------------- M6 HiLo (LITv2 hilo.py)


def hilo_oracle(m, x):
    b, H, W, c = x.shape
    s, d, scale = m.window_size, m.head_dim, m.scale
    parts = []
    if m.hi_heads:
        qkv = lin(x, m.h_qkv).reshape(b, H, W, 3, m.hi_heads, d)
        y = torch.zeros(b, H, W, m.hi_heads, d, dtype=x.dtype)
        for i in range(0, H, s):  # each s x s window alone
            for j in range(0, W, s):
                win = qkv[:, i:i + s, j:j + s].reshape(b, s * s, 3, m.hi_heads, d)
                o = heads_attention(win[:, :, 0], win[:, :, 1], win[:, :, 2], scale)
                y[:, i:i + s, j:j + s] = o.reshape(b, s, s, m.hi_heads, d)
        parts.append(lin(y.reshape(b, H, W, -1), m.h_proj))
    if m.lo_heads:
        q = lin(x, m.l_q).reshape(b, H * W, m.lo_heads, d)
        pooled = x.reshape(b, H // s, s, W // s, s, c).mean(dim=(2, 4)).reshape(b, -1, c)  # AvgPool_s
        kv = lin(pooled, m.l_kv).reshape(b, -1, 2, m.lo_heads, d)
        o = heads_attention(q, kv[:, :, 0], kv[:, :, 1], scale)
        parts.append(lin(o.reshape(b, H, W, -1), m.l_proj))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("alpha,window", [(0.5, 2), (0.25, 4), (0.0, 2), (1.0, 2), (0.5, 1)])
def test_hilo_matches_the_official_arithmetic(alpha, window):
    m = seeded(HiLoAttention(32, num_heads=4, window_size=window, alpha=alpha, qkv_bias=True))
    x = grid(2, 8, 8, 32)
    torch.testing.assert_close(m(x), hilo_oracle(m, x), **TOL)


def test_hilo_head_split_follows_alpha():
    m = HiLoAttention(64, num_heads=8, alpha=0.3)
    assert (m.lo_heads, m.hi_heads) == (2, 6)  # floor(0.3 * 8) Lo-Fi heads, as the official int()
    assert HiLoAttention(64, num_heads=8, window_size=1).lo_heads == 8  # s = 1: plain MSA


def test_hilo_alpha_0_is_window_attention_and_a_full_window_is_global_attention():
    x = grid(1, 8, 8, 16)
    m = seeded(HiLoAttention(16, num_heads=2, window_size=8, alpha=0.0))  # one window = the image
    q, k, v = lin(x.reshape(1, 64, 16), m.h_qkv).reshape(1, 64, 3, 2, 8).unbind(2)
    ref = lin(heads_attention(q, k, v, 8 ** -0.5).reshape(1, 8, 8, 16), m.h_proj)
    torch.testing.assert_close(m(x), ref, **TOL)


def test_hilo_window_1_is_plain_multihead_attention():
    x = grid(2, 4, 6, 16)
    m = seeded(HiLoAttention(16, num_heads=4, window_size=1, alpha=0.5))
    q = lin(x, m.l_q).reshape(2, 1, 24, 4, 4)[:, 0].transpose(1, 2)
    k, v = lin(x, m.l_kv).reshape(2, 24, 2, 4, 4).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 4, 6, 16)
    torch.testing.assert_close(m(x), lin(ref, m.l_proj), **TOL)


def test_hilo_refuses_bad_arguments():
    with pytest.raises(ParameterError, match="alpha"):
        HiLoAttention(16, 4, alpha=1.5)
    with pytest.raises(ParameterError, match="num_heads"):
        HiLoAttention(16, 3)
    with pytest.raises(ShapeError, match="window_size"):
        HiLoAttention(16, 4, window_size=3)(torch.randn(1, 8, 8, 16))


# ---------------------------------------------------------------- M10 CrossFormer LSDA + DPB


def dpb_oracle(m, offsets):
    """The DPB MLP written out: Linear(2->D), then 3 x (LN, ReLU, Linear); residual=False."""
    p = m.pos
    h = lin(offsets, p.pos_proj)
    for stage in (p.pos1, p.pos2, p.pos3):
        ln, fc = stage[0], stage[2]
        h = lin(torch.relu(F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)), fc)
    return h  # (..., heads)


def lsda_oracle(m, x, mode, size):
    """Dense attention over all H*W tokens, a key allowed iff it is in the query's group."""
    b, H, W, c = x.shape
    heads, d = m.num_heads, c // m.num_heads
    r = torch.arange(H).repeat_interleave(W)
    col = torch.arange(W).repeat(H)
    if mode == "short":  # G x G blocks of adjacent tokens; group coordinates = pixel coordinates
        gid_r, gid_c, pos_r, pos_c = r // size, col // size, r, col
    else:  # tokens I apart share a group; one step in the group is I pixels
        gid_r, gid_c, pos_r, pos_c = r % size, col % size, r // size, col // size
    allowed = (gid_r[:, None] == gid_r[None, :]) & (gid_c[:, None] == gid_c[None, :])
    offsets = torch.stack([pos_r[:, None] - pos_r[None, :], pos_c[:, None] - pos_c[None, :]], -1).to(x.dtype)
    bias = dpb_oracle(m, offsets).permute(2, 0, 1)  # (heads, N, N)
    q, k, v = lin(x.reshape(b, H * W, c), m.qkv).reshape(b, H * W, 3, heads, d).unbind(2)
    o = heads_attention(q, k, v, d ** -0.5, bias=bias, allowed=allowed)
    return lin(o.reshape(b, H, W, c), m.proj)


@pytest.mark.parametrize(
    "mode,size,hw",
    [("short", 4, (8, 8)), ("short", 3, (7, 8)), ("long", 2, (8, 8)), ("long", 4, (8, 12)), ("long", 3, (7, 10))],
    ids=["SDA-G4-8x8", "SDA-G3-pad", "LDA-I2-8x8", "LDA-I4-8x12", "LDA-I3-pad"],
)
def test_lsda_matches_the_official_grouping_dpb_and_padding(mode, size, hw):
    kw = dict(group_size=size, interval=8) if mode == "short" else dict(group_size=2, interval=size)
    m = seeded(LongShortDistanceAttention(32, num_heads=2, mode=mode, dpb_dim=8, **kw))
    x = grid(2, *hw, 32)
    torch.testing.assert_close(m(x), lsda_oracle(m, x, mode, size), **TOL)


def test_lsda_one_group_is_full_attention_with_the_dpb_bias():
    x = grid(1, 6, 6, 16)
    sda = seeded(LongShortDistanceAttention(16, num_heads=2, group_size=6, mode="short", dpb_dim=4))
    lda = seeded(LongShortDistanceAttention(16, num_heads=2, group_size=2, interval=1, mode="long", dpb_dim=4))
    full = lsda_oracle(sda, x, "short", 10 ** 6)  # every token in one group
    torch.testing.assert_close(sda(x), full, **TOL)
    torch.testing.assert_close(lda(x), full, **TOL)  # interval 1: one group spanning the image


def test_dpb_is_a_function_of_the_relative_position_only():
    m = seeded(LongShortDistanceAttention(32, num_heads=2, dpb_dim=8))
    bias = m.pos.group_bias(3, 4)  # (heads, 12, 12)
    ys, xs = torch.arange(12) // 4, torch.arange(12) % 4
    table = {}
    for i in range(12):
        for j in range(12):
            key = (int(ys[i] - ys[j]), int(xs[i] - xs[j]))
            if key in table:
                torch.testing.assert_close(bias[:, i, j], table[key], rtol=0, atol=0)
            table[key] = bias[:, i, j]
    assert len(table) == 5 * 7  # every offset of a 3 x 4 group, (2*3-1)(2*4-1)


def test_lsda_small_image_falls_back_to_one_short_group():
    x = grid(1, 3, 5, 16)  # min(H, W) = 3 <= G: one SDA group of 3 x 3, padded to 3 x 6
    m = seeded(LongShortDistanceAttention(16, num_heads=2, group_size=7, mode="long", dpb_dim=4))
    torch.testing.assert_close(m(x), lsda_oracle(m, x, "short", 3), **TOL)


def test_lsda_refuses_bad_arguments():
    with pytest.raises(ParameterError, match="mode"):
        LongShortDistanceAttention(16, 2, mode="medium")
    with pytest.raises(ShapeError, match="expected"):
        LongShortDistanceAttention(16, 2)(torch.randn(2, 16, 16))


# ---------------------------------------------------------------- M1 StyleSwin double attention (generator.py)

def window_attention_dense(q, k, v, H, W, M, shift, table, scale):
    """Window attention as a dense (N x N) softmax: keys in the query's window of the image rolled by -shift.

    q, k, v (B, H, W, h, d). The official code rolls, partitions, attends, un-partitions and rolls
    back; here each pixel keeps its place and the roll only decides windows, regions and offsets.
    """
    b, heads = q.shape[0], q.shape[3]
    r = torch.arange(H).repeat_interleave(W)
    c = torch.arange(W).repeat(H)
    rr, cc = (r - shift) % H, (c - shift) % W  # position in the rolled image
    same = ((rr // M)[:, None] == (rr // M)[None, :]) & ((cc // M)[:, None] == (cc // M)[None, :])

    def region(p, size):  # Swin's three slices of the rolled image: [0, S-M), [S-M, S-shift), [S-shift, S)
        return torch.where(p < size - M, 0, torch.where(p < size - shift, 1, 2)) if shift else torch.zeros_like(p)

    label = region(rr, H) * 3 + region(cc, W)
    dy = (rr % M)[:, None] - (rr % M)[None, :] + M - 1
    dx = (cc % M)[:, None] - (cc % M)[None, :] + M - 1
    bias = table[dy * (2 * M - 1) + dx].permute(2, 0, 1)  # (h, N, N)
    bias = bias + torch.where(label[:, None] != label[None, :], -100.0, 0.0).to(q.dtype)
    flat = [t.reshape(b, H * W, heads, -1) for t in (q, k, v)]
    return heads_attention(*flat, scale, bias=bias, allowed=same).reshape(b, H, W, -1)


@pytest.mark.parametrize("hw,M", [((8, 8), 4), ((12, 8), 4), ((6, 6), 3), ((4, 4), 4)], ids=["8x8-M4", "12x8-M4", "6x6-M3", "one-window"])
def test_double_attention_matches_the_official_arithmetic(hw, M):
    m = seeded(DoubleWindowAttention(16, num_heads=4, window_size=M))
    x = grid(2, *hw, 16)
    H, W = hw
    qkv = lin(x, m.qkv).reshape(2, H, W, 3, 2, 2, 4)  # (.., q/k/v, half, heads per half, d)
    shift = M // 2 if min(H, W) > M else 0
    y1 = window_attention_dense(*qkv[..., 0, :, :].unbind(3), H, W, M, 0, m.rpb_window, 0.5)
    y2 = window_attention_dense(*qkv[..., 1, :, :].unbind(3), H, W, M, shift, m.rpb_shifted, 0.5)
    torch.testing.assert_close(m(x), lin(torch.cat([y1, y2], -1), m.proj), **TOL)


def test_double_attention_one_window_is_full_attention_per_half():
    m = seeded(DoubleWindowAttention(16, num_heads=2, window_size=4))
    with torch.no_grad():
        m.rpb_window.zero_()
        m.rpb_shifted.zero_()
    x = grid(1, 4, 4, 16)
    q, k, v = lin(x, m.qkv).reshape(1, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 4, 4, 16)
    torch.testing.assert_close(m(x), lin(ref, m.proj), **TOL)


def test_double_attention_refuses_odd_heads_and_undivided_images():
    with pytest.raises(ParameterError, match="even"):
        DoubleWindowAttention(24, num_heads=3)
    with pytest.raises(ShapeError, match="window_size"):
        DoubleWindowAttention(16, num_heads=2, window_size=4)(torch.randn(1, 6, 8, 16))


# ---------------------------------------------------------------- M1 HAT: CAB and OCA (hat_arch.py)


def cab_oracle(m, x):
    f = F.conv2d(x.permute(0, 3, 1, 2), m.conv1.weight, m.conv1.bias, padding=1)
    f = F.conv2d(F.gelu(f), m.conv2.weight, m.conv2.bias, padding=1)
    pooled = f.mean(dim=(2, 3))  # (B, C)
    a = torch.sigmoid(point(torch.relu(point(pooled, m.squeeze)), m.excite))  # the 1x1 convs as matmuls
    return (f * a[:, :, None, None]).permute(0, 2, 3, 1), a


def point(v, conv):
    """A 1x1 conv applied to (B, C) vectors."""
    return F.linear(v, conv.weight.flatten(1), conv.bias)


def test_cab_matches_the_official_arithmetic_and_its_weights_lie_in_0_1():
    m = seeded(ConvChannelAttentionBlock(24, compress_ratio=3, squeeze_factor=6))
    x = grid(2, 6, 5, 24)
    ref, a = cab_oracle(m, x)
    torch.testing.assert_close(m(x), ref, **TOL)
    torch.testing.assert_close(m.attention_weights(x), a, **TOL)
    assert ((a > 0) & (a < 1)).all()
    with pytest.raises(ParameterError, match="squeeze_factor"):
        ConvChannelAttentionBlock(16, squeeze_factor=30)  # 16 // 30 = 0 channels


def oca_oracle(m, x, mask_padding=False):
    """Loop over the M x M windows; keys/values from the zero-padded M_o x M_o window around each."""
    b, H, W, c = x.shape
    M, Mo, heads = m.window_size, m.overlap_window, m.num_heads
    d, p, S = c // heads, (m.overlap_window - m.window_size) // 2, M + Mo - 1
    qkv = lin(x, m.qkv)
    q = qkv[..., :c]
    kv = F.pad(qkv[..., c:], (0, 0, p, p, p, p))  # zeros after the projection, as nn.Unfold pads
    real = F.pad(torch.ones(H, W, dtype=torch.bool), (p, p, p, p))
    index = torch.empty(M * M, Mo * Mo, dtype=torch.long)
    for a in range(M * M):  # the official rpi: (e - o) + (M - M_o + 1), row stride M + M_o - 1, wrapped
        for e in range(Mo * Mo):
            dy = e // Mo - a // M + M - Mo + 1
            dx = e % Mo - a % M + M - Mo + 1
            index[a, e] = (dy * S + dx) % (S * S)
    bias = m.relative_position_bias_table[index].permute(2, 0, 1)
    y = torch.zeros(b, H, W, c, dtype=x.dtype)
    for i in range(0, H, M):
        for j in range(0, W, M):
            qw = q[:, i:i + M, j:j + M].reshape(b, M * M, heads, d)
            kvw = kv[:, i:i + Mo, j:j + Mo].reshape(b, Mo * Mo, 2, heads, d)
            allowed = real[i:i + Mo, j:j + Mo].reshape(1, -1).expand(M * M, -1) if mask_padding else None
            o = heads_attention(qw, kvw[:, :, 0], kvw[:, :, 1], d ** -0.5, bias=bias, allowed=allowed)
            y[:, i:i + M, j:j + M] = o.reshape(b, M, M, c)
    return lin(y, m.proj)


@pytest.mark.parametrize("M,ratio,hw", [(4, 0.5, (8, 8)), (4, 0.5, (12, 8)), (2, 1.0, (6, 4)), (4, 0.0, (8, 4))],
                         ids=["M4-g.5", "M4-g.5-12x8", "M2-g1", "M4-g0"])
@pytest.mark.parametrize("mask_padding", [False, True], ids=["official", "masked"])
def test_oca_matches_the_official_arithmetic(M, ratio, hw, mask_padding):
    m = seeded(OverlappingCrossAttention(16, num_heads=2, window_size=M, overlap_ratio=ratio, mask_padding=mask_padding))
    x = grid(2, *hw, 16)
    torch.testing.assert_close(m(x), oca_oracle(m, x, mask_padding), **TOL)


def test_oca_relative_index_is_a_bijection_onto_the_table():
    m = OverlappingCrossAttention(16, num_heads=2, window_size=8, overlap_ratio=0.5)  # M_o = 12
    idx = m.rel_index
    assert idx.shape == (64, 144) and int(idx.min()) >= 0 and int(idx.max()) < 19 * 19
    assert len(torch.unique(idx)) == 19 * 19  # every (M + M_o - 1)^2 entry reached, once per offset
    # the same key/query offset reads the same entry
    assert idx[0, 0] == idx[1 * 8 + 1, 1 * 12 + 1]


def test_oca_refuses_odd_overlap():
    with pytest.raises(ParameterError, match="even"):
        OverlappingCrossAttention(16, num_heads=2, window_size=7, overlap_ratio=0.5)  # floor(3.5) = 3


# ---------------------------------------------------------------- M12 S2AFormer strip self-attention (paper only)

def strided_depthwise(x, conv, r):
    """DWConv r x r with stride r as block sums: out[i, j, c] = sum_uv x[i r + u, j r + v, c] w[c, u, v] + b[c]."""
    b, H, W, c = x.shape
    blocks = x.reshape(b, H // r, r, W // r, r, c)
    return torch.einsum("biujvc,cuv->bijc", blocks, conv.weight[:, 0]) + conv.bias


def test_strip_attention_matches_the_paper_arithmetic():
    m = seeded(StripSelfAttention(16, num_heads=2, sr_ratio=2, qk_reduction=4))
    x = grid(2, 8, 6, 16)
    red = strided_depthwise(x, m.reduce, 2).reshape(2, 12, 16)
    red = F.layer_norm(red, (16,), m.norm.weight, m.norm.bias, m.norm.eps)
    q = lin(x.reshape(2, 48, 16), m.q).reshape(2, 48, 2, 2)  # d_qk = 16 / 4 / 2 = 2 per head
    k = lin(red, m.k).reshape(2, 12, 2, 2)
    v = lin(red, m.v).reshape(2, 12, 2, 8)  # values keep d = 8 per head
    ref = lin(heads_attention(q, k, v, 2 ** -0.5).reshape(2, 8, 6, 16), m.proj)
    torch.testing.assert_close(m(x), ref, **TOL)


def test_strip_attention_without_reductions_is_plain_attention():
    m = seeded(StripSelfAttention(16, num_heads=2, sr_ratio=1, qk_reduction=1))
    x = grid(1, 4, 4, 16).reshape(1, 16, 16)
    q, k, v = (lin(x, layer).reshape(1, 16, 2, 8).transpose(1, 2) for layer in (m.q, m.k, m.v))
    ref = lin(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 4, 4, 16), m.proj)
    torch.testing.assert_close(m(x.reshape(1, 4, 4, 16)), ref, **TOL)
    with pytest.raises(ParameterError, match="qk_reduction"):
        StripSelfAttention(16, num_heads=2, qk_reduction=16)


# ---------------------------------------------------------------- M11 TransNeXt (attention_native.py, transnext.py)


def aggregated_oracle(m, x):
    """Per query pixel: its in-image k x k neighbours and the pooled tokens, one softmax, written out."""
    b, H, W, c = x.shape
    heads, d, ks, r = m.num_heads, m.head_dim, m.window_size, m.sr_ratio
    ph, pw = H // r, W // r
    P, half = ph * pw, ks // 2
    q_hat = F.normalize(lin(x, m.q).reshape(b, H, W, heads, d), dim=-1)
    kv = lin(x, m.kv)
    k_all = F.normalize(kv[..., :c].reshape(b, H, W, heads, d), dim=-1)
    v_all = kv[..., c:].reshape(b, H, W, heads, d)
    # pooled tokens: 1x1 conv, GELU, r x r block means (the adaptive pool on divisible sizes), LN
    s = F.gelu(torch.einsum("bhwc,oc->bhwo", x, m.sr.weight[:, :, 0, 0]) + m.sr.bias)
    pooled = s.reshape(b, ph, r, pw, r, c).mean(dim=(2, 4)).reshape(b, P, c)
    pooled = F.layer_norm(pooled, (c,), m.norm.weight, m.norm.bias, m.norm.eps)
    kvp = lin(pooled, m.kv)
    k_pool = F.normalize(kvp[..., :c].reshape(b, P, heads, d), dim=-1)
    v_pool = kvp[..., c:].reshape(b, P, heads, d)
    key_y = torch.arange(ph, dtype=DT).repeat_interleave(pw) * r + (r - 1) / 2  # centres of the pooled cells
    key_x = torch.arange(pw, dtype=DT).repeat(ph) * r + (r - 1) / 2
    temp = F.softplus(m.temperature).reshape(heads, 1)
    y = torch.zeros(b, H, W, heads, d, dtype=DT)
    for i in range(H):
        for j in range(W):
            # (position in the k x k window, pixel) for the neighbours inside the image
            nbrs = [(u * ks + v, (i + u - half, j + v - half)) for u in range(ks) for v in range(ks)]
            nbrs = [(idx, (yy, xx)) for idx, (yy, xx) in nbrs if 0 <= yy < H and 0 <= xx < W]
            n_i = len(nbrs) + P
            qt = (q_hat[:, i, j] + m.query_embedding[:, 0]) * temp * torch.log(torch.tensor(float(n_i), dtype=DT))
            loc = torch.stack([torch.einsum("bhd,bhd->bh", qt, k_all[:, yy, xx]) + m.relative_pos_bias_local[:, idx]
                               for idx, (yy, xx) in nbrs], -1)  # (b, h, n_local)
            dy = (i - key_y) * 8 / (H - 1)
            dx = (j - key_x) * 8 / (W - 1)
            coords = torch.stack([dy, dx], -1)
            coords = torch.sign(coords) * torch.log2(coords.abs() + 1) / 3.0
            cpb = lin(torch.relu(lin(coords, m.cpb_fc1)), m.cpb_fc2).transpose(0, 1)  # (h, P)
            pool = torch.einsum("bhd,bphd->bhp", qt, k_pool) + cpb
            a = torch.cat([loc, pool], -1).softmax(-1)
            out = torch.einsum("bhp,bphd->bhd", a[..., len(nbrs):], v_pool)
            for col, (idx, (yy, xx)) in enumerate(nbrs):
                extra = torch.einsum("bhd,hd->bh", q_hat[:, i, j], m.learnable_tokens[:, :, idx]) + m.learnable_bias[:, 0, idx]
                out = out + (a[..., col] + extra)[..., None] * v_all[:, yy, xx]
            y[:, i, j] = out
    return lin(y.reshape(b, H, W, c), m.proj)


@pytest.mark.parametrize("hw,ks,r", [((8, 8), 3, 4), ((6, 8), 3, 2), ((8, 4), 5, 4)], ids=["8x8-k3-r4", "6x8-k3-r2", "8x4-k5-r4"])
def test_aggregated_attention_matches_the_official_arithmetic(hw, ks, r):
    m = seeded(AggregatedAttention(16, num_heads=2, window_size=ks, sr_ratio=r))
    x = grid(2, *hw, 16)
    torch.testing.assert_close(m(x), aggregated_oracle(m, x), **TOL)


def test_aggregated_attention_weights_sum_to_one_without_learnable_tokens():
    # with T = 0 and b_T = 0 the output is a convex mix of values: constant values pass through
    m = seeded(AggregatedAttention(16, num_heads=2, window_size=3, sr_ratio=2))
    with torch.no_grad():
        m.learnable_tokens.zero_()
        m.learnable_bias.zero_()
        m.kv.weight[16:].zero_()  # v = bias, the same vector at every position and pooled token
    x = grid(1, 6, 6, 16)
    const = lin(m.kv.bias[16:].expand(1, 6, 6, 16), m.proj)
    torch.testing.assert_close(m(x), const, **TOL)


@pytest.mark.parametrize("query,key,pretrain", [((4, 4), (2, 2), None), ((6, 10), (3, 5), None), ((8, 8), (2, 2), (14, 14))])
def test_cpb_index_and_table_equal_the_official_unique_over_all_pairs(query, key, pretrain):
    from attnzoo.nn.vision.transnext import log_spaced_relative_coords

    pre = pretrain or query
    qh, qw = (torch.arange(n, dtype=torch.float32) for n in query)
    kh, kw = (F.adaptive_avg_pool1d(a[None], n)[0] for a, n in zip((qh, qw), key))
    qh, qw = (t.reshape(-1) for t in torch.meshgrid(qh, qw, indexing="ij"))
    kh, kw = (t.reshape(-1) for t in torch.meshgrid(kh, kw, indexing="ij"))
    pairs = torch.stack([(qh[:, None] - kh) / (pre[0] - 1) * 8, (qw[:, None] - kw) / (pre[1] - 1) * 8], -1)
    table, index = torch.unique(pairs.reshape(-1, 2), return_inverse=True, dim=0)  # the official dedup
    table = torch.sign(table) * torch.log2(table.abs() + 1) / torch.log2(torch.tensor(8.0))
    got_index, got_table = log_spaced_relative_coords(query, key, pretrain)
    assert torch.equal(got_index, index)
    torch.testing.assert_close(got_table, table)


def test_full_cosine_attention_matches_the_official_stage4_arithmetic():
    m = seeded(LengthScaledCosineAttention(16, num_heads=2))
    b, H, W, c = 2, 5, 6, 16
    x = grid(b, H, W, c)
    n = H * W
    q, k, v = lin(x.reshape(b, n, c), m.qkv).reshape(b, n, 3, 2, 8).unbind(2)
    r = torch.arange(H, dtype=DT).repeat_interleave(W)
    col = torch.arange(W, dtype=DT).repeat(H)
    coords = torch.stack([(r[:, None] - r) * 8 / (H - 1), (col[:, None] - col) * 8 / (W - 1)], -1)
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1) / 3.0
    bias = lin(torch.relu(lin(coords, m.cpb_fc1)), m.cpb_fc2).permute(2, 0, 1)  # (h, N, N)
    qt = (F.normalize(q, dim=-1) + m.query_embedding[:, 0]) * F.softplus(m.temperature).reshape(2, 1) * torch.log(torch.tensor(float(n), dtype=DT))
    o = heads_attention(qt, F.normalize(k, dim=-1), v, 1.0, bias=bias)
    torch.testing.assert_close(m(x), lin(o.reshape(b, H, W, c), m.proj), **TOL)


def convglu_oracle(m, x):
    b, H, W, c = x.shape
    h = m.hidden
    z = lin(x, m.fc1)
    g, v = z[..., :h], z[..., h:]
    gp = F.pad(g, (0, 0, 1, 1, 1, 1))
    conv = sum(gp[:, u:u + H, w:w + W] * m.dwconv.weight[:, 0, u, w] for u in range(3) for w in range(3)) + m.dwconv.bias
    return lin(F.gelu(conv) * v, m.fc2)


def test_convglu_matches_the_official_arithmetic():
    m = seeded(ConvolutionalGLU(16, hidden_features=48, out_features=8))
    assert m.hidden == 32  # int(2 * 48 / 3)
    x = grid(2, 5, 7, 16)
    torch.testing.assert_close(m(x), convglu_oracle(m, x), **TOL)


# ---------------------------------------------------------------- M15 RGT recursive-generalization attention (RG_SA)

def depthwise3(x, conv):
    """3x3 depth-wise conv, zero padding, on (B, H, W, C), as nine shifted sums."""
    H, W = x.shape[1:3]
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    return sum(xp[:, u:u + H, v:v + W] * conv.weight[:, 0, u, v] for u in range(3) for v in range(3)) + conv.bias


def rgsa_oracle(m, x, T):
    b, H, W, c = x.shape
    heads, cr = m.num_heads, m.reduced
    rep = x
    for _ in range(T):  # the shared 4x4 stride-4 depth-wise conv, T times, as block sums
        rep = strided_depthwise(rep, m.reduction, 4)
    rep = depthwise3(rep, m.dwconv)
    rep = torch.einsum("bhwc,oc->bhwo", rep, m.conv.weight[:, :, 0, 0]) + m.conv.bias
    hr, wr = rep.shape[1:3]
    rep = F.gelu(F.layer_norm(rep, (cr,), m.norm.weight, m.norm.bias, m.norm.eps)).reshape(b, hr * wr, cr)
    q = lin(x.reshape(b, H * W, c), m.q).reshape(b, H * W, heads, cr // heads)
    k = lin(rep, m.k).reshape(b, -1, heads, cr // heads)
    v = lin(rep, m.v).reshape(b, hr, wr, c)
    v = (v + depthwise3(v, m.cpe)).reshape(b, hr * wr, heads, c // heads)
    o = heads_attention(q, k, v, (c // heads * m.c_ratio) ** -0.5)
    return lin(o.reshape(b, H, W, c), m.proj)


@pytest.mark.parametrize("hw,mode,T", [((16, 16), "train", 1), ((16, 16), "eval", 2), ((32, 16), "eval", 2), ((64, 16), "train", 2)],
                         ids=["16x16-train", "16x16-eval", "32x16-eval", "64x16-train"])
def test_rgsa_matches_the_official_arithmetic_and_recursion_rule(hw, mode, T):
    m = seeded(RecursiveGeneralizationAttention(16, num_heads=2, c_ratio=0.5, qkv_bias=True))
    m.train(mode == "train")
    assert m.recursion_count(*hw) == T
    x = grid(2, *hw, 16)
    torch.testing.assert_close(m(x), rgsa_oracle(m, x, T), **TOL)


def test_rgsa_fixed_recursions_and_small_inputs():
    m = seeded(RecursiveGeneralizationAttention(16, num_heads=2, recursions=0))
    x = grid(1, 4, 4, 16)
    torch.testing.assert_close(m(x), rgsa_oracle(m, x, 0), **TOL)  # T = 0: keys at full resolution
    with pytest.raises(ShapeError, match="4\\^T"):
        seeded(RecursiveGeneralizationAttention(16, num_heads=2))(grid(1, 8, 8, 16))  # eval needs 16 x 16
    with pytest.raises(ParameterError, match="c_ratio"):
        RecursiveGeneralizationAttention(16, num_heads=4, c_ratio=0.1)


# ---------------------------------------------------------------- M15 FcaFormer forward cross attention (FcaBlock)

def fca_oracle(m, x, cross):
    b, H, W, c = x.shape
    heads, d = m.num_heads, c // m.num_heads
    # the official bias index: (|dy|, |dx|) numbered in order of first appearance over all point pairs
    points = [(i, j) for i in range(H) for j in range(W)]
    seen, idx = {}, []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            seen.setdefault(off, len(seen))
            idx.append(seen[off])
    bias_x = m.attention_biases[:, torch.tensor(idx).reshape(H * W, H * W)]
    q, k, v = lin(x.reshape(b, H * W, c), m.qkv).reshape(b, H * W, 3, heads, d).unbind(2)
    bias = bias_x
    if cross is not None:
        s = cross * m.s_scale_factors
        s = F.layer_norm(s, (c,), m.s_norm.weight, m.s_norm.bias, m.s_norm.eps)
        _, ks, vs = lin(s, m.qkv).reshape(b, -1, 3, heads, d).unbind(2)
        k, v = torch.cat([k, ks], 1), torch.cat([v, vs], 1)
        bias = torch.cat([bias_x, m.s_token_bias[0].expand(heads, H * W, -1)], -1)
    o = heads_attention(q, k, v, d ** -0.5, bias=bias)
    return lin(o.reshape(b, H, W, c), m.proj)


@pytest.mark.parametrize("cross_tokens", [0, 8], ids=["first-block", "with-cross"])
def test_forward_cross_attention_matches_the_official_arithmetic(cross_tokens):
    m = seeded(ForwardCrossAttention(16, num_heads=2, resolution=(4, 6), cross_tokens=cross_tokens))
    x = grid(2, 4, 6, 16)
    cross = grid(2, 8, 16, seed=5) if cross_tokens else None
    torch.testing.assert_close(m(x, cross), fca_oracle(m, x, cross), **TOL)


def test_forward_cross_tokens_come_from_the_tme_and_count_per_block():
    m = seeded(ForwardCrossAttention(16, num_heads=2, resolution=(8, 6), emit_tokens=True))
    y = grid(2, 8, 6, 16)
    tokens = m.merge_tokens(y)
    assert tokens.shape == (2, m.tokens_per_block, 16) == (2, 2 * 2, 16)  # ceil(8/4) ceil(6/4)
    ref = F.conv2d(y.permute(0, 3, 1, 2), m.dw_conv.weight, None, stride=4, padding=3, groups=16)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), **TOL)


def test_forward_cross_attention_refuses_missing_or_misshaped_cross_tokens():
    m = ForwardCrossAttention(16, num_heads=2, resolution=(4, 4), cross_tokens=4)
    with pytest.raises(ShapeError, match="cross"):
        m(torch.randn(1, 4, 4, 16))
    with pytest.raises(ShapeError, match="cross"):
        m(torch.randn(1, 4, 4, 16), torch.randn(1, 5, 16))
    with pytest.raises(ShapeError, match="expected"):
        m(torch.randn(1, 4, 6, 16), torch.randn(1, 4, 16))
