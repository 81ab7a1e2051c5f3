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
]


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
    out = attnzoo.neighborhood_attention(to_heads(q), to_heads(k), to_heads(v), backend="reference", **kw)
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
    for (name, p1), p2 in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_bad_construction_and_inputs():
    with pytest.raises(ParameterError, match="num_heads: expected a divisor of dim=32"):
        NeighborhoodAttention2D(dim=32, num_heads=5, kernel_size=3)
    layer = NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=3)
    with pytest.raises(ShapeError, match=r"x: expected \(B, S0, S1, C=32\)"):
        layer(torch.randn(2, 8, 32))
    with pytest.raises(ParameterError, match="kernel_size"):
        layer(torch.randn(1, 2, 8, 32))  # kernel 3 > axis of 2
