"""What the conformance suite needs to exercise any registered mechanism.

Shapes come from hypothesis (odd lengths, N=1, Nq != Nk, head dims 8..128, GQA); parameters
come from the mechanism's own ``sample_params`` so every option gets exercised; tolerances
are per dtype and stated here once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.registry import Backend, Mechanism

DEVICES = ["cpu", "cuda"]
HEAD_DIMS = (8, 12, 16, 32, 64, 80, 128)

# Forward tolerances (atol, rtol) of a fast backend against the reference on the same inputs.
# The reference computes in float32 (float64 for float64), so bf16 differences are a few ulps
# of bf16 (2^-8 relative).
FORWARD_TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
# Gradients sum over the sequence, so they get a wider band; bf16 gradients are compared by
# relative RMS error (as flash-linear-attention does), which a few rounding outliers cannot fail.
GRAD_TOL = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 1e-2),
}
# (relative, absolute): pass when rms(error) <= relative * rms(reference) + absolute; the
# absolute floor (a quarter of a bf16 ulp at 1) keeps gradients that are exactly zero in exact
# arithmetic (N = 1: dk = 0) from comparing float32 noise against noise.
GRAD_RMS_TOL = {torch.bfloat16: (2e-2, 1e-3)}


def mechanisms() -> list[Mechanism]:
    return attnzoo.list_mechanisms()


def fast_backends() -> list[tuple[Mechanism, Backend]]:
    return [(m, b) for m in mechanisms() for b in m.backends.values() if b.name != "reference"]


def skip_unless_device(device: str) -> None:
    import pytest

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@dataclass
class Case:
    """Inputs and parameters of one conformance example."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    params: dict[str, Any]
    seed: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """q, k, v and every floating tensor parameter (the differentiable inputs)."""
        out = {"q": self.q, "k": self.k, "v": self.v}
        out.update({n: t for n, t in self.params.items() if isinstance(t, torch.Tensor) and t.is_floating_point()})
        return out

    def describe(self) -> str:
        opts = {n: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for n, v in self.params.items()}
        return f"q{tuple(self.q.shape)} k{tuple(self.k.shape)} v{tuple(self.v.shape)} seed={self.seed} params={opts}"


@st.composite
def shapes(draw: Any, mech: Mechanism, pattern: str, max_len: int = 160) -> dict[str, Any]:
    """B, heads, spatial sizes and head dims for one example of ``pattern``."""
    n_axes = draw(st.sampled_from(mech.spatial_dims))
    per_axis = max(2, int(max_len ** (1 / n_axes)))
    q_sizes = tuple(draw(st.integers(1, per_axis)) for _ in range(n_axes))
    cross = pattern.endswith("cross")
    kv_sizes = tuple(draw(st.integers(1, per_axis)) for _ in range(n_axes)) if cross else q_sizes
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from((1, 2, 3))) if mech.gqa else 1
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    value_dim = draw(st.sampled_from((head_dim, head_dim, 8, 24)))
    return dict(
        batch=draw(st.integers(1, 2)),
        q_heads=kv_heads * group,
        kv_heads=kv_heads,
        q_sizes=q_sizes,
        kv_sizes=kv_sizes,
        head_dim=head_dim,
        value_dim=value_dim,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_case(mech: Mechanism, pattern: str, shape: dict[str, Any], dtype: torch.dtype, device: str) -> Case:
    gen = torch.Generator().manual_seed(shape["seed"])

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    b, hq, hkv, d, dv = shape["batch"], shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["value_dim"]
    q = rand(b, hq, *shape["q_sizes"], d)
    k = rand(b, hkv, *shape["kv_sizes"], d)
    v = rand(b, hkv, *shape["kv_sizes"], dv)
    problem = mech.describe(q, k, v)
    params = mech.example_params(problem, pattern, random.Random(shape["seed"]))
    return Case(q, k, v, params, shape["seed"])


def fit_params(backend: Backend, mech: Mechanism, case: Case) -> str | None:
    """Drop the options ``backend`` declines (one at a time) so the example still tests it.

    Returns the reason it still declines, or None once it accepts.
    """
    problem = mech.describe(case.q, case.k, case.v)
    bound = mech.bind(problem, case.params)
    reason = backend.decline_reason(problem, bound)
    for name in [n for n in case.params if n != "causal"]:
        if reason is None:
            break
        trial = {n: v for n, v in case.params.items() if n != name}
        try:
            trial_reason = backend.decline_reason(problem, mech.bind(problem, trial))
        except ParameterError:  # a required parameter (a window, a kernel size) stays
            continue
        if trial_reason is None or trial_reason != reason:
            case.params = trial
            reason = trial_reason
    return reason


def split_result(result: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (result[0], result[1]) if isinstance(result, tuple) else (result, None)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, *, grad: bool = False) -> None:
    """Compare with the stated tolerance of ``dtype`` (gradients: the gradient tolerance)."""
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{what}: non-finite entries differ from the reference"
    if grad and dtype in GRAD_RMS_TOL:
        rel, floor = GRAD_RMS_TOL[dtype]
        err = float((a - e)[finite].pow(2).mean().sqrt())
        scale = float(e[finite].pow(2).mean().sqrt())
        assert err <= rel * scale + floor, f"{what}: RMS error {err:.3g} > {rel} * RMS {scale:.3g} + {floor}"
        return
    atol, rtol = (GRAD_TOL if grad else FORWARD_TOL)[dtype]
    torch.testing.assert_close(a[finite], e[finite], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    assert torch.equal(a[~finite], e[~finite]), f"{what}: infinities differ"
