"""nn.heads: AttentiveProbe (X3, attentive probing) and PointerHead (X4, Pointer Networks).

Covers: each head against a written-out reference (loops over the batch, queries and positions,
float64), outputs and the gradients of the inputs and every parameter; the probe with and without
a key projection, a value width other than the tokens', a classifier; padded token sets and
padded pointer positions (key_padding_mask) equal to the unpadded run, with padded positions at
probability 0 (log -inf) and finite gradients; the pointer's per-state mask and tanh clipping, a
state with no valid position (all -inf, no NaN); another mechanism (linear) through both heads;
clear errors naming the argument.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import attnzoo
from attnzoo import registry
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn.cross import AttentiveProbe, PointerHead

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _randn(*shape: int, seed: int = 1, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=F64).requires_grad_(requires_grad)


def _grads(value: torch.Tensor, module: torch.nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, [*inputs, *module.parameters()]))


# --------------------------------------------------------------------------------------------
# attentive probe
# --------------------------------------------------------------------------------------------
def _probe_reference(probe: AttentiveProbe, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
    """EP written out: query m pools its slice of the values over the tokens it may see."""
    b, n, c = x.shape
    m, width = probe.num_queries, probe.value_dim // probe.num_queries
    keys = x if probe.k_proj is None else probe.k_proj(x)
    values = probe.v_proj(x)
    rows = []
    for i in range(b):
        parts = []
        for j in range(m):
            seen = [t for t in range(n) if padding is None or not padding[i, t]]
            scores = torch.stack([probe.queries[j] @ keys[i, t] / math.sqrt(c) for t in seen])
            weights = torch.softmax(scores, dim=0)
            parts.append(sum(w * values[i, t, j * width : (j + 1) * width] for w, t in zip(weights, seen)))
        rows.append(torch.cat(parts))
    pooled = torch.stack(rows)
    return pooled if probe.classifier is None else probe.classifier(pooled)


PROBES = {
    "EP-M4": dict(num_queries=4),
    "EP-M2-value12-classes3": dict(num_queries=2, value_dim=12, num_classes=3),
    "keyproj-M1-bias": dict(num_queries=1, key_proj=True, bias=True),
}


@pytest.mark.parametrize("config", list(PROBES))
def test_probe_equals_written_out_reference(config):
    torch.manual_seed(0)
    probe = AttentiveProbe(8, **PROBES[config]).double()
    torch.nn.init.normal_(probe.queries)  # EP starts at std 0.02: near-uniform weights would test little
    x = _randn(2, 7, 8, requires_grad=True)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    for mask in (None, padding):
        out, expected = probe(x, key_padding_mask=mask), _probe_reference(probe, x, mask)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        cotangent = _randn(*out.shape, seed=3)
        for got, want in zip(_grads((out * cotangent).sum(), probe, x), _grads((expected * cotangent).sum(), probe, x)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mechanism", ["softmax", "linear"])
def test_probe_padded_token_sets_equal_each_set_alone(mechanism):
    torch.manual_seed(0)
    probe = AttentiveProbe(8, 4, mechanism=mechanism).double()
    torch.nn.init.normal_(probe.queries)
    x = _randn(2, 9, 8)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 5:] = True
    out = probe(x, key_padding_mask=padding)
    torch.testing.assert_close(out[0], probe(x[:1, :5])[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1], probe(x[1:])[0], rtol=1e-10, atol=1e-10)
    assert (out[0] - probe(x[:1])[0]).abs().max() > 1e-6  # the check can fail: the pads would count


def test_probe_errors_name_the_argument(monkeypatch):
    cases = [
        ("num_queries", lambda: AttentiveProbe(8, 3)),
        ("mechanism", lambda: AttentiveProbe(8, 2, mechanism="window", window_size=2)),
        ("key_padding_mask", lambda: AttentiveProbe(8, 2, key_padding_mask=None)),
        ("not_a_param", lambda: AttentiveProbe(8, 2, not_a_param=1)),
        ("key_proj", lambda: AttentiveProbe(8, 2, key_proj=1)),
    ]
    for argument, build in cases:
        with pytest.raises(ParameterError) as info:
            build()
        assert info.value.argument == argument, argument
    probe = AttentiveProbe(8, 2)
    with pytest.raises(ShapeError) as info:
        probe(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 5))  # not bool
    assert info.value.argument == "key_padding_mask"
    with pytest.raises(ShapeError) as info:
        probe(torch.randn(2, 5, 6))
    assert info.value.argument == "x"
    linear = attnzoo.get("linear")
    bare = dataclasses.replace(linear, name="test_no_padding", params=tuple(p for p in linear.params if p.name != "key_padding_mask"))
    monkeypatch.setitem(registry._REGISTRY, bare.name, bare)
    with pytest.raises(ParameterError) as info:
        AttentiveProbe(8, 2, mechanism=bare.name)(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert info.value.argument == "key_padding_mask"


# --------------------------------------------------------------------------------------------
# pointer head
# --------------------------------------------------------------------------------------------
def _pointer_reference(head: PointerHead, dec: torch.Tensor, enc: torch.Tensor, padding=None, mask=None) -> torch.Tensor:
    """log p(y_i = j) written out: scaled dot products (clipped), invalid positions at -inf."""
    b, m, _ = dec.shape
    n = enc.shape[1]
    q, k = head.q_proj(dec), head.k_proj(enc)
    rows = []
    for i in range(b):
        for s in range(m):
            valid = [j for j in range(n) if not (padding is not None and padding[i, j]) and not (mask is not None and mask[i, s, j])]
            u = torch.stack([q[i, s] @ k[i, j] / math.sqrt(head.head_dim) for j in valid]) if valid else None
            if u is not None and head.clip is not None:
                u = head.clip * torch.tanh(u)
            row = torch.full((n,), float("-inf"), dtype=dec.dtype)
            if u is not None:
                row = row.index_put((torch.tensor(valid),), torch.log_softmax(u, dim=0))
            rows.append(row)
    return torch.stack(rows).view(b, m, n)


def _pointer_masks() -> tuple[torch.Tensor, torch.Tensor]:
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True  # sequence 1 has 4 positions
    visited = torch.zeros(2, 3, 6, dtype=torch.bool)
    visited[:, 1, 0] = True
    visited[:, 2, :2] = True
    visited[1, 2, 2:4] = True  # state 2 of sequence 1: nothing left to point at
    return padding, visited


@pytest.mark.parametrize("clip", [None, 10.0], ids=["plain", "clip10"])
def test_pointer_equals_written_out_reference(clip):
    torch.manual_seed(0)
    head = PointerHead(8, kdim=5, head_dim=4, clip=clip, bias=True).double()
    dec, enc = _randn(2, 3, 8, requires_grad=True), _randn(2, 6, 5, seed=2, requires_grad=True)
    padding, visited = _pointer_masks()
    for masks in ({}, {"padding": padding}, {"padding": padding, "mask": visited}):
        out = head(dec, enc, key_padding_mask=masks.get("padding"), mask=masks.get("mask"))
        expected = _pointer_reference(head, dec, enc, masks.get("padding"), masks.get("mask"))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        # gradients through the valid entries (an NLL reads only those)
        valid = torch.isfinite(expected)
        cotangent = _randn(*out.shape, seed=4) * valid
        got = _grads(torch.where(valid, out, 0.0).mul(cotangent).sum(), head, dec, enc)
        want = _grads(torch.where(valid, expected, 0.0).mul(cotangent).sum(), head, dec, enc)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_pointer_padded_positions_have_no_probability_and_equal_the_unpadded_run():
    torch.manual_seed(0)
    head = PointerHead(8).double()
    dec, enc = _randn(2, 3, 8), _randn(2, 6, 8, seed=2)
    padding, visited = _pointer_masks()
    out = head(dec, enc, key_padding_mask=padding, mask=visited)
    assert torch.isneginf(out[1, :, 4:]).all()
    torch.testing.assert_close(out[1, :2, :4], head(dec[1:, :2], enc[1:, :4], mask=visited[1:, :2, :4])[0], rtol=1e-10, atol=1e-10)
    assert torch.isneginf(out[1, 2]).all() and not torch.isnan(out).any()  # no valid position: no probability anywhere
    torch.testing.assert_close(out[0].exp().sum(-1), torch.ones(3, dtype=F64))


def test_pointer_trains_with_nll_and_finite_gradients():
    torch.manual_seed(0)
    head = PointerHead(8, clip=10.0).double()
    dec, enc = _randn(2, 3, 8), _randn(2, 6, 8, seed=2)
    padding, visited = _pointer_masks()
    visited[1, 2, 2:4] = False  # every state has a target
    targets = torch.tensor([[1, 3, 5], [2, 1, 3]])
    log_p = head(dec, enc, key_padding_mask=padding, mask=visited)
    loss = torch.nn.functional.nll_loss(log_p.flatten(0, 1), targets.flatten())
    grads = torch.autograd.grad(loss, list(head.parameters()))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_pointer_through_another_mechanism_points_by_its_weights():
    torch.manual_seed(0)
    head = PointerHead(8, mechanism="linear").double()
    dec, enc = _randn(2, 3, 8), _randn(2, 6, 8, seed=2)
    padding, _ = _pointer_masks()
    log_p = head(dec, enc, key_padding_mask=padding)
    q, k = head.q_proj(dec).unsqueeze(1), head.k_proj(enc).unsqueeze(1)
    # linear attention's weights, read off the one-hot values the same way by the functional call
    expected = attnzoo.linear_attention(q, k, torch.eye(6, dtype=F64).expand(2, 1, 6, 6), key_padding_mask=padding).squeeze(1)
    torch.testing.assert_close(log_p.exp(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 3, dtype=F64))  # elu + 1 features: a distribution
    assert torch.isneginf(log_p[1, :, 4:]).all()


def test_pointer_errors_name_the_argument():
    cases = [
        ("clip", lambda: PointerHead(8, clip=0.0)),
        ("clip", lambda: PointerHead(8, clip=5.0, mechanism="linear")),
        ("scale", lambda: PointerHead(8, clip=5.0, scale=0.5)),
        ("bias", lambda: PointerHead(8, bias=torch.zeros(1))),
        ("score_mod", lambda: PointerHead(8, score_mod=None)),
        ("mechanism", lambda: PointerHead(8, mechanism="halo")),
    ]
    for argument, build in cases:
        with pytest.raises(ParameterError) as info:
            build()
        assert info.value.argument == argument, argument
    head = PointerHead(8)
    dec, enc = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    for argument, call in [
        ("encoder", lambda: head(dec, torch.randn(3, 6, 8))),
        ("decoder", lambda: head(torch.randn(2, 3, 4), enc)),
        ("mask", lambda: head(dec, enc, mask=torch.zeros(2, 6, dtype=torch.bool))),
        ("key_padding_mask", lambda: head(dec, enc, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))),
    ]:
        with pytest.raises(ShapeError) as info:
            call()
        assert info.value.argument == argument, argument
    with pytest.raises(ParameterError) as info:
        PointerHead(8, mechanism="linear")(dec, enc, mask=torch.zeros(3, 6, dtype=torch.bool))
    assert info.value.argument == "mask"
