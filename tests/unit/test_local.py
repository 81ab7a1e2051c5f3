"""sliding_window (L2): what the registry-driven suite does not already cover."""

from __future__ import annotations

import math

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


def test_dispatch_takes_the_block_sparse_kernel_where_it_is_built():
    q, k, v = qkv(n=256)
    for params in (dict(window=(64, 0), causal=True), dict(window=(8, 0), causal=True), dict(window=(3, 9), sinks=4)):
        assert next(name for name, reason in SW.explain(q, k, v, **params) if reason is None) == "fused", params


def test_without_the_block_sparse_kernel_long_causal_windows_go_to_the_band_and_short_ones_to_tiled(monkeypatch):
    from attnzoo.kernels import block_sparse

    monkeypatch.setattr(block_sparse, "native_usable", lambda device, dtype: False)
    q, k, v = qkv(n=256)

    def chosen(**params):
        return next(name for name, reason in SW.explain(q, k, v, **params) if reason is None)

    assert chosen(window=(64, 0), causal=True) == "band"
    assert chosen(window=(8, 0), causal=True) == "tiled"
    assert chosen(window=(64, 0), causal=True, sinks=4) == "tiled"


# --------------------------------------------------------------------------------------------
# key_padding_mask across the local family (True = ignore the key)
# --------------------------------------------------------------------------------------------
from attnzoo.errors import NoBackendError  # noqa: E402

from .padding import N as PAD_N, assert_padded_equals_alone, padding  # noqa: E402
from .qkv import random_qkv  # noqa: E402

SIDES = ("right", "left")
#: Mechanisms that refuse padding on 1D sequences (their partitions are placed by N).
REFUSE_1D = ("window", "grid", "halo", "varying_window")


def _local_family() -> list[str]:
    return sorted(m.name for m in attnzoo.list_mechanisms() if m.family == "local")


def _plain(name: str, q, k, v, pattern: str = "noncausal_self") -> dict:
    mech = attnzoo.get(name)
    return mech.example_params(mech.describe(q, k, v), pattern)


def test_the_local_family_is_all_here():
    assert set(_local_family()) >= {"sliding_window", "neighborhood", "axial", "window", "grid", "halo", "per_head_patterns", "varying_window"}


@pytest.mark.parametrize("name", _local_family())
def test_every_local_mechanism_declares_the_shared_parameter(name):
    param = next((p for p in attnzoo.get(name).params if p.name == "key_padding_mask"), None)
    assert param is not None and param.default is None
    assert "True = ignore" in param.doc
    assert param.check.__qualname__ == "key_padding_param.<locals>.check", "one validator for the family (_shared.py)"


BAD_MASKS = [
    pytest.param(lambda b, shape: torch.zeros(b, *shape), id="float"),
    pytest.param(lambda b, shape: torch.zeros(b, *shape, dtype=torch.int64), id="int"),
    pytest.param(lambda b, shape: torch.zeros(b, math.prod(shape) + 1, dtype=torch.bool), id="too-long"),
    pytest.param(lambda b, shape: torch.zeros(b + 1, math.prod(shape), dtype=torch.bool), id="batch"),
    pytest.param(lambda b, shape: torch.zeros(b, 1, 1, math.prod(shape), dtype=torch.bool), id="4d"),
    pytest.param(lambda b, shape: torch.zeros(b, *reversed(shape), 1, dtype=torch.bool), id="grid-plus-axis"),
    pytest.param(lambda b, shape: [[False] * math.prod(shape)] * b, id="list"),
]


@pytest.mark.parametrize("make", BAD_MASKS)
@pytest.mark.parametrize("name", _local_family())
def test_bad_masks_are_refused_naming_the_argument(name, make):
    q, k, v, _, _ = _case(name)
    shape = tuple(q.shape[2:-1])
    with pytest.raises(ParameterError, match="key_padding_mask") as info:
        attnzoo.get(name)(q, k, v, key_padding_mask=make(q.shape[0], shape), **_plain(name, q, k, v))
    assert info.value.argument == "key_padding_mask"


@pytest.mark.parametrize("name", REFUSE_1D)
def test_1d_padding_is_refused_where_partitions_depend_on_n_and_the_reason_is_given(name):
    q, k, v = random_qkv(b=3, nq=PAD_N, nk=PAD_N)
    with pytest.raises(ParameterError, match="None on 1D sequences: .{60,}") as info:
        attnzoo.get(name)(q, k, v, key_padding_mask=padding("right"), **_plain(name, q, k, v))
    assert info.value.argument == "key_padding_mask"


def _case(name: str, seed: int = 0):
    """(4, 6) grids (24 tokens for 1D-only mechanisms) in float64 and their plain parameters;
    the mask has an entry with scattered pads, one fully padded, one unpadded."""
    shape = (4, 6) if 2 in attnzoo.get(name).spatial_dims else (24,)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 2, *shape, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    pad = torch.rand(3, *shape, generator=gen) < 0.4
    pad[1] = True
    pad[2] = False
    return q, k, v, pad, _plain(name, q, k, v)


def _backends(name: str) -> list[str]:
    return [b for b in attnzoo.get(name).backends if b not in ("reference", "flex")]


@pytest.mark.parametrize("name", _local_family())
def test_padding_on_every_backend_equals_the_reference_outputs_and_gradients(name):
    q, k, v, pad, params = _case(name)
    mech = attnzoo.get(name)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = mech(*ref_in, key_padding_mask=pad, backend="reference", **params)
    weight = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in)
    checked = 0
    for backend in _backends(name):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        try:
            out = mech(*leaves, key_padding_mask=pad.flatten(1), backend=backend, **params)  # the flat form too
        except NoBackendError as err:
            assert "key_padding_mask" in str(err) or "float64" in str(err), err
            continue
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8, msg=lambda m: f"{backend}: {m}")
        for got, want in zip(torch.autograd.grad((out * weight).sum(), leaves), ref_grads):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8, msg=lambda m: f"{backend} gradient: {m}")
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", _local_family())
def test_a_fully_padded_entry_gives_zeros_and_finite_gradients_and_pads_weigh_nothing(name):
    q, k, v, pad, params = _case(name, seed=1)
    mech = attnzoo.get(name)
    for backend in ["reference"] + _backends(name):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        try:
            out = mech(*leaves, key_padding_mask=pad, backend=backend, **params)
        except NoBackendError:
            continue
        assert torch.all(out[1] == 0), f"{backend}: an entry without keys must output 0"
        grads = torch.autograd.grad(out.square().sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads), backend
        assert torch.all(grads[1][1] == 0) and torch.all(grads[2][1] == 0), backend
        # the values at the pads never reach the output
        v2 = v.clone()
        v2[0][:, pad[0]] = 1e6
        k2 = k.clone()
        k2[0][:, pad[0]] = -1e3
        torch.testing.assert_close(mech(q, k2, v2, key_padding_mask=pad, backend=backend, **params), out.detach(), msg=backend)


# ---- sliding_window: padded batch == each sequence alone
@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(
    "params",
    [dict(window=(3, 0), causal=True), dict(window=(2, 3)), dict(window=(4, 0), causal=True, sinks=2), dict(window=(None, 1), sinks=1)],
    ids=["causal", "two-sided", "causal-sinks", "unbounded-left-sinks"],
)
def test_sliding_window_padded_batch_equals_each_sequence_alone(params, side, backend):
    q, k, v = random_qkv(b=3, nq=PAD_N, nk=PAD_N, kv_heads=1)
    assert_padded_equals_alone(lambda *t, **kw: SW(*t, backend=backend, **params, **kw), q, k, v, side)


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_cross_attention_aligns_to_each_sequences_real_keys(causal, side, alignment):
    q, k, v = random_qkv(b=3, nq=5, nk=PAD_N)
    params = dict(window=(2, 0 if causal else 1), causal=causal, sinks=1, causal_alignment=alignment)
    assert_padded_equals_alone(lambda *t, **kw: SW(*t, backend="tiled", **params, **kw), q, k, v, side, cross=True)


def test_sliding_window_padding_inside_a_sequence_is_masked_where_it_stands():
    q, k, v = random_qkv(b=1, nq=PAD_N, nk=PAD_N)
    pad = torch.zeros(1, PAD_N, dtype=torch.bool)
    pad[0, 5:7] = True
    out = SW(q, k, v, window=(3, 3), key_padding_mask=pad)
    allowed = masks.dense_mask(_pattern(PAD_N, PAD_N, (3, 3), False, 0, "bottom_right"), PAD_N, PAD_N) & ~pad.view(1, 1, 1, -1)
    want = attnzoo.get("softmax")(q, k, v, mask_mod=lambda b, h, i, j: allowed[0, 0, i, j])
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)


def test_the_band_kernel_declines_padding_and_dispatch_goes_elsewhere():
    q, k, v = qkv(n=80)
    pad = torch.zeros(2, 80, dtype=torch.bool)
    pad[1, 60:] = True
    params = dict(window=(40, 0), causal=True)
    with pytest.raises(NoBackendError, match="key_padding_mask"):
        SW(q, k, v, key_padding_mask=pad, backend="band", **params)
    assert SW.select(SW.describe(q, k, v), SW.bind(SW.describe(q, k, v), dict(params, key_padding_mask=pad))).name != "band"
    torch.testing.assert_close(SW(q, k, v, key_padding_mask=pad, **params), SW(q, k, v, key_padding_mask=pad, backend="reference", **params), atol=2e-6, rtol=1e-5)
