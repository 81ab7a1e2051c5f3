"""attnzoo.nn neighborhood modules: shapes, the functional call they wrap, backend switching."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

CASES = [
    (NeighborhoodAttention1D, (2, 20, 32), dict(kernel_size=5, dilation=2)),
    (NeighborhoodAttention2D, (2, 9, 11, 32), dict(kernel_size=(3, 5), causal=(True, False))),
    (NeighborhoodAttention3D, (1, 4, 5, 6, 32), dict(kernel_size=3)),
    (NeighborhoodAttention1D, (2, 17, 32), dict(kernel_size=6, stride=4, rpb=True)),
    (NeighborhoodAttention2D, (1, 9, 11, 32), dict(kernel_size=(3, 4), dilation=(2, 1), stride=(3, 2), causal=(False, True), rpb=True)),
    (NeighborhoodAttention3D, (1, 4, 5, 6, 32), dict(kernel_size=(2, 3, 3), stride=(2, 1, 3), rpb=True)),
]


def functional_kw(layer, kw):
    """The functional form's keywords for a layer built with ``kw`` (its table in place of rpb=True)."""
    return {**kw, "rpb": layer.rpb}


@pytest.mark.parametrize("cls, shape, kw", CASES, ids=lambda x: getattr(x, "__name__", None))
def test_module_is_projections_around_the_functional_form(cls, shape, kw):
    torch.manual_seed(0)
    layer = cls(dim=32, num_heads=4, **kw).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    # the same computation written out: project, split heads, attend (reference), merge, project
    b, spatial = shape[0], shape[1:-1]
    q, k, v = layer.qkv(x).reshape(b, *spatial, 3, 4, 8).unbind(-3)
    to_heads = lambda t: t.movedim(-2, 1)  # noqa: E731
    out = attnzoo.neighborhood_attention(to_heads(q), to_heads(k), to_heads(v), backend="reference", **functional_kw(layer, kw))
    torch.testing.assert_close(y, layer.proj(out.movedim(1, -2).reshape(*shape)))


@pytest.mark.parametrize("cls, shape, kw", CASES, ids=lambda x: getattr(x, "__name__", None))
def test_backends_agree_in_output_and_parameter_gradients(cls, shape, kw):
    torch.manual_seed(1)
    fast = cls(dim=32, num_heads=4, backend="tiled", **kw).double()
    slow = cls(dim=32, num_heads=4, backend="reference", **kw).double()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    y1, y2 = fast(x), slow(x)
    torch.testing.assert_close(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    names = [name for name, _ in fast.named_parameters()]
    assert ("rpb" in names) == bool(kw.get("rpb"))
    for (name, p1), p2 in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "cls, kernel, shape",
    [(NeighborhoodAttention1D, 7, (8, 13)), (NeighborhoodAttention2D, (3, 5), (8, 5, 9)), (NeighborhoodAttention3D, 2, (8, 3, 3, 3))],
)
def test_rpb_is_one_table_per_head_initialised_as_in_nat(cls, kernel, shape):
    torch.manual_seed(0)
    tables = torch.cat([cls(dim=64, num_heads=8, kernel_size=kernel, rpb=True).rpb.detach().flatten() for _ in range(20)])
    layer = cls(dim=64, num_heads=8, kernel_size=kernel, rpb=True)
    assert layer.rpb.shape == shape and layer.rpb.requires_grad
    assert 0.018 < float(tables.std()) < 0.022 and abs(float(tables.mean())) < 0.002  # NAT: trunc_normal_(std=0.02) cut at +-2
    assert cls(dim=64, num_heads=8, kernel_size=kernel).rpb is None
    assert "rpb=True" in repr(layer) and "stride=1" in repr(layer)


def test_bad_construction_and_inputs():
    with pytest.raises(ParameterError, match="num_heads: expected a divisor of dim=32"):
        NeighborhoodAttention2D(dim=32, num_heads=5, kernel_size=3)
    layer = NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=3)
    with pytest.raises(ShapeError, match=r"x: expected \(B, S0, S1, C=32\)"):
        layer(torch.randn(2, 8, 32))
    with pytest.raises(ParameterError, match="kernel_size"):
        layer(torch.randn(1, 2, 8, 32))  # kernel 3 > axis of 2
    with pytest.raises(ParameterError, match="kernel_size: expected a positive int or a tuple of 2") as info:
        NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=(3, 3, 3), rpb=True)  # the table needs a valid kernel now
    assert info.value.argument == "kernel_size"
    with pytest.raises(ParameterError, match="stride: expected at most kernel_size"):
        NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=3, stride=4)(torch.randn(1, 8, 8, 32))


# ---- key_padding_mask passed through
def test_a_padded_1d_batch_through_the_layer_equals_each_sequence_alone():
    torch.manual_seed(3)
    layer = NeighborhoodAttention1D(dim=16, num_heads=2, kernel_size=3, dilation=2, rpb=True).double()
    lengths, n = (11, 7, 6), 11
    x = torch.randn(3, n, 16, dtype=torch.float64)
    for side in ("right", "left"):
        pad = torch.ones(3, n, dtype=torch.bool)
        spans = [slice(0, m) if side == "right" else slice(n - m, n) for m in lengths]
        for b, rows in enumerate(spans):
            pad[b, rows] = False
        out = layer(x, key_padding_mask=pad)
        for b, rows in enumerate(spans):
            torch.testing.assert_close(out[b : b + 1, rows], layer(x[b : b + 1, rows]), msg=lambda m: f"{side}, sequence {b}: {m}")


def test_the_2d_layer_passes_the_mask_to_the_functional_form():
    torch.manual_seed(4)
    layer = NeighborhoodAttention2D(dim=16, num_heads=2, kernel_size=3).double()
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)
    pad = torch.zeros(2, 5, 6, dtype=torch.bool)
    pad[1, 3:] = True
    out = layer(x, key_padding_mask=pad)
    x2 = x.clone()
    x2[pad] = 100.0  # what lies under the pads never reaches the output of a real token
    torch.testing.assert_close(layer(x2, key_padding_mask=pad)[~pad], out[~pad])
    assert not torch.allclose(out, layer(x))


def test_the_vwa_layer_reads_pads_as_zeros_and_masks_them():
    from attnzoo.nn.local.varying_window import VaryingWindowAttention

    torch.manual_seed(5)
    layer = VaryingWindowAttention(dim=16, num_heads=2, window_size=2, ratio=2).double()
    x = torch.randn(2, 6, 8, 16, dtype=torch.float64)
    pad = torch.zeros(2, 6, 8, dtype=torch.bool)
    pad[0, :, 6:] = True
    out = layer(x, key_padding_mask=pad)
    x2 = x.clone()
    x2[pad] = 100.0
    torch.testing.assert_close(layer(x2, key_padding_mask=pad)[~pad], out[~pad])
    torch.testing.assert_close(out[1:], layer(x[1:]))  # an entry without pads is unchanged
    with pytest.raises(ParameterError) as info:
        layer(x, key_padding_mask=pad.float())
    assert info.value.argument == "key_padding_mask"
