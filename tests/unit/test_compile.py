"""torch.compile over the functional calls: fullgraph=True compiles, and the compiled call equals eager.

Covers: ``softmax_attention``, ``sliding_window_attention``, ``linear_attention`` and
``attention(q, k, v, "softmax")`` compiled with the default (inductor) backend and
``fullgraph=True`` (any graph break is an error), one compile per function at one small shape
(CPU inductor compiles take seconds each); the finite check skipped while tracing and still on
in eager code; dispatch passing over a backend that declares itself untraceable while compiling
(sliding_window's tiled engine) and taking it again in eager code. Gradients through a compiled
call are a slow test.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")

# B1-H2-N16-D8: the smallest shape where every function takes its ordinary path
SHAPE = (1, 2, 16, 8)

CALLS = {
    "softmax_attention-causal": lambda q, k, v: attnzoo.softmax_attention(q, k, v, causal=True),
    "sliding_window_attention-left4": lambda q, k, v: attnzoo.sliding_window_attention(q, k, v, window=(4, 0)),
    "linear_attention-causal": lambda q, k, v: attnzoo.linear_attention(q, k, v, causal=True),
    "attention-softmax": lambda q, k, v: attnzoo.attention(q, k, v, "softmax"),
}


def _qkv(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(SHAPE, generator=gen).requires_grad_(requires_grad) for _ in range(3))


@pytest.mark.parametrize("name", list(CALLS))
def test_fullgraph_compile_equals_eager(name):
    fn = CALLS[name]
    q, k, v = _qkv()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)  # a graph break raises here
    torch.testing.assert_close(compiled, fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_finite_check_is_skipped_while_tracing_and_kept_in_eager():
    q, k, v = _qkv()
    v = v.clone()
    v[0, 0, 3, 0] = float("nan")
    fn = CALLS["attention-softmax"]
    with pytest.raises(NonFiniteError) as info:
        fn(q, k, v)
    assert info.value.argument == "v"
    torch._dynamo.reset()
    # dynamo alone (backend="eager"): the trace is what matters, not inductor's code
    out = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)
    assert torch.isnan(out).any()  # no check, no host sync: the NaN comes back as computed


def test_dispatch_passes_over_untraceable_backends_only_while_compiling(monkeypatch):
    mech = attnzoo.get("sliding_window")
    q, k, v = _qkv()
    assert not mech.backends["tiled"].traceable and not mech.backends["fused"].traceable
    assert mech.select(mech.describe(q, k, v), mech.bind(mech.describe(q, k, v), {"window": (4, 0)})).name in ("fused", "tiled")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    reasons = dict(mech.explain(q, k, v, window=(4, 0)))
    assert "torch.compile cannot trace it" in reasons["tiled"] and "torch.compile cannot trace it" in reasons["fused"]
    assert reasons["reference"] is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["softmax_attention-causal", "linear_attention-causal"])
def test_compiled_gradients_equal_eager(name):
    fn = CALLS[name]
    q, k, v = _qkv(requires_grad=True)
    torch._dynamo.reset()
    grads = torch.autograd.grad(torch.compile(fn, fullgraph=True)(q, k, v).square().sum(), (q, k, v))
    expected = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
