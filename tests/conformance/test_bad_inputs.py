"""Bad inputs raise the documented error, naming the argument, for every registered mechanism.

The generic list (rank, heads, head dim, lengths, batch, dtype, device, NaN/inf) applies to
all mechanisms; each parameter's own refusals come from its ``Param.invalid`` values.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import (
    AttnZooError,
    DeviceError,
    DTypeError,
    NoBackendError,
    NonFiniteError,
    ParameterError,
    ShapeError,
    UnknownMechanismError,
)

from .harness import mechanisms

MECHS = [pytest.param(m, id=m.name) for m in mechanisms()]


def _inputs(mech, *, b=2, hq=4, hkv=2, n=9, nk=None, d=16, dv=16, dtype=torch.float32):
    hkv = hkv if mech.gqa else hq
    nk = n if nk is None else nk
    sq = (n,) if mech.spatial_dims[0] == 1 else (n,) * mech.spatial_dims[0]
    sk = (nk,) if mech.spatial_dims[0] == 1 else (nk,) * mech.spatial_dims[0]
    return (torch.randn(b, hq, *sq, d, dtype=dtype), torch.randn(b, hkv, *sk, d, dtype=dtype), torch.randn(b, hkv, *sk, dv, dtype=dtype))


def _pattern(mech):
    """Self-attention, non-causal where the mechanism has it (causal-only ones: causal)."""
    return "noncausal_self" if "noncausal_self" in mech.patterns else "causal_self"


def _plain(mech, q, k, v):
    """The mechanism's plain parameters (a required one, like a window, filled in)."""
    return mech.example_params(mech.describe(q, k, v), _pattern(mech))


def _raises(exc, argument, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, AttnZooError)
    assert info.value.argument == argument, f"expected the error to name {argument!r}: {info.value}"
    assert argument in str(info.value)
    return info.value


@pytest.mark.parametrize("mech", MECHS)
def test_wrong_rank(mech):
    q, k, v = _inputs(mech)
    _raises(ShapeError, "q", mech, q[0], k, v)
    _raises(ShapeError, "k", mech, q, k.unsqueeze(0), v)


@pytest.mark.parametrize("mech", MECHS)
def test_head_count_mismatch(mech):
    q, k, v = _inputs(mech, hq=4, hkv=4)
    _raises(ShapeError, "k", mech, q, k[:, :3], v[:, :3])  # 3 does not divide 4
    _raises(ShapeError, "v", mech, q, k, v[:, :2])


@pytest.mark.parametrize("mech", MECHS)
def test_head_dim_and_length_mismatch(mech):
    q, k, v = _inputs(mech)
    _raises(ShapeError, "k", mech, q, k[..., :8], v)
    _raises(ShapeError, "v", mech, q, k, v[:, :, :-1] if mech.spatial_dims[0] == 1 else v[:, :, :-1, ...])
    _raises(ShapeError, "k", mech, q, k[:1], v[:1])  # batch sizes differ


@pytest.mark.parametrize("mech", MECHS)
def test_dtype_and_device(mech):
    q, k, v = _inputs(mech)
    _raises(DTypeError, "k", mech, q, k.double(), v)
    _raises(DTypeError, "q", mech, q.long(), k.long(), v.long())
    _raises(DeviceError, "v", mech, q, k, v.to("meta"))
    with pytest.raises(TypeError, match="q"):
        mech(q.tolist(), k, v)


@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("where, value", [("q", float("nan")), ("k", float("inf")), ("v", float("nan"))])
def test_non_finite_inputs_are_named(mech, where, value):
    q, k, v = _inputs(mech)
    tensors = {"q": q, "k": k, "v": v}
    tensors[where].view(-1)[5] = value
    params = _plain(mech, q, k, v)
    err = _raises(NonFiniteError, where, mech, tensors["q"], tensors["k"], tensors["v"], **params)
    assert "NaN" in str(err)


@pytest.mark.parametrize("mech", MECHS)
def test_finite_check_can_be_turned_off(mech):
    q, k, v = _inputs(mech)
    q.view(-1)[0] = float("nan")
    attnzoo.set_checks(finite=False)
    try:
        out = mech(q, k, v, **_plain(mech, q, k, v))
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isnan(out).any()
    finally:
        attnzoo.set_checks(finite=True)


@pytest.mark.parametrize("mech", MECHS)
def test_unknown_parameter(mech):
    q, k, v = _inputs(mech)
    err = _raises(ParameterError, "kernal_size", mech, q, k, v, kernal_size=3)
    for p in mech.params:
        assert p.name in str(err), "the error lists the accepted parameters"


def _invalid_cases():
    return [
        pytest.param(m, p.name, bad, id=f"{m.name}-{p.name}-{i}")
        for m in mechanisms()
        for p in m.params
        for i, bad in enumerate(p.invalid)
    ]


@pytest.mark.parametrize("mech, name, bad", _invalid_cases())
def test_invalid_parameter_values(mech, name, bad):
    q, k, v = _inputs(mech)
    params = _plain(mech, q, k, v)
    params[name] = bad
    _raises(ParameterError, name, mech, q, k, v, **params)


@pytest.mark.parametrize("mech", MECHS)
def test_backend_refusals_say_why(mech):
    q, k, v = _inputs(mech)
    params = _plain(mech, q, k, v)
    with pytest.raises(UnknownMechanismError, match="it has"):
        mech(q, k, v, backend="no_such_backend", **params)
    # a backend restricted to some dtypes refuses the others, naming the ones it takes
    narrow = [b for b in mech.backends.values() if torch.float64 not in b.dtypes]
    for b in narrow:
        with pytest.raises(NoBackendError, match=b.name):
            mech(q.double(), k.double(), v.double(), backend=b.name, **params)


def test_unknown_mechanism_lists_the_registered_ones():
    with pytest.raises(UnknownMechanismError) as info:
        attnzoo.get("sofmax")
    assert "softmax" in str(info.value) and info.value.argument == "mechanism"
    with pytest.raises(UnknownMechanismError, match="dense"):
        attnzoo.list_mechanisms(family="no_such_family")
