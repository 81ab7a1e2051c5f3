"""flow (F6, Flowformer): both backends against the official code's formulation written out
(einsum over feature sums, at eps = 0 where its eps placement and ours agree), causal and not,
gradients, chunk sizes that do not divide N, bad inputs."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import NonFiniteError, ParameterError
from attnzoo.functional import flow_attention

from .qkv import random_qkv
from .padding import N as PAD_N, assert_padded_equals_alone

BACKENDS = ("reference", "chunked")
TINY = 1e-300  # eps must be positive: a float64 eps that changes nothing at these magnitudes


def _oracle(q, k, v, causal):
    """Flow-Attention as thuml/Flowformer's Flow_Attention(_Causal) computes it (eps = 0), heads given equal."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    nq, nk = q.shape[2], k.shape[2]
    if not causal:
        sink_in = 1.0 / torch.einsum("bhld,bhd->bhl", q, k.sum(2))
        source_out = 1.0 / torch.einsum("bhld,bhd->bhl", k, q.sum(2))
        conserved_sink = torch.einsum("bhld,bhd->bhl", q, (k * source_out[..., None]).sum(2))
        conserved_source = torch.einsum("bhld,bhd->bhl", k, (q * sink_in[..., None]).sum(2)).clamp(-1, 1)
        allocation = torch.sigmoid(conserved_sink * (nq / nk))
        competition = torch.softmax(conserved_source, -1) * nk
        kv = torch.einsum("bhld,bhlm->bhdm", k, v * competition[..., None])
        return torch.einsum("bhld,bhdm->bhlm", q * sink_in[..., None], kv) * allocation[..., None]
    normal = torch.arange(1, nq + 1, dtype=q.dtype)
    sink_in = normal / torch.einsum("bhld,bhld->bhl", q, k.cumsum(2))
    source_out = normal / torch.einsum("bhld,bhld->bhl", k, q.cumsum(2))
    conserved_sink = torch.einsum("bhld,bhld->bhl", q, (k * source_out[..., None]).cumsum(2)) / normal
    conserved_source = torch.einsum("bhld,bhld->bhl", k, (q * sink_in[..., None]).cumsum(2)) / normal
    e = conserved_source.clamp(-1, 1).exp()
    competition = e / e.cumsum(-1) * normal
    kv = torch.einsum("bhld,bhlm->bhldm", k, v * competition[..., None]).cumsum(2)
    out = torch.einsum("bhld,bhldm->bhlm", q * (sink_in / normal)[..., None], kv)
    return out * torch.sigmoid(conserved_sink)[..., None]


def _inputs(b=2, h=3, nq=13, nk=13, d=6, dv=4, seed=0, dtype=torch.float64):
    return random_qkv(b, h, nq, nk, d, dv, seed=seed, dtype=dtype)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "causal, nq, nk, chunk_size",
    [
        (False, 13, 13, 64),
        (False, 9, 21, 64),
        (False, 21, 5, 64),
        (True, 13, 13, 64),
        (True, 37, 37, 5),
        (True, 16, 16, 4),
        (True, 1, 1, 1),
    ],
    ids=["bidir-N13", "bidir-Nq9-Nk21", "bidir-Nq21-Nk5", "causal-N13", "causal-N37-L5", "causal-N16-L4", "causal-N1"],
)
def test_matches_the_official_formulation(backend, causal, nq, nk, chunk_size):
    q, k, v = _inputs(nq=nq, nk=nk)
    out = flow_attention(q, k, v, causal=causal, eps=TINY, chunk_size=chunk_size, backend=backend)
    torch.testing.assert_close(out, _oracle(q, k, v, causal), atol=1e-12, rtol=1e-10)


def test_clamp_is_reached_and_matters():
    """Self attention: sum_j O^_j = Nq exactly, so O^ averages 1 and the clamp at 1 is hit; without it the output differs."""
    q, k, v = _inputs(nq=17, nk=17)
    a = torch.sigmoid(q) @ torch.sigmoid(k).transpose(-1, -2)
    conserved_out = (a / a.sum(-1, keepdim=True)).sum(-2)
    torch.testing.assert_close(conserved_out.sum(-1), torch.full((2, 3), 17.0, dtype=torch.float64))
    assert bool((conserved_out > 1).any())
    out = flow_attention(q, k, v, eps=TINY)
    unclamped = torch.softmax(conserved_out, -1) * 17
    assert not torch.allclose(torch.softmax(conserved_out.clamp(-1, 1), -1) * 17, unclamped)
    torch.testing.assert_close(out, _oracle(q, k, v, False), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_match_the_oracle(causal):
    q, k, v = (t.requires_grad_(True) for t in _inputs(nq=11, nk=11))
    want = torch.autograd.grad(_oracle(q, k, v, causal).square().sum(), (q, k, v))
    for backend in BACKENDS:
        got = torch.autograd.grad(flow_attention(q, k, v, causal=causal, eps=TINY, chunk_size=3, backend=backend).square().sum(), (q, k, v))
        for name, g, w in zip("qkv", got, want):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=lambda m, backend=backend, name=name: f"{backend} d{name}: {m}")


def test_gqa_equals_repeated_heads():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 10, 6, generator=gen, dtype=torch.float64)
    k, v = torch.randn(1, 2, 10, 6, generator=gen, dtype=torch.float64), torch.randn(1, 2, 10, 3, generator=gen, dtype=torch.float64)
    for causal in (False, True):
        want = flow_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=causal)
        torch.testing.assert_close(flow_attention(q, k, v, causal=causal), want, atol=1e-13, rtol=0)


def test_eps_is_added_to_the_flows():
    """eps = 1e-3 moves the output (the flows are O(N D / 4) here), and the reference agrees with chunked."""
    q, k, v = _inputs()
    small, large = flow_attention(q, k, v, eps=TINY), flow_attention(q, k, v, eps=1e-3)
    assert not torch.allclose(small, large, atol=1e-9)
    torch.testing.assert_close(large, flow_attention(q, k, v, eps=1e-3, backend="reference"), atol=1e-12, rtol=1e-10)


def test_bfloat16_is_computed_in_float32():
    q, k, v = _inputs(dtype=torch.bfloat16, nq=64, nk=64, d=16, dv=16)
    out = flow_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    want = flow_attention(q.float(), k.float(), v.float(), causal=True, backend="reference")
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)


def test_bad_inputs_are_named():
    q, k, v = _inputs(nq=5, nk=7)
    with pytest.raises(ParameterError, match="causal") as info:
        flow_attention(q, k, v, causal=True)
    assert info.value.argument == "causal"
    q, k, v = _inputs()
    for name, bad in (("eps", 0.0), ("eps", float("nan")), ("chunk_size", 0), ("causal", "yes")):
        with pytest.raises(ParameterError, match=name) as info:
            attnzoo.get("flow")(q, k, v, **{name: bad})
        assert info.value.argument == name
    k = k.clone()
    k[0, 0, 0, 0] = float("inf")  # sigmoid(inf) = 1 would hide it: the map keeps it non-finite
    with pytest.raises(NonFiniteError, match="k"):
        flow_attention(q, k, v)


@pytest.mark.parametrize("splits", [(1,) * 9, (4, 1, 3, 1), (9,), (2, 7)], ids=["1x9", "4-1-3-1", "9", "2-7"])
def test_decoding_by_steps_equals_the_causal_forward(splits):
    mech = attnzoo.get("flow")
    q, k, v = _inputs(nq=9, nk=9)
    full = flow_attention(q, k, v, causal=True, backend="reference")
    state, outs, start = mech.init_state(q, k, v, causal=True), [], 0
    for size in splits:
        part = slice(start, start + size)
        out, state = mech.step(q[:, :, part], k[:, :, part], v[:, :, part], state, causal=True, chunk_size=2)
        outs.append(out)
        start += size
        held = sum(t.numel() for t in (state.keys, state.queries, state.keys_out, state.queries_in, state.exp_sum, state.kv))
        assert held == 2 * 3 * mech.state_size(6, 4), "the state is state_size per batch entry and head, whatever was seen"
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-12, rtol=1e-10)


def test_decoding_refuses_what_it_cannot_do():
    mech = attnzoo.get("flow")
    q, k, v = _inputs(nq=4, nk=4)
    state = mech.init_state(q, k, v, causal=True)
    with pytest.raises(ParameterError, match="causal"):
        mech.step(q, k, v, state, causal=False)
    with pytest.raises(ParameterError, match="q"):
        mech.step(q[:, :, :1], k, v, state, causal=True)


# --------------------------------------------------------------------------------------------
# key_padding_mask (True = ignore the key): a padded batch equals each sequence alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", (False, True), ids=("noncausal", "causal"))
@pytest.mark.parametrize("side", ("right", "left"))
def test_padded_batch_equals_each_sequence_alone(backend, causal, side):
    """Pads leave the sources and (self-attention) the sinks: every flow, the competition
    softmax, the counts Nq, Nk and the causal positions t are the sequence's own."""
    q, k, v = random_qkv(3, 4, PAD_N, PAD_N, 6, 5, kv_heads=2)
    assert_padded_equals_alone(lambda q, k, v, **kw: flow_attention(q, k, v, causal=causal, chunk_size=4, backend=backend, **kw), q, k, v, side)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ("right", "left"))
def test_cross_attention_with_padded_keys(backend, side):
    """Nq != Nk: every query is a real sink; only the sources are padded."""
    q, _, _ = random_qkv(3, 2, 6, 6, 5, 4, seed=1)
    _, k, v = random_qkv(3, 2, PAD_N, PAD_N, 5, 4, seed=2)
    assert_padded_equals_alone(lambda q, k, v, **kw: flow_attention(q, k, v, backend=backend, **kw), q, k, v, side, cross=True)


def test_padded_query_rows_output_zero():
    q, k, v = random_qkv(2, 2, 7, 7, 4, 3)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    for backend in BACKENDS:
        out = flow_attention(q, k, v, key_padding_mask=pad, backend=backend)
        assert torch.all(out[1, :, 4:] == 0)
