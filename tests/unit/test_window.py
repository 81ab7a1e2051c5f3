"""window (L3): checked against Swin's own recipe, written out with its slices and a window loop."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError

from .padding import assert_grid_padding_matches_pattern


def swin_oracle(x_q, x_k, x_v, ws, shift):
    """Swin (Sec. 3.2, its official code's img_mask slices) on (B, H, Hs, Ws, D), padding masked."""
    b, h, H, W, d = x_q.shape
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    real = torch.zeros(Hp, Wp, dtype=torch.bool)
    real[:H, :W] = True
    label = torch.zeros(Hp, Wp, dtype=torch.long)
    if shift:
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                label[hs, wsl] = cnt  # labels live in the rolled frame, as in Swin's code
                cnt += 1
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, Wp - W, 0, Hp - H))  # noqa: E731
    roll = lambda t: torch.roll(t, shifts=(-shift, -shift), dims=(2, 3))  # noqa: E731
    q, k, v = (roll(pad(t)) for t in (x_q, x_k, x_v))
    real_r = torch.roll(real, shifts=(-shift, -shift), dims=(0, 1))
    out = torch.zeros_like(q)
    for i in range(0, Hp, ws):
        for j in range(0, Wp, ws):
            sl = (slice(i, i + ws), slice(j, j + ws))
            qq, kk, vv = (t[:, :, sl[0], sl[1]].reshape(b, h, ws * ws, d) for t in (q, k, v))
            lab, keep = label[sl].reshape(-1), real_r[sl].reshape(-1)
            allowed = (lab[:, None] == lab[None, :]) & keep[None, :]
            s = (qq @ kk.transpose(-1, -2)) * d**-0.5
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)  # padding queries may see nothing
            out[:, :, sl[0], sl[1]] = (p @ vv).reshape(b, h, ws, ws, d)
    out = torch.roll(out, shifts=(shift, shift), dims=(2, 3))
    return out[:, :, :H, :W]


@pytest.mark.parametrize("H, W, ws, shift", [(8, 8, 4, 0), (8, 8, 4, 2), (9, 7, 4, 2), (14, 14, 7, 3), (5, 11, 3, 1)])
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
def test_equals_swins_recipe(H, W, ws, shift, backend):
    gen = torch.Generator().manual_seed(H * W + ws)
    q, k, v = (torch.randn(2, 3, H, W, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = attnzoo.window_attention(q, k, v, window_size=ws, shift_size=shift, backend=backend)
    torch.testing.assert_close(out, swin_oracle(q, k, v, ws, shift))


def test_shift_must_be_smaller_than_the_window():
    x = torch.randn(1, 2, 8, 8, 16)
    with pytest.raises(ParameterError, match="shift_size: must be smaller than window_size") as info:
        attnzoo.window_attention(x, x, x, window_size=4, shift_size=(1, 4))
    assert info.value.argument == "shift_size"
    with pytest.raises(ParameterError, match="window_size: expected a positive int or a tuple of 2"):
        attnzoo.window_attention(x, x, x, window_size=(4, 4, 4))


def test_without_shift_windows_are_independent_blocks():
    x = torch.randn(1, 2, 8, 16)  # 1D, windows of 4: block-diagonal attention
    out = attnzoo.window_attention(x, x, x, window_size=4)
    for i in range(0, 8, 4):
        blk = x[:, :, i : i + 4]
        torch.testing.assert_close(out[:, :, i : i + 4], attnzoo.softmax_attention(blk, blk, blk))


# ---- key_padding_mask (2D/3D): pads masked out of each window, which stays in place
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
@pytest.mark.parametrize("shape, params", [((6, 7), dict(window_size=3, shift_size=1)), ((4, 3, 5), dict(window_size=(2, 3, 2), shift_size=(1, 0, 1)))])
def test_padding_masks_keys_out_of_each_window_as_softmax_with_the_pattern_does(shape, params, backend):
    """Against softmax over the WindowMask predicate with the same key_padding_mask (a separate implementation
    of masking); one entry padded at the end of its last axis, one scattered, one with no key at all."""
    from attnzoo.functional.local.window import _window_mask

    assert_grid_padding_matches_pattern("window", _window_mask, shape, params, backend)
