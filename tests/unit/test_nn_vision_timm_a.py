"""Vision token mixers with timm counterparts (M1 Swin, M4 VOLO, M3 FocalNet, M2 MaxViT).

Each: from_timm against the timm module built directly (small dims, random init, no download) to
1e-5, and properties of the paper with oracles written out here (loops per equation).
"""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn.vision.focal import FocalModulation
from attnzoo.nn.vision.maxvit import MaxViTBlockAttention, MaxViTGridAttention
from attnzoo.nn.vision.outlook import OutlookAttention
from attnzoo.nn.vision.swin import SwinWindowAttention

F64 = torch.float64

# tiny tensors: one intra-op thread is much faster than many on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(module, scale=0.5):
    """timm zero- or small-inits some tensors (bias tables): give every parameter a visible value."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def _table_bias(table, dy, dx, wh, ww):
    """Relative position bias of offset (dy, dx) per head, by the paper's (2M-1) x (2M-1) table, row-major."""
    return table[(dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)]


# ---------------------------------------------------------------- M1 Swin


def _swin_oracle(layer, x, shift):
    """Swin's SW-MSA without the cyclic trick (Sec. 3.2, Fig. 4 left): windows displaced by ``shift``
    from the origin, partial windows at the borders attended alone; sizes are window multiples."""
    b, h, w, c = x.shape
    (wh, ww), heads, d = layer.window_size, layer.num_heads, layer.head_dim
    q, k, v = (t.reshape(b, h * w, heads, d).transpose(1, 2) for t in layer.qkv(x).split(heads * d, dim=-1))
    ys, xs = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    # sub-window index along each axis: [0, s) is its own band, then one band per window from s on
    band_y = torch.where(ys < shift[0], -1, (ys - shift[0]) // wh)
    band_x = torch.where(xs < shift[1], -1, (xs - shift[1]) // ww)
    same = (band_y[:, None] == band_y[None]) & (band_x[:, None] == band_x[None])
    # offsets between tokens of different sub-windows are out of the table; clamped, then masked anyway
    dy, dx = (ys[:, None] - ys[None]).clamp(1 - wh, wh - 1), (xs[:, None] - xs[None]).clamp(1 - ww, ww - 1)
    bias = _table_bias(layer.relative_position_bias_table, dy, dx, wh, ww).permute(2, 0, 1)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(d) + bias).masked_fill(~same, float("-inf"))
    out = torch.softmax(logits, -1) @ v
    return layer.proj(out.transpose(1, 2).reshape(b, h, w, heads * d))


@pytest.mark.parametrize("shift", [(0, 0), (2, 2), (1, 3)], ids=["W-MSA", "SW-MSA", "shift-1x3"])
def test_swin_is_the_displaced_window_partition_written_out(shift):
    torch.manual_seed(0)
    layer = _randomize(SwinWindowAttention(12, 3, window_size=4, shift_size=shift).double(), 0.3)
    x = torch.randn(2, 8, 8, 12, dtype=F64)
    torch.testing.assert_close(layer(x), _swin_oracle(layer, x, shift))


def test_swin_window_equal_to_the_image_is_full_attention_with_the_bias():
    torch.manual_seed(0)
    layer = _randomize(SwinWindowAttention(8, 2, window_size=(3, 5)).double(), 0.3)
    x = torch.randn(2, 3, 5, 8, dtype=F64)
    q, k, v = (t.reshape(2, 15, 2, 4).transpose(1, 2) for t in layer.qkv(x).chunk(3, -1))
    ys, xs = torch.arange(3).repeat_interleave(5), torch.arange(5).repeat(3)
    bias = _table_bias(layer.relative_position_bias_table, ys[:, None] - ys[None], xs[:, None] - xs[None], 3, 5).permute(2, 0, 1)
    att = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + bias, -1) @ v
    want = layer.proj(att.transpose(1, 2).reshape(2, 3, 5, 8))
    torch.testing.assert_close(layer(x), want)


def test_swin_shift_of_zero_is_plain_windows_and_windows_are_independent():
    torch.manual_seed(0)
    layer = _randomize(SwinWindowAttention(8, 2, window_size=4).double(), 0.3)
    x = torch.randn(1, 8, 8, 8, dtype=F64)
    full = layer(x)
    for wy in range(2):
        for wx in range(2):
            part = x[:, 4 * wy : 4 * wy + 4, 4 * wx : 4 * wx + 4]
            torch.testing.assert_close(full[:, 4 * wy : 4 * wy + 4, 4 * wx : 4 * wx + 4], layer(part))


@pytest.mark.parametrize(
    "size,window,shift", [((8, 8), 4, 2), ((10, 7), 4, 2), ((5, 6), 7, 0), ((14, 14), (7, 5), (3, 2))], ids=["even", "padded", "small", "rect"]
)
def test_swin_from_timm_matches_the_blocks_attention_path(size, window, shift):
    pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(1)
    block = SwinTransformerBlock(16, input_resolution=size, num_heads=2, window_size=window, shift_size=shift).eval()
    _randomize(block.attn, 0.3)
    ours = SwinWindowAttention.from_timm(block)
    assert ours.shift_size == tuple(block.shift_size) and ours.window_size == tuple(block.window_size)
    x = block.norm1(torch.randn(3, *size, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), block._attn(x), atol=1e-5, rtol=1e-5)


def test_swin_from_timm_window_attention_and_explicit_path():
    pytest.importorskip("timm")
    from timm.models.swin_transformer import WindowAttention, window_partition

    torch.manual_seed(2)
    theirs = _randomize(WindowAttention(12, num_heads=3, head_dim=8, window_size=(4, 3)).eval(), 0.3)
    theirs.fused_attn = False  # the explicit softmax path
    ours = SwinWindowAttention.from_timm(theirs)
    assert ours.head_dim == 8 and ours.shift_size == (0, 0)
    x = torch.randn(2, 8, 6, 12)
    want = theirs(window_partition(x, (4, 3)).view(-1, 12, 12)).view(-1, 4, 3, 12)
    got = ours(x)
    for i, (wy, wx) in enumerate((a, b) for n in range(2) for a in range(2) for b in range(2)):
        torch.testing.assert_close(got[i // 4, 4 * wy : 4 * wy + 4, 3 * wx : 3 * wx + 3], want[i], atol=1e-5, rtol=1e-5)


def test_swin_refuses_bad_arguments_by_name():
    with pytest.raises(ParameterError) as info:
        SwinWindowAttention(16, 2, window_size=4, shift_size=4)
    assert info.value.argument == "shift_size"
    with pytest.raises(ParameterError) as info:
        SwinWindowAttention(16, 3)
    assert info.value.argument == "num_heads"
    with pytest.raises(ParameterError) as info:
        SwinWindowAttention(16, 2, window_size=(4, 0))
    assert info.value.argument == "window_size"
    with pytest.raises(ShapeError, match="expected"):
        SwinWindowAttention(16, 2)(torch.randn(2, 8, 8, 12))


# ---------------------------------------------------------------- M4 VOLO outlook attention


def _outlook_oracle(layer, x):
    """VOLO Sec. 3.1 per window: weights from the (pooled) centre token, values of the K x K window
    (zero beyond the border), each window's K^2 outputs added back at their pixels (dense aggregation)."""
    b, h, w, c = x.shape
    k, p, s, heads = layer.kernel_size, layer.padding, layer.stride, layer.num_heads
    d = c // heads
    v = layer.v(x).view(b, h, w, heads, d)
    out = torch.zeros(b, h, w, heads, d, dtype=x.dtype)
    for i in range(math.ceil(h / s)):
        for j in range(math.ceil(w / s)):
            centre = x[:, i * s : (i + 1) * s, j * s : (j + 1) * s].mean((1, 2))  # the pooled cell
            a = torch.softmax(layer.attn(centre).view(b, heads, k * k, k * k) * d**-0.5, -1)
            pos = [(i * s - p + m // k, j * s - p + m % k) for m in range(k * k)]
            inside = [0 <= y < h and 0 <= x_ < w for y, x_ in pos]
            window = torch.stack([v[:, y, x_] if ok else torch.zeros(b, heads, d, dtype=x.dtype) for (y, x_), ok in zip(pos, inside)], 2)
            y_window = torch.einsum("bhmn,bhnd->bmhd", a, window)  # Softmax(A) V_D, (B, K^2, heads, d)
            for m, ((ym, xm), ok) in enumerate(zip(pos, inside)):
                if ok:  # beyond the border: dropped by the fold
                    out[:, ym, xm] += y_window[:, m]
    return layer.proj(out.reshape(b, h, w, c))


@pytest.mark.parametrize("size,kernel,padding,stride", [((4, 5), 3, 1, 1), ((7, 6), 3, 1, 2), ((5, 6), 5, 2, 3)], ids=["s1", "s2-odd", "k5-s3"])
def test_outlook_is_the_window_loop_written_out(size, kernel, padding, stride):
    torch.manual_seed(0)
    layer = _randomize(OutlookAttention(8, 2, kernel, padding, stride, qkv_bias=True).double(), 0.3)
    x = torch.randn(2, *size, 8, dtype=F64)
    torch.testing.assert_close(layer(x), _outlook_oracle(layer, x))


def test_outlook_with_a_one_pixel_window_is_the_projected_values():
    torch.manual_seed(0)
    layer = OutlookAttention(8, 2, kernel_size=1, padding=0).double()
    x = torch.randn(2, 5, 4, 8, dtype=F64)
    torch.testing.assert_close(layer(x), layer.proj(layer.v(x)))


@pytest.mark.parametrize("size,stride", [((8, 8), 1), ((14, 14), 2), ((7, 9), 2)])
def test_outlook_from_timm_matches(size, stride):
    pytest.importorskip("timm")
    from timm.models.volo import OutlookAttention as TimmOutlook

    torch.manual_seed(1)
    theirs = TimmOutlook(24, num_heads=3, kernel_size=3, padding=1, stride=stride, qkv_bias=True).eval()
    ours = OutlookAttention.from_timm(theirs)
    x = torch.randn(2, *size, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_outlook_refuses_bad_arguments_by_name():
    with pytest.raises(ParameterError) as info:
        OutlookAttention(16, 3)
    assert info.value.argument == "num_heads"
    with pytest.raises(ParameterError) as info:
        OutlookAttention(16, 2, kernel_size=3, padding=3)
    assert info.value.argument == "padding"
    with pytest.raises(ShapeError, match="expected"):  # 2 windows per axis, ceil(6 / 2) = 3 pixels cells
        OutlookAttention(16, 2, kernel_size=3, padding=0, stride=2)(torch.randn(1, 6, 6, 16))


# ---------------------------------------------------------------- M3 FocalNet focal modulation


def _depthwise(z, weight):
    """Zero-padded 'same' depthwise convolution by shifted sums: z (B, H, W, C), weight (C, 1, k, k)."""
    _, h, w, _ = z.shape
    k = weight.shape[-1]
    r = k // 2
    zp = torch.nn.functional.pad(z, (0, 0, r, r, r, r))
    return sum(zp[:, a : a + h, b : b + w] * weight[:, 0, a, b] for a in range(k) for b in range(k))


def _focal_oracle(layer, x):
    """FocalNets Sec. 3.2 channels-last: contexts Z^1..Z^L, Z^{L+1} = GELU(mean), gated sum, modulation."""
    c, levels = layer.dim, layer.focal_level
    y = x @ layer.f.weight.T + layer.f.bias
    q, z, g = y[..., :c], y[..., c : 2 * c], y[..., 2 * c :]
    z_out = 0
    for l_ in range(levels):
        z = torch.nn.functional.gelu(_depthwise(z, layer.focal_layers[l_].weight))
        z_out = z_out + g[..., l_ : l_ + 1] * z
    z_out = z_out + g[..., levels:] * torch.nn.functional.gelu(z.mean((1, 2), keepdim=True))
    if layer.normalize_modulator:
        z_out = z_out / (levels + 1)
    return layer.proj(q * layer.h(z_out))


@pytest.mark.parametrize("levels,window,normalize", [(1, 3, False), (3, 3, True), (2, 1, False)])
def test_focal_modulation_is_the_papers_steps_written_out(levels, window, normalize):
    torch.manual_seed(0)
    layer = _randomize(FocalModulation(8, levels, window, normalize_modulator=normalize).double(), 0.3)
    x = torch.randn(2, 7, 6, 8, dtype=F64)
    torch.testing.assert_close(layer(x), _focal_oracle(layer, x))


def test_focal_modulation_sees_sum_of_half_kernels_plus_the_global_mean():
    torch.manual_seed(0)
    layer = _randomize(FocalModulation(8, 2, 3).double(), 0.3)  # kernels 3, 5: radius 1 + 2 = 3
    x = torch.randn(1, 10, 10, 8, dtype=F64)

    def changes_origin(y, x_):
        bumped = x.clone()
        bumped[:, y, x_] += 1.0
        return not torch.allclose(layer(bumped)[:, 0, 0], layer(x)[:, 0, 0], rtol=0, atol=1e-12)

    assert changes_origin(3, 3) and changes_origin(9, 9)  # in reach; far, through the global mean
    with torch.no_grad():  # close the global gate G^{L+1}: only the local levels remain
        layer.f.weight[-1].zero_()
        layer.f.bias[-1].zero_()
    assert changes_origin(3, 3) and changes_origin(0, 3)
    assert not changes_origin(4, 0) and not changes_origin(0, 4) and not changes_origin(9, 9)


@pytest.mark.parametrize(
    "kwargs", [dict(focal_level=2, focal_window=3), dict(focal_level=3, focal_window=1, use_post_norm=True, normalize_modulator=True)], ids=["srf", "postnorm"]
)
def test_focal_modulation_from_timm_matches(kwargs):
    pytest.importorskip("timm")
    from timm.models.focalnet import FocalModulation as TimmFocal

    torch.manual_seed(1)
    theirs = _randomize(TimmFocal(24, **kwargs).eval(), 0.3)
    ours = FocalModulation.from_timm(theirs)
    x = torch.randn(2, 9, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


def test_focal_modulation_refuses_even_kernels_by_name():
    with pytest.raises(ParameterError) as info:
        FocalModulation(16, 2, 4)
    assert info.value.argument == "focal_window"
    with pytest.raises(ParameterError) as info:
        FocalModulation(16, 2, 3, focal_factor=1)
    assert info.value.argument == "focal_window"
    with pytest.raises(ShapeError, match="expected"):
        FocalModulation(16)(torch.randn(2, 64, 16))


# ---------------------------------------------------------------- M2 MaxViT block and grid attention


def _maxvit_oracle(layer, x, grid):
    """MaxViT Sec. 3.1 by group membership: block: same (y // P, x // P), offsets y % P; grid (G):
    same (y % (H/G), x % (W/G)), offsets in grid steps y // (H/G). Relative attention, Eq. 1."""
    b, h, w, c = x.shape
    (ph, pw), heads, d = layer.partition_size, layer.num_heads, layer.dim_head
    qkv = layer.qkv(x).reshape(b, h * w, heads, 3, d) if layer.head_first else layer.qkv(x).reshape(b, h * w, 3, heads, d).transpose(2, 3)
    q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
    ys, xs = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    if grid:
        sy, sx = h // ph, w // pw
        group, r, col = (ys % sy) * w + xs % sx, ys // sy, xs // sx
    else:
        group, r, col = (ys // ph) * w + xs // pw, ys % ph, xs % pw
    same = group[:, None] == group[None]
    bias = _table_bias(layer.relative_position_bias_table, r[:, None] - r[None], col[:, None] - col[None], ph, pw).permute(2, 0, 1)
    att = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(d) + bias).masked_fill(~same, float("-inf")), -1) @ v
    return layer.proj(att.transpose(1, 2).reshape(b, h, w, c))


@pytest.mark.parametrize("head_first", [True, False])
@pytest.mark.parametrize("cls,grid", [(MaxViTBlockAttention, False), (MaxViTGridAttention, True)], ids=["block", "grid"])
def test_maxvit_is_group_membership_written_out(cls, grid, head_first):
    torch.manual_seed(0)
    layer = _randomize(cls(12, 4, (2, 3), head_first=head_first).double(), 0.3)
    x = torch.randn(2, 6, 9, 12, dtype=F64)
    torch.testing.assert_close(layer(x), _maxvit_oracle(layer, x, grid))


def test_maxvit_grid_is_block_attention_on_the_strided_rearrangement():
    torch.manual_seed(0)
    g = 3
    grid = _randomize(MaxViTGridAttention(8, 4, g).double(), 0.3)
    block = MaxViTBlockAttention(8, 4, g).double()
    block.load_state_dict(grid.state_dict())
    x = torch.randn(2, 6, 12, 8, dtype=F64)
    sy, sx = 6 // g, 12 // g

    def rearrange(t):  # y[i * g + a, j * g + b] = x[a * sy + i, b * sx + j]
        return t.view(2, g, sy, g, sx, 8).permute(0, 2, 1, 4, 3, 5).reshape(2, 6, 12, 8)

    def restore(t):
        return t.view(2, sy, g, sx, g, 8).permute(0, 2, 1, 4, 3, 5).reshape(2, 6, 12, 8)

    torch.testing.assert_close(restore(rearrange(x)), x)
    torch.testing.assert_close(grid(x), restore(block(rearrange(x))))
    # a grid as large as the image, or a window as large, is full attention with the bias
    full = MaxViTBlockAttention(8, 4, (6, 12)).double()
    whole_grid = MaxViTGridAttention(8, 4, (6, 12)).double()
    whole_grid.load_state_dict(full.state_dict())
    torch.testing.assert_close(whole_grid(x), full(x))


@pytest.mark.parametrize("head_first", [True, False])
@pytest.mark.parametrize("partition", ["block", "grid"])
def test_maxvit_from_timm_matches_partition_attention(partition, head_first):
    pytest.importorskip("timm")
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    torch.manual_seed(1)
    cfg = MaxxVitTransformerCfg(dim_head=8, window_size=(4, 4), grid_size=(2, 4), rel_pos_type="bias", head_first=head_first)
    theirs = PartitionAttentionCl(24, partition_type=partition, cfg=cfg).eval()
    _randomize(theirs.attn, 0.3)
    cls = MaxViTBlockAttention if partition == "block" else MaxViTGridAttention
    ours = cls.from_timm(theirs)
    assert isinstance(ours, cls) and ours.partition_size == tuple(theirs.partition_size)
    x = theirs.norm1(torch.randn(2, 8, 12, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs._partition_attn(x), atol=1e-5, rtol=1e-5)
    other = MaxViTGridAttention if partition == "block" else MaxViTBlockAttention
    with pytest.raises(ParameterError):
        other.from_timm(theirs)


def test_maxvit_refuses_bad_arguments_and_sizes_by_name():
    with pytest.raises(ParameterError) as info:
        MaxViTBlockAttention(24, dim_head=10)
    assert info.value.argument == "dim_head"
    with pytest.raises(ParameterError) as info:
        MaxViTGridAttention(24, 8, partition_size=0)
    assert info.value.argument == "partition_size"
    with pytest.raises(ShapeError, match="expected"):
        MaxViTGridAttention(24, 8, 4)(torch.randn(1, 8, 10, 24))
    pytest.importorskip("timm")
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    cfg = MaxxVitTransformerCfg(dim_head=8, window_size=(4, 4), rel_pos_type="mlp")
    with pytest.raises(ParameterError, match="bias"):
        MaxViTBlockAttention.from_timm(PartitionAttentionCl(16, "block", cfg=cfg))
