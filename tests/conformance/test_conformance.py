"""The conformance suite: every registered mechanism x backend x pattern, against its reference.

Nothing here names a mechanism: a new one is covered by registering it (with ``sample_params``
when it has options worth exercising). Test ids read ``mechanism-backend-pattern-dtype-device``.

What is checked, for each fast backend and each pattern the mechanism declares:
1. the forward equals the reference (outputs and LSE), per-dtype tolerances (harness.py);
2. gradients of q, k, v and of every floating tensor parameter (e.g. ``bias``) equal the
   reference's (float32 examples that are ill-conditioned are judged against the float64
   reference: no more than 10x the float32 reference's own error);
3. ``torch.autograd.gradcheck`` of the reference in float64 at tiny sizes;
4. causal patterns: outputs up to position i ignore every query/key/value after it;
5. incremental decoding (where declared) equals the full causal forward, in any split;
6. bad inputs raise the documented error naming the argument (``test_bad_inputs.py``).
Backends that compile (``Backend.compiles``) run at fixed shapes: forward (``test_compiled_backends``)
and backward through the output and the LSE where the device has one (``test_compiled_backends_gradients``:
FlexAttention on CUDA; ``benchmarks/gpu_check.sh`` runs the CUDA cases in one call).
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from attnzoo.registry import PATTERNS

from .harness import (
    DEVICES,
    GRAD_TOL,
    assert_close,
    fast_backends,
    fit_params,
    make_case,
    mechanisms,
    shapes,
    skip_unless_device,
    split_result,
)

DTYPES = (torch.float32, torch.bfloat16)


def _backend_cases(dtypes=DTYPES, *, compiled: bool = False):
    cases = []
    for mech, backend in fast_backends():
        if backend.compiles != compiled:
            continue
        for pattern in PATTERNS:
            if pattern not in mech.patterns:
                continue
            for dtype in dtypes:
                if dtype not in backend.dtypes:
                    continue
                for device in DEVICES:
                    marks = [pytest.mark.gpu] if device == "cuda" else []
                    ident = f"{mech.name}-{backend.name}-{pattern}-{str(dtype).replace('torch.', '')}-{device}"
                    cases.append(pytest.param(mech, backend, pattern, dtype, device, id=ident, marks=marks))
    return cases


def _prepare(mech, backend, pattern, dtype, device, shape, *, grad: bool):
    case = make_case(mech, pattern, shape, dtype, device)
    if grad:
        for t in case.tensors().values():
            t.requires_grad_(True)
    if fit_params(backend, mech, case) is not None:
        reject()
    return case


@pytest.mark.parametrize("mech, backend, pattern, dtype, device", _backend_cases())
@given(data=st.data())
def test_forward_matches_reference(mech, backend, pattern, dtype, device, data):
    skip_unless_device(device)
    case = _prepare(mech, backend, pattern, dtype, device, data.draw(shapes(mech, pattern)), grad=False)
    with torch.no_grad():
        out, lse = split_result(mech(case.q, case.k, case.v, backend=backend.name, **case.params))
        ref, ref_lse = split_result(mech(case.q, case.k, case.v, backend="reference", **case.params))
    assert out.shape == ref.shape and out.dtype == ref.dtype, case.describe()
    assert_close(out, ref, dtype, f"output ({case.describe()})")
    if ref_lse is not None:
        assert lse is not None and lse.shape == ref_lse.shape, case.describe()
        assert_close(lse, ref_lse, torch.float32 if dtype != torch.float64 else dtype, f"lse ({case.describe()})")


def _grad_cases():
    return [p for p in _backend_cases() if p.values[1].autograd]


@pytest.mark.parametrize("mech, backend, pattern, dtype, device", _grad_cases())
@given(data=st.data())
def test_gradients_match_reference(mech, backend, pattern, dtype, device, data):
    skip_unless_device(device)
    if device == "cpu" and backend.accepts is not None:
        probe = make_case(mech, pattern, data.draw(shapes(mech, pattern, max_len=8)), dtype, device)
        probe.q.requires_grad_(True)
        problem = mech.describe(probe.q, probe.k, probe.v)
        reason = backend.decline_reason(problem, mech.bind(problem, mech.example_params(problem, pattern)))
        if reason is not None and "forward only" in reason:
            pytest.skip(f"{backend.name} on {device}: {reason}")
    case = _prepare(mech, backend, pattern, dtype, device, data.draw(shapes(mech, pattern)), grad=True)
    inputs = case.tensors()
    gen = torch.Generator().manual_seed(case.seed + 1)
    outs = {name: split_result(mech(case.q, case.k, case.v, backend=name, **case.params))[0] for name in (backend.name, "reference")}
    weight = torch.randn(outs["reference"].shape, generator=gen).to(outs["reference"]).float()  # one random projection for both
    grads = {
        name: torch.autograd.grad((out.float() * weight).sum(), list(inputs.values()), allow_unused=True) for name, out in outs.items()
    }
    truth = None
    for i, (arg, got, want) in enumerate(zip(inputs, grads[backend.name], grads["reference"])):
        assert (got is None) == (want is None), f"d{arg}: gradient missing on one side ({case.describe()})"
        if want is None:
            continue
        try:
            assert_close(got, want, dtype, f"d{arg} ({case.describe()})", grad=True)
        except AssertionError:
            if dtype != torch.float32:
                raise
            truth = truth if truth is not None else _float64_reference_grads(mech, case, weight)
            _assert_as_accurate_as_reference(got, want, truth[i], f"d{arg} ({case.describe()})")


# An ill-conditioned example (a norm of a near-constant vector: its gradient is a difference of
# near-equal terms) amplifies float32 rounding in the reference as much as in the backend, so two
# float32 results can differ beyond any fixed tolerance while both are as right as float32 allows.
# Then the float64 reference is the truth, and the backend may be at most ACCURACY_FACTOR times
# further from it than the float32 reference is (plus the usual tolerance).
ACCURACY_FACTOR = 10.0


def _float64_reference_grads(mech, case, weight):
    inputs = {n: t.detach().double().requires_grad_() for n, t in case.tensors().items()}
    params = {**case.params, **{n: inputs[n] for n in inputs if n in case.params}}
    out = split_result(mech(inputs["q"], inputs["k"], inputs["v"], backend="reference", **params))[0]
    return torch.autograd.grad((out * weight.double()).sum(), list(inputs.values()), allow_unused=True)


def _assert_as_accurate_as_reference(got, want, truth, what):
    atol, rtol = GRAD_TOL[torch.float32]
    truth = truth.double()
    error = float((got.double() - truth).abs().max())
    own = float((want.double() - truth).abs().max())  # the float32 reference's own rounding error
    bound = ACCURACY_FACTOR * own + atol + rtol * float(truth.abs().max())
    assert error <= bound, f"{what}: error against float64 {error:.3g} > {ACCURACY_FACTOR} x the float32 reference's {own:.3g} + tolerance"


@pytest.mark.parametrize(
    "mech, pattern",
    [pytest.param(m, p, id=f"{m.name}-{p}") for m in mechanisms() for p in PATTERNS if p in m.patterns],
)
@pytest.mark.parametrize("seed", range(3))
def test_reference_gradcheck(mech, pattern, seed):
    rng = random.Random(seed)
    kv_heads = 1 + rng.randrange(2)
    n_q = rng.randrange(1, 6)
    shape = dict(
        batch=1 + rng.randrange(2),
        q_heads=kv_heads * (1 + rng.randrange(2) if mech.gqa else 1),
        kv_heads=kv_heads,
        q_sizes=(n_q,) * mech.spatial_dims[0] if mech.spatial_dims[0] == 1 else (2,) * mech.spatial_dims[0],
        kv_sizes=((rng.randrange(1, 7),) if pattern.endswith("cross") else (n_q,)) if mech.spatial_dims[0] == 1 else (2,) * mech.spatial_dims[0],
        head_dim=4,
        value_dim=3,
        seed=seed,
    )
    case = make_case(mech, pattern, shape, torch.float64, "cpu")
    inputs = case.tensors()
    names = list(inputs)

    def fn(*tensors):
        kw = dict(case.params)
        kw.update({n: t for n, t in zip(names[3:], tensors[3:])})
        out, _ = split_result(mech(*tensors[:3], backend="reference", **kw))
        return out

    leaves = tuple(t.detach().requires_grad_(True) for t in inputs.values())
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6), case.describe()


def _causal_cases():
    return [p for p in _backend_cases((torch.float32,)) + _reference_cases() if p.values[2].startswith("causal")]


def _reference_cases():
    return [
        pytest.param(m, m.reference, p, torch.float32, "cpu", id=f"{m.name}-reference-{p}-float32-cpu")
        for m in mechanisms()
        for p in PATTERNS
        if p in m.patterns
    ]


@pytest.mark.parametrize("mech, backend, pattern, dtype, device", _causal_cases())
@given(data=st.data(), cut=st.floats(0, 1))
def test_causal_outputs_ignore_the_future(mech, backend, pattern, dtype, device, data, cut):
    skip_unless_device(device)
    case = _prepare(mech, backend, pattern, dtype, device, data.draw(shapes(mech, pattern)), grad=False)
    nq, nk = case.q.shape[2], case.k.shape[2]
    offset = nk - nq if case.params.get("causal_alignment", "bottom_right") == "bottom_right" else 0
    last = int(cut * (nq - 1))  # outputs 0..last must not see what comes after
    if mech.causal_block is not None:  # block-causal selection: the future starts after the cut's block
        block = mech.causal_block(mech.bind(mech.describe(case.q, case.k, case.v), case.params))
        last = min(nq, -(-(last + 1) // block) * block) - 1
    gen = torch.Generator().manual_seed(case.seed + 7)

    def perturbed(t, first):
        t = t.clone()
        if first < t.shape[2]:
            t[:, :, max(first, 0) :] = torch.randn(t[:, :, max(first, 0) :].shape, generator=gen).to(t) * 3
        return t

    q2 = perturbed(case.q, last + 1)
    k2, v2 = perturbed(case.k, last + offset + 1), perturbed(case.v, last + offset + 1)
    with torch.no_grad():
        out, _ = split_result(mech(case.q, case.k, case.v, backend=backend.name, **case.params))
        out2, _ = split_result(mech(q2, k2, v2, backend=backend.name, **case.params))
    torch.testing.assert_close(out2[:, :, : last + 1], out[:, :, : last + 1], atol=1e-5, rtol=1e-5, msg=lambda m: f"{m} ({case.describe()}, future after {last})")


@pytest.mark.parametrize("mech", [pytest.param(m, id=m.name) for m in mechanisms() if m.decoder is not None])
@given(data=st.data(), splits=st.lists(st.integers(1, 5), min_size=1, max_size=30))
@settings(max_examples=15)
def test_incremental_decoding_matches_full_forward(mech, data, splits):
    shape = data.draw(shapes(mech, "causal_self", max_len=40))
    case = make_case(mech, "causal_self", shape, torch.float32, "cpu")
    n = case.q.shape[2]
    params = mech.example_params(mech.describe(case.q, case.k, case.v), "causal_self")  # the plain ones
    with torch.no_grad():
        full = mech(case.q, case.k, case.v, **params)
        state = mech.init_state(case.q, case.k, case.v, **params)
        outs, start = [], 0
        for size in splits + [n]:  # the last chunk takes whatever is left
            stop = min(n, start + size)
            if stop == start:
                break
            out, state = mech.step(case.q[:, :, start:stop], case.k[:, :, start:stop], case.v[:, :, start:stop], state, **params)
            outs.append(split_result(out)[0])
            start = stop
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("mech, backend, pattern, dtype, device", _backend_cases((torch.float32,), compiled=True))
def test_compiled_backends(mech, backend, pattern, dtype, device):
    """Backends that compile per shape (FlexAttention) at one fixed shape per pattern."""
    skip_unless_device(device)
    if pattern != "noncausal_self" and device == "cpu":
        pytest.skip("each pattern costs a CPU compile; run with -m slow via test_compiled_backends_all_patterns")
    _check_compiled(mech, backend, pattern, dtype, device)


@pytest.mark.slow
@pytest.mark.parametrize("mech, backend, pattern, dtype, device", _backend_cases((torch.float32, torch.bfloat16), compiled=True))
def test_compiled_backends_all_patterns(mech, backend, pattern, dtype, device):
    skip_unless_device(device)
    _check_compiled(mech, backend, pattern, dtype, device)


def _compiled_shape(mech, pattern):
    """The one fixed shape per pattern of the compiled-backend tests (a compile per shape)."""
    spatial = mech.spatial_dims[0]
    return dict(batch=2, q_heads=4, kv_heads=2 if mech.gqa else 4, q_sizes=(200,) if spatial == 1 else (8,) * spatial,
                kv_sizes=((136,) if pattern.endswith("cross") else (200,)) if spatial == 1 else (8,) * spatial,
                head_dim=64, value_dim=64, seed=0)


def _check_compiled(mech, backend, pattern, dtype, device):
    case = make_case(mech, pattern, _compiled_shape(mech, pattern), dtype, device)
    reason = fit_params(backend, mech, case)
    assert reason is None, reason
    with torch.no_grad():
        out, _ = split_result(mech(case.q, case.k, case.v, backend=backend.name, **case.params))
        ref, _ = split_result(mech(case.q, case.k, case.v, backend="reference", **case.params))
    assert_close(out, ref, dtype, f"output ({case.describe()})")


def _compiled_grad_cases():
    return [p for p in _backend_cases((torch.float32,), compiled=True) if p.values[1].autograd]


@pytest.mark.parametrize("mech, backend, pattern, dtype, device", _compiled_grad_cases())
def test_compiled_backends_gradients(mech, backend, pattern, dtype, device):
    """The backward of backends that compile per shape (FlexAttention on CUDA; forward only on CPU),
    at the fixed shape: gradients of q, k, v and of every floating tensor parameter (a bias, an rpb
    table) equal the reference's, through the output and, where the mechanism returns one, the LSE."""
    skip_unless_device(device)
    case = make_case(mech, pattern, _compiled_shape(mech, pattern), dtype, device)
    if any(p.name == "return_lse" for p in mech.params):
        case.params["return_lse"] = True  # the LSE's gradient too
    for t in case.tensors().values():
        t.requires_grad_(True)
    problem = mech.describe(case.q, case.k, case.v)
    reason = backend.decline_reason(problem, mech.bind(problem, case.params))
    if reason is not None and "forward only" in reason:
        pytest.skip(f"{backend.name} on {device}: {reason}")
    reason = fit_params(backend, mech, case)
    assert reason is None, reason
    inputs = case.tensors()
    gen = torch.Generator().manual_seed(1)
    grads, weights = {}, None
    for name in (backend.name, "reference"):
        out, lse = split_result(mech(case.q, case.k, case.v, backend=name, **case.params))
        if weights is None:  # one random projection of out and lse for both
            weights = (torch.randn(out.shape, generator=gen).to(out.device), None if lse is None else torch.randn(lse.shape, generator=gen).to(lse.device))
        loss = (out.float() * weights[0]).sum()
        if lse is not None:  # a query with no visible key has lse = -inf and no gradient
            loss = loss + torch.where(torch.isfinite(lse), lse.float() * weights[1], 0.0).sum()
        grads[name] = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    for arg, got, want in zip(inputs, grads[backend.name], grads["reference"]):
        assert (got is None) == (want is None), f"d{arg}: gradient missing on one side ({case.describe()})"
        if want is not None:
            assert_close(got, want, dtype, f"d{arg} ({case.describe()})", grad=True)
