"""Padded batches, for every registered mechanism: padding is exact or refused, never silently wrong.

A batch of sequences of different lengths is padded to one length N (on the right, or on the
left as ``generate`` pads decoder-only models) and the pads are marked in ``key_padding_mask``
((B, Nk) bool, True = ignore the key). For every mechanism, pattern, padding side and backend:

* either the call raises :class:`~attnzoo.errors.ParameterError` naming ``key_padding_mask``
  (the mechanism says why padding has no exact meaning for it, e.g. windows placed by N),
* or each sequence's real query rows equal the run of that sequence alone, unpadded.

Nothing here names a mechanism. Parameters are the mechanism's plain ones for the shortest
sequence; a mechanism whose tensor parameters change shape with N (a relative-position table)
is left to its own unit tests, since slicing them is its own business.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from attnzoo.errors import NoBackendError, ParameterError
from attnzoo.registry import Mechanism

from .harness import mechanisms, split_result

N = 23
LENGTHS = (23, 16, 9)  # one sequence unpadded, two padded
SIDES = ("right", "left")
PATTERNS_CHECKED = ("noncausal_self", "causal_self", "noncausal_cross")


def _cases():
    cases = []
    for mech in mechanisms():
        for pattern in PATTERNS_CHECKED:
            if pattern not in mech.patterns or 1 not in mech.spatial_dims:
                continue
            for backend in mech.backends.values():
                if backend.compiles:  # a CPU compile per shape: covered by the compiled-backend tests
                    continue
                for side in SIDES:
                    ident = f"{mech.name}-{backend.name}-{pattern}-{side}"
                    cases.append(pytest.param(mech, backend.name, pattern, side, id=ident))
    return cases


def _qkv(mech: Mechanism, nq: int, nk: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    kv_heads, group = 2, (2 if mech.gqa else 1)
    q = torch.randn(len(LENGTHS), kv_heads * group, nq, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(len(LENGTHS), kv_heads, nk, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(len(LENGTHS), kv_heads, nk, 8, generator=gen, dtype=torch.float64)
    return q, k, v


def _real(length: int, side: str) -> slice:
    return slice(0, length) if side == "right" else slice(N - length, N)


def _padding(side: str) -> torch.Tensor:
    pad = torch.ones(len(LENGTHS), N, dtype=torch.bool)
    for b, length in enumerate(LENGTHS):
        pad[b, _real(length, side)] = False
    return pad


def _length_dependent(mech: Mechanism, pattern: str) -> bool:
    """Whether a tensor parameter of the plain example changes shape with the sequence length."""

    def shapes(n: int) -> dict:
        q, k, v = _qkv(mech, n, n, 0)
        params = mech.example_params(mech.describe(q, k, v), pattern)
        return {name: tuple(t.shape) for name, t in params.items() if isinstance(t, torch.Tensor)}

    return shapes(min(LENGTHS)) != shapes(N)


def test_every_mechanism_declares_key_padding_mask():
    """The parameter exists everywhere, so a refusal is a stated reason, not 'unknown parameter'."""
    missing = [m.name for m in mechanisms() if not any(p.name == "key_padding_mask" for p in m.params)]
    assert not missing, f"no key_padding_mask parameter: {missing}"


@pytest.mark.parametrize("mech, backend, pattern, side", _cases())
def test_padded_batch_equals_each_sequence_alone(mech, backend, pattern, side):
    assert any(p.name == "key_padding_mask" for p in mech.params), f"{mech.name}: no key_padding_mask parameter"
    if _length_dependent(mech, pattern):
        pytest.skip("a tensor parameter changes shape with N: padding is tested in the mechanism's unit tests")
    cross = pattern.endswith("cross")
    nq = 11 if cross else N
    q, k, v = _qkv(mech, nq, N, seed=zlib.crc32(f"{mech.name}-{pattern}".encode()))
    short = tuple(t[:, :, : (nq if t is q and cross else min(LENGTHS))] for t in (q, k, v))  # self-only mechanisms need Nq = Nk
    params = mech.example_params(mech.describe(*short), pattern)
    pad = _padding(side)
    try:
        padded = mech(q, k, v, backend=backend, key_padding_mask=pad, **params)
    except NoBackendError as err:
        pytest.skip(f"the backend declines float64 inputs of this shape: {err}")
    except ParameterError as err:
        assert err.argument == "key_padding_mask", f"refused, but naming {err.argument!r}: {err}"
        assert len(str(err)) > len(mech.name) + 30, f"a refusal must say why: {err}"
        return
    padded = split_result(padded)[0]
    for b, length in enumerate(LENGTHS):
        keys = _real(length, side)
        rows = slice(0, nq) if cross else keys
        q_b = q[b : b + 1, :, rows]
        alone = split_result(mech(q_b, k[b : b + 1, :, keys], v[b : b + 1, :, keys], backend=backend, **params))[0]
        torch.testing.assert_close(
            padded[b : b + 1, :, rows], alone, atol=1e-9, rtol=1e-7, msg=lambda m: f"sequence {b} (length {length}, {side} padding): {m}"
        )
