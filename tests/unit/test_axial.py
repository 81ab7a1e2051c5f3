"""axial (L5): checked against attention run line by line in a loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError

AXIAL = attnzoo.get("axial")


@pytest.mark.parametrize("causal", [False, True])
def test_rows_and_columns_equal_per_line_attention(causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 7, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    rows = attnzoo.axial_attention(q, k, v, axis=1, causal=causal)
    cols = attnzoo.axial_attention(q, k, v, axis=0, causal=causal)
    for r in range(5):  # a row: fixed first coordinate, attention along the second
        want = F.scaled_dot_product_attention(q[:, :, r], k[:, :, r], v[:, :, r], is_causal=causal)
        torch.testing.assert_close(rows[:, :, r], want)
    for c in range(7):
        want = F.scaled_dot_product_attention(q[:, :, :, c], k[:, :, :, c], v[:, :, :, c], is_causal=causal)
        torch.testing.assert_close(cols[:, :, :, c], want)


def test_one_axis_is_full_attention_and_negative_axes_count_from_the_end():
    x = torch.randn(1, 2, 30, 16)
    torch.testing.assert_close(attnzoo.axial_attention(x, x, x, axis=0), attnzoo.softmax_attention(x, x, x))
    y = torch.randn(1, 2, 4, 5, 6, 16)
    torch.testing.assert_close(attnzoo.axial_attention(y, y, y, axis=-1), attnzoo.axial_attention(y, y, y, axis=2))


def test_dispatch_uses_sdpa_lines_and_a_block_engine_for_the_lse():
    from attnzoo.kernels import block_sparse

    x = torch.randn(1, 2, 6, 6, 16)
    assert [n for n, why in AXIAL.explain(x, x, x, axis=0) if why is None][0] == "sdpa"
    lse_engine = "fused" if block_sparse.native_usable(x.device, x.dtype) else "tiled"
    assert [n for n, why in AXIAL.explain(x, x, x, axis=0, return_lse=True) if why is None][0] == lse_engine
    out, lse = attnzoo.axial_attention(x, x, x, axis=0, return_lse=True)
    assert lse.shape == (1, 2, 6, 6)


def test_bad_axis():
    x = torch.randn(1, 2, 6, 6, 16)
    with pytest.raises(ParameterError, match=r"axis: expected a spatial axis index in \[-2, 2\)"):
        attnzoo.axial_attention(x, x, x, axis=2)


# ---- key_padding_mask: pads masked out of their line
from .padding import N as PAD_N, assert_padded_equals_alone  # noqa: E402
from .qkv import random_qkv  # noqa: E402


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True])
def test_1d_padded_batch_equals_each_sequence_alone(causal, side, backend):
    q, k, v = random_qkv(b=3, h=4, nq=PAD_N, nk=PAD_N, kv_heads=2)
    assert_padded_equals_alone(lambda *t, **kw: AXIAL(*t, axis=0, causal=causal, backend=backend, **kw), q, k, v, side)


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
@pytest.mark.parametrize("causal", [False, True])
def test_2d_padding_equals_per_line_attention_with_the_lines_padding(causal, backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 5, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    pad = torch.rand(2, 5, 6, generator=gen) < 0.4
    pad[1, 2] = True  # a whole row padded: along axis -1 its queries see nothing
    out = attnzoo.axial_attention(q, k, v, axis=-1, causal=causal, key_padding_mask=pad, backend=backend)
    for row in range(5):
        line = attnzoo.softmax_attention(q[:, :, row], k[:, :, row], v[:, :, row], causal=causal, key_padding_mask=pad[:, row], backend="reference")
        torch.testing.assert_close(out[:, :, row], line, atol=1e-12, rtol=1e-10)
    assert torch.all(out[1, :, 2] == 0)
