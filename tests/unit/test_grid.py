"""grid (L4): checked against MaxViT's grouping written out as explicit index lists."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError

from .padding import assert_grid_padding_matches_pattern


def grid_oracle(q, k, v, g):
    """Each group: the tokens (i, j) with i % sh == a and j % sw == b (sh = ceil(H / g))."""
    b, h, H, W, d = q.shape
    sh, sw = -(-H // g), -(-W // g)
    out = torch.zeros_like(q)
    for a, c in itertools.product(range(sh), range(sw)):
        members = [(i, j) for i in range(a, H, sh) for j in range(c, W, sw)]
        ii = torch.tensor([m[0] for m in members])
        jj = torch.tensor([m[1] for m in members])
        qq, kk, vv = (t[:, :, ii, jj] for t in (q, k, v))  # (B, H, members, D)
        p = torch.softmax((qq @ kk.transpose(-1, -2)) * d**-0.5, -1)
        out[:, :, ii, jj] = p @ vv
    return out


@pytest.mark.parametrize("H, W, g", [(8, 8, 4), (14, 14, 7), (9, 7, 3), (10, 6, 4), (5, 5, 5), (6, 6, 1)])
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
def test_equals_maxvit_groups(H, W, g, backend):
    gen = torch.Generator().manual_seed(H * 31 + W + g)
    q, k, v = (torch.randn(2, 3, H, W, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = attnzoo.grid_attention(q, k, v, grid_size=g, backend=backend)
    torch.testing.assert_close(out, grid_oracle(q, k, v, g))


def test_grid_of_the_whole_axis_is_full_attention():
    x = torch.randn(1, 2, 12, 16)
    torch.testing.assert_close(attnzoo.grid_attention(x, x, x, grid_size=12), attnzoo.softmax_attention(x, x, x))


def test_grid_larger_than_the_axis_is_refused():
    x = torch.randn(1, 2, 6, 8, 16)
    with pytest.raises(ParameterError, match="grid_size: expected at most the axis size") as info:
        attnzoo.grid_attention(x, x, x, grid_size=(7, 2))
    assert info.value.argument == "grid_size"


# ---- key_padding_mask (2D/3D): pads masked out of each group, which stays in place
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
@pytest.mark.parametrize("shape, params", [((6, 7), dict(grid_size=(2, 3))), ((4, 3, 5), dict(grid_size=(2, 1, 2)))])
def test_padding_masks_keys_out_of_each_group_as_softmax_with_the_pattern_does(shape, params, backend):
    """Against softmax over the GridMask predicate with the same key_padding_mask (a separate implementation
    of masking); one entry padded at the end of its last axis, one scattered, one with no key at all."""
    from attnzoo.functional.local.grid import _grid_mask

    assert_grid_padding_matches_pattern("grid", _grid_mask, shape, params, backend)
