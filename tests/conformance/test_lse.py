"""The log-sum-exp a backend returns is differentiable, with the reference's gradients.

Merging partial attention through the LSE (``merge_attention_states``: split keys, ring
attention, prefix tokens merged into a local pattern) backpropagates through it, so an LSE
marked non-differentiable gives silently wrong gradients. For every mechanism with a
``return_lse`` parameter, every fast backend, and each self pattern: the gradients of
``sum(w_o * out) + sum(w_l * lse)`` equal the reference's (float64, or float32 where the
backend takes only that).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from attnzoo.errors import NoBackendError

from .harness import fast_backends

PATTERNS = ("noncausal_self", "causal_self")


def _cases():
    cases = []
    for mech, backend in fast_backends():
        if backend.compiles or not any(p.name == "return_lse" for p in mech.params):
            continue
        for pattern in PATTERNS:
            if pattern in mech.patterns and 1 in mech.spatial_dims:
                cases.append(pytest.param(mech, backend.name, pattern, id=f"{mech.name}-{backend.name}-{pattern}"))
    return cases


def _loss_grads(mech, backend, q, k, v, params, w_out, w_lse):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = mech(*leaves, backend=backend, return_lse=True, **params)
    assert lse.requires_grad, f"{mech.name}/{backend}: the LSE carries no gradient"
    finite = torch.isfinite(lse)  # a query with no visible key: lse = -inf, no gradient
    loss = (out * w_out).sum() + torch.where(finite, lse * w_lse, 0.0).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


TOLERANCE = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-4, 1e-3)}


@pytest.mark.parametrize("mech, backend, pattern", _cases())
def test_lse_gradients_match_reference(mech, backend, pattern):
    for dtype in TOLERANCE:  # float64 where the backend takes it, else float32
        gen = torch.Generator().manual_seed(zlib.crc32(f"{mech.name}-{pattern}".encode()))
        q, k, v, w_out = (torch.randn(2, 2, 37, 16, generator=gen, dtype=dtype) for _ in range(4))
        w_lse = torch.randn(2, 2, 37, generator=gen, dtype=dtype)
        params = mech.example_params(mech.describe(q, k, v), pattern)
        try:
            got = _loss_grads(mech, backend, q, k, v, params, w_out, w_lse)
            break
        except NoBackendError as err:
            reason = str(err)
    else:
        pytest.skip(f"the backend declines these inputs: {reason}")
    want = _loss_grads(mech, "reference", q, k, v, params, w_out, w_lse)
    atol, rtol = TOLERANCE[dtype]
    for name, g, r, x in zip("qkv", got, want, (q, k, v)):
        g = torch.zeros_like(x) if g is None else g
        r = torch.zeros_like(x) if r is None else r
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"d{name} ({dtype}): {m}")
