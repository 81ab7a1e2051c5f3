"""Padded batches for the unit tests of the linear family: a batch of sequences of different
lengths, padded on the right or the left (``key_padding_mask``, True = pad), must equal each
sequence run alone, unpadded, on its real query rows; outputs and gradients."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

LENGTHS = (13, 9, 4)  # one sequence unpadded, two padded
N = LENGTHS[0]


def real(length: int, side: str, n: int = N) -> slice:
    """The positions of a sequence of ``length`` tokens in a batch padded to ``n`` on ``side``."""
    return slice(0, length) if side == "right" else slice(n - length, n)


def padding(side: str, lengths: tuple[int, ...] = LENGTHS, n: int = N) -> torch.Tensor:
    """(B, n) bool, True at the pads."""
    pad = torch.ones(len(lengths), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        pad[b, real(length, side, n)] = False
    return pad


def assert_padded_equals_alone(
    attend: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    side: str,
    *,
    cross: bool = False,
    per_length: Optional[Callable[[int, slice], dict[str, Any]]] = None,
    grad: bool = True,
    atol: float = 1e-10,
    rtol: float = 1e-8,
) -> None:
    """``attend(q, k, v, key_padding_mask=..., **per_length(n, positions))`` on the padded batch
    against each sequence alone; with ``grad``, also the gradients of q, k, v on the real tokens
    (through one random projection of the real rows), and zero gradients at the padded keys.

    ``cross``: the queries are not padded (all Nq rows are real); else self-attention, the real
    query rows are the sequence's positions. ``per_length`` gives length-dependent parameters
    (a relative-position table, per-token operands) for the padded call (``n`` = N, all positions)
    and for each sequence alone (its length and positions).
    """
    n = k.shape[2]
    extra = per_length or (lambda length, positions: {})
    pad = padding(side, LENGTHS, n)
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out = attend(*leaves, key_padding_mask=pad, **extra(n, slice(0, n)))
    gen = torch.Generator().manual_seed(1)
    total = out.new_zeros(())
    alone_grads = []
    for b, length in enumerate(LENGTHS):
        keys = real(length, side, n)
        rows = slice(0, q.shape[2]) if cross else keys
        parts = [leaves[0][b : b + 1, :, rows], leaves[1][b : b + 1, :, keys], leaves[2][b : b + 1, :, keys]]
        parts = [t.detach().clone().requires_grad_(grad) for t in parts]
        alone = attend(*parts, **extra(length, keys))
        torch.testing.assert_close(out[b : b + 1, :, rows], alone, atol=atol, rtol=rtol, msg=lambda m: f"sequence {b} ({side} padding): {m}")
        if grad:
            weight = torch.randn(alone.shape, generator=gen, dtype=alone.dtype)
            alone_grads.append(torch.autograd.grad((alone * weight).sum(), parts))
            total = total + (out[b : b + 1, :, rows] * weight).sum()
    if not grad:
        return
    grads = torch.autograd.grad(total, leaves)
    for b, length in enumerate(LENGTHS):
        keys = real(length, side, n)
        rows = slice(0, q.shape[2]) if cross else keys
        for name, got, want, pos in zip("qkv", grads, alone_grads[b], (rows, keys, keys)):
            torch.testing.assert_close(got[b : b + 1, :, pos], want, atol=atol, rtol=rtol, msg=lambda m: f"d{name}, sequence {b} ({side}): {m}")
        pads = torch.ones(n, dtype=torch.bool)
        pads[keys] = False
        for name, got in zip("kv", grads[1:]):
            assert torch.all(got[b, :, pads] == 0), f"d{name} at the pads of sequence {b} ({side}) is not 0"


def assert_grid_padding_matches_pattern(name: str, pattern_of: Callable, shape: tuple[int, ...], params: dict, backend: str) -> None:
    """A 2D/3D mechanism with ``key_padding_mask`` against softmax over its own predicate with the
    same mask (a separate implementation of masking), outputs and gradients in float64: one entry
    padded at the end of its last axis, one scattered, one with no key at all (output 0)."""
    import attnzoo

    gen = torch.Generator().manual_seed(len(shape))
    q, k, v = (torch.randn(3, 2, *shape, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.rand(3, *shape, generator=gen) < 0.3
    pad[0] = False
    pad[0, ..., shape[-1] - 2 :] = True
    pad[2] = True
    out = attnzoo.get(name)(q, k, v, key_padding_mask=pad, backend=backend, **params)
    pattern = pattern_of(q, k, **params)
    n = pad[0].numel()
    flat = lambda t: t.reshape(3, 2, n, -1)  # noqa: E731
    want = attnzoo.softmax_attention(flat(q), flat(k), flat(v), mask_mod=pattern, key_padding_mask=pad.reshape(3, n), backend="reference")
    torch.testing.assert_close(out.reshape(3, 2, n, -1), want, atol=1e-10, rtol=1e-8)
    weight = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out.reshape(want.shape) * weight).sum(), (q, k, v))
    ref = torch.autograd.grad((want * weight).sum(), (q, k, v))
    for axis, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m, axis=axis: f"d{axis}: {m}")
    assert torch.all(out[2] == 0)
