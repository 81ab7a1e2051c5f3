"""agent (F4, Agent Attention): both backends against the two softmaxes written out, gradients,
bad inputs; the AgentAttention module against its pieces written out (pooling, DWC)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional import agent_attention
from attnzoo.nn import AgentAttention
from .padding import N as PAD_N, assert_padded_equals_alone
from .qkv import random_qkv as _padding_qkv

BACKENDS = ("reference", "sdpa")


def _oracle(q, k, v, agents, scale=None, agent_bias=0.0, query_bias=0.0):
    """softmax(s Q A^T + bq) (softmax(s A K^T + ba) V), written with einsum, heads of k/v repeated by hand."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = torch.cat([k[:, h : h + 1].expand(-1, group, -1, -1) for h in range(k.shape[1])], dim=1)
    v = torch.cat([v[:, h : h + 1].expand(-1, group, -1, -1) for h in range(v.shape[1])], dim=1)
    agents = agents.expand(q.shape[0], -1, -1, -1)
    gather = torch.softmax(torch.einsum("bhad,bhkd->bhak", agents, k) * s + agent_bias, dim=-1)
    agent_values = torch.einsum("bhak,bhke->bhae", gather, v)
    broadcast = torch.softmax(torch.einsum("bhqd,bhad->bhqa", q, agents) * s + query_bias, dim=-1)
    return torch.einsum("bhqa,bhae->bhqe", broadcast, agent_values)


def _inputs(b=2, hq=4, hkv=2, nq=11, nk=13, d=8, dv=5, n=6, agent_batch=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, nk, dv, generator=gen, dtype=dtype)
    agents = torch.randn(b if agent_batch is None else agent_batch, hq, n, d, generator=gen, dtype=dtype)
    return q, k, v, agents


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["B2-Hq4-Hkv2-Nq11-Nk13-n6", "B2-agents-batch1", "B1-n1", "scale0.3"])
def test_matches_the_two_softmaxes_written_out(backend, case):
    kw = {"B2-agents-batch1": dict(agent_batch=1), "B1-n1": dict(b=1, n=1)}.get(case, {})
    scale = 0.3 if case == "scale0.3" else None
    q, k, v, agents = _inputs(**kw)
    out = agent_attention(q, k, v, agents, scale=scale, backend=backend)
    torch.testing.assert_close(out, _oracle(q, k, v, agents, scale), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_biases_are_added_to_the_scores(backend):
    q, k, v, agents = (t.requires_grad_(True) for t in _inputs(nq=7, nk=9, n=4))
    gen = torch.Generator().manual_seed(3)
    agent_bias = torch.randn(1, 4, 4, 9, generator=gen, dtype=torch.float64).requires_grad_(True)  # per head, batch-shared
    query_bias = torch.randn(2, 1, 7, 4, generator=gen, dtype=torch.float64).requires_grad_(True)  # per batch, head-shared
    leaves = (q, k, v, agents, agent_bias, query_bias)
    out = agent_attention(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, backend=backend)
    want = _oracle(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(out, _oracle(q, k, v, agents)), "the biases change the output"
    for g, w in zip(torch.autograd.grad(out.square().sum(), leaves), torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)


def test_bias_shapes_are_checked():
    q, k, v, agents = _inputs(nq=7, nk=9, n=4)
    mech = attnzoo.get("agent")
    cases = {
        "agent_bias": (torch.zeros(1, 4, 5, 9, dtype=torch.float64), "5 agents, there are 4"),
        "query_bias": (torch.zeros(1, 4, 7, 3, dtype=torch.float64), "3 agents, there are 4"),
    }
    for name, (bad, why) in cases.items():
        with pytest.raises(ParameterError, match=name) as info:
            mech(q, k, v, agents=agents, **{name: bad})
        assert info.value.argument == name, why
    with pytest.raises(ParameterError, match="agent_bias"):
        mech(q, k, v, agents=agents, agent_bias=torch.zeros(1, 4, 4, 8, dtype=torch.float64))  # Nk is 9
    with pytest.raises(ParameterError, match="query_bias"):
        mech(q, k, v, agents=agents, query_bias=torch.zeros(1, 3, 7, 4, dtype=torch.float64))  # 3 heads of 4


def test_one_agent_gives_every_query_the_same_output():
    """n = 1: the broadcast softmax is [1], so every query reads softmax(s a K^T) V."""
    q, k, v, agents = _inputs(n=1)
    out = agent_attention(q, k, v, agents)
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_the_oracle(backend):
    q, k, v, agents = (t.requires_grad_(True) for t in _inputs(nq=7, nk=9))
    grads = torch.autograd.grad(agent_attention(q, k, v, agents, backend=backend).square().sum(), (q, k, v, agents))
    want = torch.autograd.grad(_oracle(q, k, v, agents).square().sum(), (q, k, v, agents))
    for name, g, w in zip("q k v agents".split(), grads, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_reference_in_low_precision(dtype):
    q, k, v, agents = _inputs(dtype=dtype, nq=64, nk=80, d=16, dv=16)
    ref = agent_attention(q, k, v, agents, backend="reference")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert ref.dtype == dtype
    torch.testing.assert_close(agent_attention(q, k, v, agents, backend="sdpa"), ref, **tol)


@pytest.mark.parametrize(
    "bad, why",
    [
        (None, "missing"),
        (torch.zeros(2, 3, 6, 8, dtype=torch.float64), "3 heads, q has 4"),
        (torch.zeros(2, 4, 6, 7, dtype=torch.float64), "head dim 7, q has 8"),
        (torch.zeros(3, 4, 6, 8, dtype=torch.float64), "batch 3, q has 2"),
        (torch.zeros(2, 4, 6, 8, dtype=torch.long), "integer"),
    ],
)
def test_bad_agents_are_named(bad, why):
    q, k, v, _ = _inputs()
    with pytest.raises(ParameterError, match="agents") as info:
        attnzoo.get("agent")(q, k, v, agents=bad)
    assert info.value.argument == "agents", why


def test_causal_is_not_offered():
    q, k, v, agents = _inputs()
    with pytest.raises(ParameterError, match="causal"):
        attnzoo.get("agent")(q, k, v, agents=agents, causal=True)
    assert attnzoo.get("agent").state_size is None


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
def _module_oracle(layer: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """The module's forward written out with plain ops: qkv, average pooling, the oracle, DWC, proj."""
    b, c, h = x.shape[0], layer.dim, layer.num_heads
    d = c // h
    tokens = x.reshape(b, -1, c)
    q, k, v = layer.qkv(tokens).chunk(3, dim=-1)
    heads = lambda t: t.reshape(b, -1, h, d).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    if layer.spatial_dims == 1:
        pooled = F.adaptive_avg_pool1d(q.reshape(b * h, -1, d).transpose(1, 2), layer.agent_num)
    else:
        side = int(layer.agent_num**0.5)
        pooled = F.adaptive_avg_pool2d(q.reshape(b * h, *x.shape[1:3], d).permute(0, 3, 1, 2), side).flatten(2)
    agents = pooled.transpose(1, 2).reshape(b, h, layer.agent_num, d)
    biases = {}
    if layer.grid_size is not None:  # the official assembly, one (y, x) cell at a time
        rows, cols = layer.grid_size
        up_an = F.interpolate(layer.an_bias, size=layer.grid_size, mode="bilinear")
        up_na = F.interpolate(layer.na_bias, size=layer.grid_size, mode="bilinear")
        cells = [(y, x) for y in range(rows) for x in range(cols)]
        agent_bias = torch.stack([up_an[:, :, y, x] + layer.ah_bias[:, :, y, 0] + layer.aw_bias[:, :, 0, x] for y, x in cells], dim=-1)
        query_bias = torch.stack([up_na[:, :, y, x] + layer.ha_bias[:, y, 0, :] + layer.wa_bias[:, 0, x, :] for y, x in cells], dim=-2)
        biases = dict(agent_bias=agent_bias, query_bias=query_bias)
    out = _oracle(q, k, v, agents, **biases).transpose(1, 2).reshape(b, -1, c)
    if layer.dwc is not None:
        grid = v.transpose(1, 2).reshape(*x.shape)  # channels last
        conv = F.conv1d if layer.spatial_dims == 1 else F.conv2d
        dw = conv(grid.movedim(-1, 1), layer.dwc.weight, layer.dwc.bias, padding=layer.kernel_size // 2, groups=c)
        out = out + dw.movedim(1, -1).reshape(b, -1, c)
    return layer.proj(out).reshape(x.shape)


@pytest.mark.parametrize(
    "spatial_dims, shape, agent_num, kernel_size, bias",
    [
        (2, (2, 6, 5, 16), 9, 3, False),
        (2, (2, 6, 5, 16), 9, 3, True),
        (2, (1, 7, 7, 16), 4, None, True),
        (1, (2, 19, 16), 5, 3, False),
        (1, (1, 8, 16), 12, 5, False),
    ],
    ids=["2D-6x5-n9-k3", "2D-6x5-n9-k3-bias", "2D-7x7-n4-noDWC-bias", "1D-N19-n5-k3", "1D-N8-n12-k5"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_its_pieces_written_out(spatial_dims, shape, agent_num, kernel_size, bias, backend):
    torch.manual_seed(0)
    grid = tuple(shape[1:3]) if bias else None
    layer = AgentAttention(
        16, 4, agent_num=agent_num, spatial_dims=spatial_dims, kernel_size=kernel_size, grid_size=grid, backend=backend
    ).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _module_oracle(layer, x), atol=1e-12, rtol=1e-10)


def test_module_trains_every_parameter():
    layer = AgentAttention(16, 2, agent_num=4, spatial_dims=2, grid_size=(4, 4))
    assert {n for n, _ in layer.named_parameters()} >= {"an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "dwc.weight"}
    layer(torch.randn(2, 4, 4, 16)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_bad_arguments_are_named():
    with pytest.raises(ParameterError, match="agent_num"):
        AgentAttention(16, 2, agent_num=10, spatial_dims=2)  # not a square
    with pytest.raises(ParameterError, match="agent_num"):
        AgentAttention(16, 2, agent_num=0, spatial_dims=1)
    with pytest.raises(ParameterError, match="spatial_dims"):
        AgentAttention(16, 2, spatial_dims=3)
    with pytest.raises(ParameterError, match="kernel_size"):
        AgentAttention(16, 2, kernel_size=4)
    with pytest.raises(ParameterError, match="num_heads"):
        AgentAttention(16, 3)
    with pytest.raises(ShapeError, match="x"):
        AgentAttention(16, 2, agent_num=4, spatial_dims=2)(torch.randn(2, 16, 16))  # (B, N, C) given to a 2D layer
    with pytest.raises(ShapeError, match="grid"):
        AgentAttention(16, 2, agent_num=4, grid_size=(4, 4))(torch.randn(2, 4, 5, 16))
    with pytest.raises(ParameterError, match="grid_size"):
        AgentAttention(16, 2, agent_num=4, spatial_dims=1, grid_size=(4, 4))
    with pytest.raises(ParameterError, match="grid_size"):
        AgentAttention(16, 2, agent_num=4, grid_size=(4, 0))


# --------------------------------------------------------------------------------------------
# key_padding_mask (True = ignore the key): a padded batch equals each sequence alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference", "sdpa"))
@pytest.mark.parametrize("side", ("right", "left"))
@pytest.mark.parametrize("cross", (False, True), ids=("self", "cross"))
@pytest.mark.parametrize("biased", (False, True), ids=("plain", "agent_bias"))
def test_padded_batch_equals_each_sequence_alone(backend, side, cross, biased):
    """The pads are masked in the agents' softmax over the keys (with the same agents)."""
    q, k, v = _padding_qkv(3, 4, 5 if cross else PAD_N, PAD_N, 6, 5, kv_heads=2)
    gen = torch.Generator().manual_seed(7)
    agents = torch.randn(1, 4, 3, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(1, 4, 3, PAD_N, generator=gen, dtype=torch.float64) * 0.5

    def per_length(length, positions):
        return {"agent_bias": bias[..., positions]} if biased else {}

    attend = lambda q, k, v, **kw: agent_attention(q, k, v, agents, backend=backend, **kw)  # noqa: E731
    assert_padded_equals_alone(attend, q, k, v, side, cross=cross, per_length=per_length)
