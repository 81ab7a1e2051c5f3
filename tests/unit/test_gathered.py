"""The gathered-attention kernel (kernels/gathered.py), both paths, against materialized attention."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import gathered
from attnzoo.kernels.gathered import NeighborTable, gathered_attention
from attnzoo.kernels.reference import materialized_attention

PATHS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not gathered.native_available(), reason="no C++ toolchain"))]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "torch":  # force the PyTorch path even where the native kernel exists
        monkeypatch.setattr(gathered, "_use_native", lambda q, v: False)
    return request.param


def random_table(nq: int, nk: int, slots: int, gen: torch.Generator, empty_rows: int = 2) -> torch.Tensor:
    """Distinct keys per row, about a quarter of the slots empty, a few rows with no key at all."""
    index = torch.stack([torch.randperm(nk, generator=gen)[:slots] for _ in range(nq)])
    index[torch.rand(nq, slots, generator=gen) < 0.25] = -1
    index[:empty_rows] = -1
    return index


def dense_allowed_and_bias(index: torch.Tensor, nk: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    nq, slots = index.shape
    allowed = torch.zeros(nq, nk, dtype=torch.bool)
    rows = torch.arange(nq)[:, None].expand(nq, slots)
    named = index >= 0
    allowed[rows[named], index[named]] = True
    if bias is None:
        return allowed, None
    dense = torch.zeros(*bias.shape[:2], nq, nk, dtype=bias.dtype)
    dense[:, :, rows[named], index[named]] = bias[:, :, named]
    return allowed, dense


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize(
    "heads, kv_heads, dim, bias_shape",
    [(4, 4, 64, None), (4, 2, 32, (1, 4)), (2, 1, 24, (2, 1)), (3, 3, 128, (2, 3))],
)
def test_matches_materialized_attention_with_gradients(path, heads, kv_heads, dim, bias_shape):
    gen = torch.Generator().manual_seed(dim + heads)
    b, nq, nk, slots = 2, 37, 29, 9
    index = random_table(nq, nk, slots, gen)
    q = torch.randn(b, heads, nq, dim, generator=gen, requires_grad=True)
    k = torch.randn(b, kv_heads, nk, dim, generator=gen, requires_grad=True)
    v = torch.randn(b, kv_heads, nk, dim, generator=gen, requires_grad=True)
    bias = None if bias_shape is None else torch.randn(*bias_shape, nq, slots, generator=gen, requires_grad=True)
    out, lse = gathered_attention(q, k, v, NeighborTable.build(index, nk), scale=0.3, bias=bias)

    allowed, dense_bias = dense_allowed_and_bias(index, nk, bias)
    ref, ref_lse = materialized_attention(q, k, v, scale=0.3, allowed=allowed, bias=dense_bias)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-4)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))  # rows with no key: 0, lse -inf
    assert bool((lse[:, :, :2] == float("-inf")).all())

    grad = torch.randn(out.shape, generator=gen)
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    ours = torch.autograd.grad(out, inputs, grad)
    theirs = torch.autograd.grad(ref, inputs, grad)
    for name, a, b_ in zip("qkvb", ours, theirs):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"grad {name}: {m}")


def test_gradcheck_float64_including_the_bias():
    # float64 runs on the PyTorch path everywhere (the native kernel accumulates in float32)
    gen = torch.Generator().manual_seed(0)
    table = NeighborTable.build(random_table(7, 6, 4, gen, empty_rows=1), 6)
    q = torch.randn(1, 2, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(1, 2, 7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: gathered_attention(*x[:3], table, scale=0.5, bias=x[3])[0], (q, k, v, bias))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_bfloat16_within_tolerance(path):
    gen = torch.Generator().manual_seed(3)
    index = random_table(40, 40, 8, gen, empty_rows=0)
    q, k, v = (torch.randn(1, 2, 40, 64, generator=gen) for _ in range(3))
    out, _ = gathered_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), NeighborTable.build(index, 40), scale=0.125)
    allowed, _ = dense_allowed_and_bias(index, 40, None)
    ref, _ = materialized_attention(q, k, v, scale=0.125, allowed=allowed)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_inverse_table_lists_every_named_slot_once():
    gen = torch.Generator().manual_seed(5)
    index = random_table(50, 13, 6, gen)
    table = NeighborTable.build(index, 13)
    for j in range(13):
        slots = table.inv_pos[table.inv_ptr[j] : table.inv_ptr[j + 1]]
        assert torch.equal(slots.sort().values, torch.nonzero(index.flatten() == j).flatten())
    assert int(table.inv_ptr[-1]) == int((index >= 0).sum())


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="index"):
        NeighborTable.build(torch.zeros(3, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="index"):
        NeighborTable.build(torch.full((3, 2), 4), 4)
    table = NeighborTable.build(torch.zeros(3, 2, dtype=torch.int64), 4)
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="table"):
        gathered_attention(q, q[:, :, :4], q[:, :, :4], table, scale=1.0)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_input_gives_nan_output_not_a_silent_zero(path, where):
    gen = torch.Generator().manual_seed(9)
    index = random_table(6, 6, 3, gen, empty_rows=0)
    q, k, v = (torch.randn(1, 1, 6, 64, generator=gen) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 0, index[0, 0] if where != "q" else 0] = float("nan")
    out, _ = gathered_attention(q, k, v, NeighborTable.build(index, 6), scale=0.125)
    assert bool(out[0, 0, 0].isnan().any())
