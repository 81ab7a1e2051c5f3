"""masks.py (predicates, tile grids, converters) and merge_attention_states."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.masks import _grid_by_evaluation, tile_grid

BUILTINS = {
    "causal": masks.causal(0),
    "causal_offset": masks.causal(-5),
    "window": masks.sliding_window(7, 2),
    "window_left_unbounded": masks.sliding_window(None, 3, offset=4),
    "prefix_lm": masks.prefix_lm(10),
    "and": masks.causal(0) & masks.sliding_window(12, None),
    "or": masks.sliding_window(3, 3) | masks.prefix_lm(4),
}


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("nq, nk, bq, bk", [(50, 50, 8, 8), (37, 61, 16, 8), (9, 100, 4, 16)])
def test_closed_form_tile_grids_are_sound(name, nq, nk, bq, bk):
    """Closed-form grids may over-visit and under-report full tiles, never the reverse."""
    mask = BUILTINS[name]
    visit, full = tile_grid(mask, nq, nk, bq, bk)
    true_visit, true_full = _grid_by_evaluation(mask, nq, nk, bq, bk, 1, 1)
    assert bool((visit | ~true_visit).all()), "a tile with visible keys would be skipped"
    assert bool((~full | true_full).all()), "a partly masked tile would be treated as full"
    if name not in ("and", "or"):  # the single built-ins are exact
        assert torch.equal(visit, true_visit) and torch.equal(full & visit, true_full & true_visit)


def test_dense_mask_matches_the_definition():
    m = masks.dense_mask(masks.sliding_window(2, 1, offset=3), 5, 9)
    assert m.shape == (1, 1, 5, 9)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(9), indexing="ij")
    assert torch.equal(m[0, 0], (j >= i + 3 - 2) & (j <= i + 3 + 1))


def test_document_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    m = masks.dense_mask(masks.document(seg), 6, 6, batch=2)
    assert m.shape == (2, 1, 6, 6)
    assert torch.equal(m[:, 0], seg[:, :, None] == seg[:, None, :])
    with pytest.raises(TypeError):
        masks.document(seg.float())


def test_alibi_and_softcap():
    slopes = masks.alibi_slopes(8)
    assert torch.allclose(slopes, torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    assert len(masks.alibi_slopes(12)) == 12
    s = torch.tensor([-100.0, 0.0, 5.0, 100.0])
    capped = masks.softcap(5.0)(s, None, None, None, None)
    assert torch.allclose(capped, torch.tensor([-5.0, 0.0, 5.0 * 0.7615941559557649, 5.0]))
    idx = torch.arange(3)
    biased = masks.alibi(torch.tensor([0.5]))(torch.zeros(1, 1, 3, 3), None, torch.zeros(1, 1, 1, 1, dtype=torch.long), idx.view(1, 1, 3, 1), idx.view(1, 1, 1, 3))
    assert torch.equal(biased[0, 0], -0.5 * (idx[:, None] - idx[None, :]).abs().float())
    with pytest.raises(ValueError, match="cap"):
        masks.softcap(0)
    with pytest.raises(ValueError, match="left"):
        masks.sliding_window(-1)


def test_flex_block_mask_from_a_builtin():
    bm = masks.flex_block_mask(masks.causal(0), 256, 256, block_size=128)
    dense = bm.to_dense()  # (1, 1, 2, 2) tile occupancy
    assert dense[0, 0].tolist() == [[1, 0], [1, 1]]


# ---------------------------------------------------------------------------------------------
# merge_attention_states
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuts", [[], [0], [5, 5], [3, 17, 30], [1, 2, 3, 4]], ids=str)
def test_merge_equals_attention_over_the_union(cuts):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 40, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 40, 8, generator=gen, dtype=torch.float64)
    full, full_lse = attnzoo.attention(q, k, v, backend="reference", return_lse=True)
    bounds = [0, *cuts, 40]
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:  # an empty part: zeros with lse -inf, it must change nothing
            outs.append(torch.zeros_like(full))
            lses.append(torch.full_like(full_lse, float("-inf")))
            continue
        o, lse = attnzoo.attention(q, k[:, :, a:b], v[:, :, a:b], backend="reference", return_lse=True)
        outs.append(o)
        lses.append(lse)
    out, lse = attnzoo.merge_attention_states(outs, lses)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)


def test_merge_of_nothing_is_zero_and_differentiable():
    o = torch.randn(3, 1, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    lse = torch.tensor([[-float("inf"), 0.5]] * 3, dtype=torch.float64).view(3, 1, 1, 2).requires_grad_()
    lse.data[:, :, :, 0] = -float("inf")
    out, total = attnzoo.merge_attention_states(o, lse)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :])) and torch.isneginf(total[..., 0]).all()
    out.sum().backward()
    assert torch.isfinite(o.grad).all() and torch.isfinite(lse.grad).all()
    torch.autograd.gradcheck(lambda a, b: attnzoo.merge_attention_states(a, b)[0], (o.detach()[..., 1:, :].requires_grad_(), torch.randn(3, 1, 1, 1, dtype=torch.float64, requires_grad=True)))


def test_merge_checks_shapes():
    with pytest.raises(ValueError, match="lses"):
        attnzoo.merge_attention_states(torch.zeros(2, 3, 4), torch.zeros(2, 4))
