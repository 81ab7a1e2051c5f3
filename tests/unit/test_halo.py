"""halo (L6): checked against HaloNet's blocks, each block's key region sliced out in a loop."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError

from .padding import assert_grid_padding_matches_pattern


def halo_oracle(q, k, v, b, h):
    _, _, H, W, d = q.shape
    out = torch.zeros_like(q)
    for i, j in itertools.product(range(0, H, b), range(0, W, b)):
        qs = q[:, :, i : i + b, j : j + b]
        r0, r1, c0, c1 = max(i - h, 0), min(i + b + h, H), max(j - h, 0), min(j + b + h, W)
        ks, vs = (t[:, :, r0:r1, c0:c1].flatten(2, 3) for t in (k, v))
        p = torch.softmax((qs.flatten(2, 3) @ ks.transpose(-1, -2)) * d**-0.5, -1)
        out[:, :, i : i + b, j : j + b] = (p @ vs).view(qs.shape)
    return out


@pytest.mark.parametrize("H, W, b, h", [(8, 8, 4, 1), (16, 16, 8, 3), (9, 7, 4, 2), (5, 5, 2, 0), (6, 10, 3, 5)])
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
def test_equals_halonet_blocks(H, W, b, h, backend):
    gen = torch.Generator().manual_seed(H * 17 + W + b + h)
    q, k, v = (torch.randn(2, 3, H, W, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = attnzoo.halo_attention(q, k, v, block_size=b, halo_size=h, backend=backend)
    torch.testing.assert_close(out, halo_oracle(q, k, v, b, h))


def test_zero_halo_is_window_attention():
    x = torch.randn(1, 2, 9, 6, 16)
    torch.testing.assert_close(attnzoo.halo_attention(x, x, x, block_size=3, halo_size=0), attnzoo.window_attention(x, x, x, window_size=3))


def test_halo_size_is_required_and_non_negative():
    x = torch.randn(1, 2, 8, 8, 16)
    with pytest.raises(ParameterError, match="halo_size: expected a non-negative int"):
        attnzoo.halo_attention(x, x, x, block_size=4, halo_size=-1)


# ---- key_padding_mask (2D/3D): pads masked out of each block, which stays in place
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
@pytest.mark.parametrize("shape, params", [((6, 7), dict(block_size=3, halo_size=1)), ((4, 3, 5), dict(block_size=2, halo_size=(1, 0, 1)))])
def test_padding_masks_keys_out_of_each_block_as_softmax_with_the_pattern_does(shape, params, backend):
    """Against softmax over the HaloMask predicate with the same key_padding_mask (a separate implementation
    of masking); one entry padded at the end of its last axis, one scattered, one with no key at all."""
    from attnzoo.functional.local.halo import _halo_mask

    assert_grid_padding_matches_pattern("halo", _halo_mask, shape, params, backend)
