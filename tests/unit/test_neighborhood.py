"""neighborhood (L1): NATTEN's window semantics, checked against an independent formulation."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.local import NeighborhoodMask

NA = attnzoo.get("neighborhood")


def natten_window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's non-causal window start (odd kernels), in absolute indices, as NATTEN states it."""
    nb = kernel // 2
    if dilation <= 1:
        return max(index - nb, 0) + (index + nb >= length) * (length - index - nb - 1)
    ni = index - nb * dilation
    if ni < 0:
        return index % dilation
    if index + nb * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nb * dilation
        return a + imodd - kernel * dilation
    return ni


def mask_1d(length, kernel, dilation=1, causal=False):
    return masks.dense_mask(NeighborhoodMask((length,), (kernel,), (dilation,), (causal,)), length, length)[0, 0]


@pytest.mark.parametrize("length", range(1, 26))
def test_matches_nattens_window_rule(length):
    for kernel in range(1, length + 1, 2):
        for dilation in range(1, length // kernel + 1):
            m = mask_1d(length, kernel, dilation)
            for i in range(length):
                start = natten_window_start(i, length, kernel, dilation)
                want = {start + dilation * t for t in range(kernel)}
                got = set(m[i].nonzero().flatten().tolist())
                assert got == want, f"L={length} k={kernel} d={dilation} i={i}: {sorted(got)} != {sorted(want)}"


@pytest.mark.parametrize("shape, kernel, dilation", [((9,), (4,), (2,)), ((7, 8), (3, 4), (2, 1)), ((4, 5, 6), (3, 2, 5), (1, 2, 1))])
def test_every_query_sees_exactly_the_kernel_volume(shape, kernel, dilation):
    n = torch.tensor(shape).prod().item()
    m = masks.dense_mask(NeighborhoodMask(shape, kernel, dilation, (False,) * len(shape)), n, n)[0, 0]
    assert torch.all(m.sum(-1) == torch.tensor(kernel).prod())


def test_causal_windows_end_at_the_query():
    m = mask_1d(12, 4, dilation=2, causal=True)
    for i in range(12):
        p, g = i // 2, i % 2
        want = {g + 2 * t for t in range(max(p - 3, 0), p + 1)}
        assert set(m[i].nonzero().flatten().tolist()) == want


def test_two_axes_are_the_product_of_one():
    rows, cols = mask_1d(6, 3, 2), mask_1d(7, 5, 1, causal=True)
    m = masks.dense_mask(NeighborhoodMask((6, 7), (3, 5), (2, 1), (False, True)), 42, 42)[0, 0].view(6, 7, 6, 7)
    for a, b in itertools.product(range(6), range(7)):
        assert torch.equal(m[a, b], rows[a][:, None] & cols[b][None, :])


def test_causal_1d_neighborhood_is_a_causal_sliding_window():
    x = torch.randn(2, 3, 40, 16, dtype=torch.float64)
    out = attnzoo.neighborhood_attention(x, x, x, kernel_size=9, causal=True)
    torch.testing.assert_close(out, attnzoo.sliding_window_attention(x, x, x, window=(8, 0), causal=True))


@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_spatial_layout_round_trips(backend):
    x = torch.randn(1, 2, 5, 6, 7, 8)
    out, lse = attnzoo.neighborhood_attention(x, x, x, kernel_size=3, return_lse=True, backend=backend)
    assert out.shape == x.shape and lse.shape == (1, 2, 5, 6, 7)


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 2, 6, 8, 16)
    with pytest.raises(ParameterError, match="kernel_size: expected a kernel no larger") as info:
        NA(x, x, x, kernel_size=(7, 3))
    assert info.value.argument == "kernel_size"
    with pytest.raises(ParameterError, match="dilation: kernel_size \\* dilation must fit") as info:
        NA(x, x, x, kernel_size=3, dilation=(3, 1))
    with pytest.raises(ParameterError, match="kernel_size: expected a positive int or a tuple of 2"):
        NA(x, x, x, kernel_size=(3, 3, 3))
    with pytest.raises(ParameterError, match="causal: expected a bool or a tuple of 2"):
        NA(x, x, x, kernel_size=3, causal=(True,))
    with pytest.raises(ShapeError, match="self-attention only"):
        NA(x, x[:, :, :5], x[:, :, :5], kernel_size=3)
