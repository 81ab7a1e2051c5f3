"""sliding_window (L2): what the registry-driven suite does not already cover."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.errors import ParameterError
from attnzoo.functional.local.sliding_window import _pattern

SW = attnzoo.get("sliding_window")


def qkv(n=60, b=2, h=2, d=16, seed=0, nk=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h, nk or n, d, generator=gen)
    v = torch.randn(b, h, nk or n, d, generator=gen)
    return q, k, v


@pytest.mark.parametrize("left, sinks", [(5, 0), (5, 3), (0, 2), (17, 4), (None, 0)])
def test_decoding_with_sinks_keeps_a_bounded_cache_and_equals_the_full_forward(left, sinks):
    q, k, v = qkv(n=50)
    params = dict(window=(left, 0), causal=True, sinks=sinks)
    full = SW(q, k, v, **params)
    state = SW.init_state(q, k, v, **params)
    outs, start = [], 0
    for size in (1, 3, 1, 7, 2, 40):
        stop = min(50, start + size)
        out, state = SW.step(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, **params)
        outs.append(out)
        start = stop
        if left is not None:  # StreamingLLM: only the sinks and the last `left` keys are kept
            assert state.k.shape[2] <= sinks + left
    torch.testing.assert_close(torch.cat(outs, dim=2), full)


def test_decoding_needs_causal():
    q, k, v = qkv(n=4)
    state = SW.init_state(q, k, v, window=3)
    with pytest.raises(ParameterError, match="causal"):
        SW.step(q, k, v, state, window=3)


def test_window_argument_forms():
    q, k, v = qkv()
    # an int is both sides, or the left side under causal
    torch.testing.assert_close(SW(q, k, v, window=4), SW(q, k, v, window=(4, 4)))
    torch.testing.assert_close(SW(q, k, v, window=4, causal=True), SW(q, k, v, window=(4, 0), causal=True))
    with pytest.raises(ParameterError, match="right extent must be 0 with causal=True") as info:
        SW(q, k, v, window=(4, 2), causal=True)
    assert info.value.argument == "window"
    with pytest.raises(ParameterError, match="window: expected"):
        SW(q, k, v)  # the window is required


@pytest.mark.parametrize("causal", [False, True])
def test_equals_softmax_with_the_same_mask_mod(causal):
    q, k, v = qkv(n=40, nk=70)
    offset = 70 - 40  # bottom-right: query i sits at key position i + 30
    sink = masks.sinks(2) & masks.causal(offset) if causal else masks.sinks(2)
    mask = masks.sliding_window(6, 0 if causal else 3, offset=offset) | sink
    out = SW(q, k, v, window=(6, 0 if causal else 3), causal=causal, sinks=2)
    torch.testing.assert_close(out, attnzoo.softmax_attention(q, k, v, mask_mod=mask, backend="reference"))


def test_tiled_visits_only_the_window_tiles():
    n = 16384
    plan = masks.plan_for(_pattern(n, n, (256, 0), True, 4, "bottom_right"), n, n)
    # 128 query tiles, each visiting its diagonal tile, 2 tiles to the left and the sink tile
    assert plan.pairs <= 128 * 4
    assert plan.density < 0.04
    assert max(s.n_active for s in plan.slots) <= 16  # bounded temporaries whatever N is


@pytest.mark.parametrize("n, left, kv_heads", [(300, 64, 2), (257, 32, 1), (40, 64, 2), (128, 128, 2)])
def test_band_backend_over_many_chunks_matches_the_reference_with_gradients(n, left, kv_heads):
    # chunks of `left` tokens: several full chunks, a padded last one, and a window wider than N
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, 4, n, 32, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, n, 32, generator=gen, requires_grad=True) for _ in range(2))
    params = dict(window=(left, 0), causal=True, return_lse=True)
    (out, lse), (ref, ref_lse) = SW(q, k, v, backend="band", **params), SW(q, k, v, backend="reference", **params)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-4)
    grad = torch.randn(out.shape, generator=gen)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"d{name}: {m}")


def test_dispatch_sends_long_causal_windows_to_the_band_and_short_ones_to_tiled():
    q, k, v = qkv(n=256)

    def chosen(**params):
        return next(name for name, reason in SW.explain(q, k, v, **params) if reason is None)

    assert chosen(window=(64, 0), causal=True) == "band"
    assert chosen(window=(8, 0), causal=True) == "tiled"
    assert chosen(window=(64, 0), causal=True, sinks=4) == "tiled"
