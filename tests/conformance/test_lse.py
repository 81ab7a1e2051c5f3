"""The log-sum-exp a backend returns is differentiable, with the reference's gradients.

Merging partial attention through the LSE (``merge_attention_states``: split keys, ring
attention, prefix tokens merged into a local pattern) backpropagates through it, so an LSE
marked non-differentiable gives silently wrong gradients. For every mechanism with a
``return_lse`` parameter, every fast backend, each self pattern, its plain parameters and a few
random options (learnable tensors such as a position-bias table included): the gradients of
``sum(w_o * out) + sum(w_l * lse)`` with respect to q, k, v and every floating tensor parameter
equal the reference's (float64, or float32 where the backend takes only that).
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from attnzoo.errors import NoBackendError

from .harness import Case, fast_backends, fit_params

PATTERNS = ("noncausal_self", "causal_self")
SEEDS = (None, *range(1, 9))  # None: the plain parameters; the seeds switch options on (rpb, padding...)
TOLERANCE = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-4, 1e-3)}


def _cases():
    cases = []
    for mech, backend in fast_backends():
        if backend.compiles or not any(p.name == "return_lse" for p in mech.params):
            continue
        for pattern in PATTERNS:
            if pattern in mech.patterns and 1 in mech.spatial_dims:
                for seed in SEEDS:
                    ident = f"{mech.name}-{backend.name}-{pattern}-{'plain' if seed is None else seed}"
                    cases.append(pytest.param(mech, backend, pattern, seed, id=ident))
    return cases


def _case(mech, pattern, seed, dtype) -> Case:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mech.name}-{pattern}-{seed}".encode()))
    q, k, v = (torch.randn(2, 2, 37, 16, generator=gen, dtype=dtype) for _ in range(3))
    rng = None if seed is None else random.Random(seed)
    params = mech.example_params(mech.describe(q, k, v), pattern, rng)
    params = {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in params.items()}
    params.pop("return_lse", None)
    return Case(q, k, v, params, 0 if seed is None else seed)


def _grads(mech, backend: str, case: Case, w_out, w_lse):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in case.tensors().items()}
    params = {**case.params, **{n: t for n, t in leaves.items() if n in case.params}}
    out, lse = mech(leaves["q"], leaves["k"], leaves["v"], backend=backend, return_lse=True, **params)
    assert lse.requires_grad, f"{mech.name}/{backend}: the LSE carries no gradient"
    finite = torch.isfinite(lse)  # a query with no visible key: lse = -inf, no gradient
    loss = (out * w_out).sum() + torch.where(finite, lse * w_lse, 0.0).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}


@pytest.mark.parametrize("mech, backend, pattern, seed", _cases())
def test_lse_gradients_match_reference(mech, backend, pattern, seed):
    reason = ""
    for dtype in TOLERANCE:  # float64 where the backend takes it, else float32
        case = _case(mech, pattern, seed, dtype)
        reason = fit_params(backend, mech, case)
        if reason is None:
            break
    else:
        pytest.skip(f"the backend declines these inputs: {reason}")
    gen = torch.Generator().manual_seed(7)
    w_out = torch.randn(2, 2, 37, case.v.shape[-1], generator=gen, dtype=dtype)
    w_lse = torch.randn(2, 2, 37, generator=gen, dtype=dtype)
    try:
        got = _grads(mech, backend.name, case, w_out, w_lse)
    except NoBackendError as err:
        pytest.skip(f"the backend declines these inputs: {err}")
    want = _grads(mech, "reference", case, w_out, w_lse)
    atol, rtol = TOLERANCE[dtype]
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m: f"d{name} ({dtype}, {case.describe()}): {m}")
