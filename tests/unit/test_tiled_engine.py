"""The tiled engine driven directly: every kind of slot (views and gathers), against the reference.

Dense and causal plans use views only (key-outer slots); sliding windows use query-outer slots
with sliced key tiles; a checkerboard of tiles forces gathered (index tensor) query and key
selections, the paths no built-in pattern reaches yet. Cases: B-Hq-Hkv-Nq-Nk-D.
"""

from __future__ import annotations

import pytest
import torch

from attnzoo import masks
from attnzoo.functional.dense import _reference
from attnzoo.kernels import tiled
from attnzoo.kernels.tiled import BlockPlan, tiled_attention

BLOCK = 16


def checkerboard(b, h, q, kv):
    return ((q // BLOCK) + (kv // BLOCK)) % 2 == 0


def stripes(b, h, q, kv):  # key tiles 0, 3, 4 for even query tiles, all for odd ones
    kt = kv // BLOCK
    return ((q // BLOCK) % 2 == 1) | (kt == 0) | (kt == 3) | (kt == 4)


PATTERNS = {
    "dense": None,
    "causal": masks.causal(0),
    "causal_bottom_right": masks.causal(7),
    "window": masks.sliding_window(20, 5),
    "checkerboard": checkerboard,
    "stripes": stripes,
}


def reference(q, k, v, pattern, bias=None, score_mod=None, scale=None):
    return _reference(
        q, k, v, causal=False, causal_alignment="bottom_right", key_padding_mask=None, bias=bias,
        mask_mod=pattern, score_mod=score_mod, scale=scale, return_lse=True,
    )


def slot_kinds(plan):
    kinds = set()
    for s in plan.slots:
        kinds.add(("q:" + type(s.q_blocks).__name__, "kv:" + type(s.kv_blocks).__name__))
    return kinds


@pytest.mark.parametrize("slot_cap", [16, 2], ids=["cap16", "cap2"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 100, 100, 8), (2, 4, 2, 77, 90, 16), (1, 3, 1, 33, 129, 12)], ids=lambda s: "B{}-Hq{}-Hkv{}-Nq{}-Nk{}-D{}".format(*s))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_engine_matches_reference(name, shape, slot_cap, monkeypatch):
    """cap2 cuts every slot into pieces of two query tiles (as long inputs are cut into 16)."""
    monkeypatch.setattr(tiled, "MAX_Q_TILES_PER_SLOT", slot_cap)
    b, hq, hkv, nq, nk, d = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, nk, d + 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(hq, nq, nk, generator=gen, dtype=torch.float64, requires_grad=True)
    pattern = PATTERNS[name]
    plan = masks.block_plan(pattern, nq, nk, block_q=BLOCK, block_k=BLOCK, batch=b, heads=hq)
    out, lse = tiled_attention(q, k, v, plan=plan, mask_mod=pattern, bias=bias, score_mod=masks.softcap(4.0))
    ref, ref_lse = reference(q, k, v, pattern, bias=bias, score_mod=masks.softcap(4.0))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype))
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, bias))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, bias))
    for n, g1, g2 in zip("qkvb", got, want):
        torch.testing.assert_close(g1, g2, msg=lambda m, n=n: f"d{n}: {m}")


def test_patterns_reach_every_slot_kind():
    """The cases above cover views (slices, single tiles) and gathers (index tensors)."""
    kinds = set()
    for pattern in PATTERNS.values():
        kinds |= slot_kinds(masks.block_plan(pattern, 100, 100, block_q=BLOCK, block_k=BLOCK))
    assert ("q:slice", "kv:int") in kinds  # key-outer, views
    assert ("q:slice", "kv:slice") in kinds  # query-outer along a diagonal
    assert any(q == "q:Tensor" for q, _ in kinds)  # gathered query tiles
    assert any(kv == "kv:Tensor" for _, kv in kinds)  # gathered key tiles


def test_causal_plan_skips_tiles_and_masks_only_the_diagonal():
    plan = masks.block_plan(masks.causal(0), 1024, 1024, block_q=128, block_k=128)
    assert plan.pairs == 8 * 9 // 2  # lower triangle of an 8 x 8 tile grid
    assert all(s.masked == slice(0, 1) for s in plan.slots)  # one partial tile per slot
    window = masks.block_plan(masks.sliding_window(256, 0), 8192, 8192, block_q=128, block_k=128)
    assert window.density < 0.05
    assert len(window.slots) == 3 * 4  # three diagonals, each cut into 64 / 16 query-tile slots


@pytest.mark.parametrize("n", [4096, 65536])
def test_slots_stay_bounded_whatever_n(n):
    """The largest temporary is one slot's scores: at most 16 query tiles, however long N is."""
    from attnzoo.kernels.tiled import MAX_Q_TILES_PER_SLOT

    for pattern in (None, masks.causal(0), masks.sliding_window(256, 0)):
        plan = masks.block_plan(pattern, n, n, block_q=128, block_k=128)
        assert max(s.n_active for s in plan.slots) <= MAX_Q_TILES_PER_SLOT


def test_fully_masked_rows_give_zero_and_minus_inf():
    q = torch.randn(1, 1, 40, 8, requires_grad=True)
    k = torch.randn(1, 1, 20, 8, requires_grad=True)
    v = torch.randn(1, 1, 20, 8, requires_grad=True)
    pattern = masks.causal(20 - 40)  # bottom-right with Nq > Nk: the first 20 queries see nothing
    out, lse = tiled_attention(q, k, v, plan=masks.block_plan(pattern, 40, 20, block_q=16, block_k=16), mask_mod=pattern)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, :20], torch.zeros_like(q.grad[:, :, :20]))


def test_key_padding_mask_on_the_engine():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 50, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    pad = torch.rand(2, 50, generator=gen) < 0.5
    out, _ = tiled_attention(q, k, v, key_padding_mask=pad, block_q=16, block_k=16)
    ref = _reference(q, k, v, causal=False, causal_alignment="bottom_right", key_padding_mask=pad, bias=None,
                     mask_mod=None, score_mod=None, scale=None, return_lse=False)
    torch.testing.assert_close(out, ref)


def test_plan_from_grid_checks_its_shape():
    with pytest.raises(ValueError, match="grids must be"):
        BlockPlan.from_grid(torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool), 100, 100, 16, 16)
