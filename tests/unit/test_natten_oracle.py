"""neighborhood against NATTEN itself (an external oracle), where NATTEN is importable.

NATTEN is not a dependency (CI does not install it): the module is skipped when it cannot be
imported. To run it: ``pip install --no-build-isolation natten==0.21.7`` after torch. On CPU
NATTEN's functional API runs FlexAttention eagerly (its ``flex-fna`` backend), forward only
(FlexAttention has no CPU backward), so outputs and LSE are compared, not gradients. NATTEN's
layout is heads-last, ``(B, *spatial, H, D)``; attnzoo's is ``(B, H, *spatial, D)``.

What NATTEN cannot take is left out of the cases: kernel size 1 (it asks for >= 2), rpb (dropped
after 0.17; :mod:`tests.unit.test_neighborhood` checks rpb against NATTEN's own rule), and a 1D
causal kernel spanning the whole axis (NATTEN turns it into causal FMHA, which has no CPU backend;
it is plain causal attention, checked against ``sliding_window`` there).
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

natten_functional = pytest.importorskip("natten.functional", reason="NATTEN is not importable (an optional oracle)", exc_type=ImportError)

import attnzoo  # noqa: E402

# FlexAttention warns that it runs eagerly (uncompiled) on every NATTEN call on CPU
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def natten_attention(q, k, v, *, kernel_size, dilation, stride, causal):
    """NATTEN's neighborhood attention on attnzoo's layout: ``(out, lse)`` as (B, H, *spatial, .)."""
    heads_last = [t.movedim(1, -2).contiguous() for t in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = natten_functional.neighborhood_attention_generic(
            *heads_last,
            kernel_size=kernel_size,
            dilation=dilation,
            stride=stride,
            is_causal=causal,
            return_lse=True,
            attention_kwargs={"backend": "flex-fmha"},  # a window as large as the input is dense attention
        )
    return out.movedim(-2, 1), lse.movedim(-1, 1)


def check_against_natten(shape, kernel_size, dilation=1, stride=1, causal=False, *, heads=(2, 2), head_dim=16, seed=0):
    n = len(shape)
    per_axis = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * n  # noqa: E731
    kw = dict(kernel_size=per_axis(kernel_size), dilation=per_axis(dilation), stride=per_axis(stride), causal=per_axis(causal))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], *shape, head_dim, generator=gen)
    k, v = (torch.randn(2, heads[1], *shape, head_dim, generator=gen) for _ in range(2))
    want, want_lse = natten_attention(q, k, v, **kw)
    for backend in ("reference", "tiled"):
        out, lse = attnzoo.neighborhood_attention(q, k, v, backend=backend, return_lse=True, **kw)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-4, msg=lambda m, b=backend: f"{b} output vs NATTEN, {shape} {kw}: {m}")
        torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-4, msg=lambda m, b=backend: f"{b} lse vs NATTEN, {shape} {kw}: {m}")


CASES = [
    # 1D: odd and even kernels, dilation, stride (incl. blocked: stride == kernel), causal
    ("1d-k5", (23,), dict(kernel_size=5)),
    ("1d-k4-even", (17,), dict(kernel_size=4)),
    ("1d-k3-d4", (19,), dict(kernel_size=3, dilation=4)),
    ("1d-k6-d2-s4", (29,), dict(kernel_size=6, dilation=2, stride=4)),
    ("1d-k5-s5-blocked", (22,), dict(kernel_size=5, stride=5)),
    ("1d-k4-causal", (15,), dict(kernel_size=4, causal=True)),
    ("1d-k5-d2-s3-causal", (26,), dict(kernel_size=5, dilation=2, stride=3, causal=True)),
    # 2D: per-axis everything, causal on one axis or both
    ("2d-k3x5", (9, 11), dict(kernel_size=(3, 5))),
    ("2d-k4x2-d2x3", (10, 9), dict(kernel_size=(4, 2), dilation=(2, 3))),
    ("2d-k5x4-s2x4", (12, 13), dict(kernel_size=(5, 4), stride=(2, 4))),
    ("2d-k3-causal-rows", (8, 9), dict(kernel_size=3, causal=(True, False))),
    ("2d-k4x3-d2x1-s3x2-causal-cols", (11, 10), dict(kernel_size=(4, 3), dilation=(2, 1), stride=(3, 2), causal=(False, True))),
    ("2d-k3x4-s3-causal-both", (9, 12), dict(kernel_size=(3, 4), stride=3, causal=True)),
    ("2d-full-rows", (5, 9), dict(kernel_size=(5, 3))),
    # 3D
    ("3d-k3", (5, 6, 7), dict(kernel_size=3)),
    ("3d-k2x3x4-d2x1x1-s2x3x1", (6, 5, 7), dict(kernel_size=(2, 3, 4), dilation=(2, 1, 1), stride=(2, 3, 1))),
    ("3d-k3x2x3-causal-t-s3x1x2", (7, 4, 6), dict(kernel_size=(3, 2, 3), stride=(3, 1, 2), causal=(True, False, False))),
]


@pytest.mark.parametrize("shape, kw", [pytest.param(shape, kw, id=name) for name, shape, kw in CASES])
def test_matches_natten(shape, kw):
    check_against_natten(shape, **kw)


def test_matches_natten_with_grouped_query_heads():
    check_against_natten((9, 10), kernel_size=(3, 4), dilation=(2, 1), stride=(2, 3), causal=(True, False), heads=(4, 2))


def random_case(rng: random.Random):
    """A configuration NATTEN accepts: kernel >= 2 with kernel * dilation <= size, 1 <= stride <= kernel."""
    n = rng.choice((1, 2, 3))
    while True:
        shape = tuple(rng.randint(2, {1: 40, 2: 12, 3: 6}[n]) for _ in range(n))
        dilation = tuple(rng.randint(1, size // 2) for size in shape)
        kernel = tuple(rng.randint(2, size // d) for size, d in zip(shape, dilation))
        stride = tuple(rng.randint(1, k) for k in kernel)
        causal = tuple(rng.random() < 0.35 for _ in shape)
        if not (n == 1 and kernel[0] == shape[0] and causal[0]):
            return shape, dict(kernel_size=kernel, dilation=dilation, stride=stride, causal=causal)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(60))
def test_matches_natten_on_random_configurations(seed):
    shape, kw = random_case(random.Random(seed))
    check_against_natten(shape, **kw, seed=seed, heads=(2, 1 + seed % 2))  # MQA on odd seeds
