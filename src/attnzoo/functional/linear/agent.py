"""Agent attention: n agent tokens gather from the keys, the queries read from the agents (catalog F4).

    agent aggregation:  V_A = softmax(s A K^T) V            (n x Dv: each agent attends over every key)
    agent broadcast:    out = softmax(s Q A^T) V_A          (each query attends over the n agents)

with agents ``A`` (B, H, n, D) and ``s = scale`` (default D^-0.5); the paper's agent bias enters
as two optional additive score terms, ``agent_bias`` (on s A K^T, (B|1, H|1, n, Nk)) and
``query_bias`` (on s Q A^T, (B|1, H|1, Nq, n)); the module builds them from its parameters. Han et al. (2024), "Agent
Attention: On the Integration of Softmax and Linear Attention", Sec. 3.2, eq. 3 (the
generalized linear attention view: ``phi_q(Q) = softmax(s Q A^T)``,
``phi_k(K)^T = softmax(s A K^T)``, eq. 4). Both steps are ordinary softmax attention, so the
cost is O(N n D) time and O(N n) memory for n agents, linear in N for a fixed n; the module
(:class:`attnzoo.nn.AgentAttention`) pools the agents from Q, adds the depthwise-conv term.

Non-causal only: every agent aggregates all keys, so each query sees the future through it.
The paper defines no causal variant (it is a vision token mixer; a causal one would need each
query's own agent softmax over its prefix of keys, which is no longer two attention calls).

Backends: ``reference`` (both softmaxes materialized by the library's spec,
:func:`attnzoo.kernels.reference.materialized_attention`) and ``sdpa`` (two calls of PyTorch's
``scaled_dot_product_attention``).
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, materialized_attention
from ...kernels.sdpa import sdpa
from ...registry import Backend, Mechanism, Param, Problem, positive_number, register
from ._shared import compute_dtype, expand_heads, key_padding_param, sample_padding

__all__ = ["agent_attention", "AGENT"]

#: the paper's agent count in its DeiT and PVT models (7 x 7 pooled agents).
DEFAULT_AGENTS = 49


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _check_agents(value: Any, p: Problem) -> Optional[str]:
    expected = f"a floating tensor of shape (B={p.batch} or 1, H={p.q_heads}, n, D={p.head_dim}) with n >= 1 on {p.device}"
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device or value.dim() != 4:
        return expected
    b, h, n, d = value.shape
    return None if b in (1, p.batch) and h == p.q_heads and n >= 1 and d == p.head_dim else expected


def _bias_check(name: str, last_two):
    """None, or a floating 4-D tensor on the inputs' device shaped (B|1, H|1, *last_two) (``"n"``: any, checked against the agents later)."""

    def check(value: Any, p: Problem) -> Optional[str]:
        rows, cols = last_two(p)
        expected = f"None or a floating tensor of shape (B={p.batch} or 1, H={p.q_heads} or 1, {rows}, {cols}) on {p.device}"
        if value is None:
            return None
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device or value.dim() != 4:
            return expected
        b, h, r, c = value.shape
        fits = b in (1, p.batch) and h in (1, p.q_heads) and (rows == "n" or r == rows) and (cols == "n" or c == cols)
        return None if fits else expected

    return check


def _check_combination(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    """The biases' agent axis must match the agent count n."""
    n = bound["agents"].shape[2]
    for name, axis in (("agent_bias", 2), ("query_bias", 3)):
        bias = bound[name]
        if bias is not None and bias.shape[axis] != n:
            return name, f"has {bias.shape[axis]} agents on axis {axis}, the agents tensor has n={n}"
    return None


AGENT_PARAMS = (
    Param(
        "agents",
        None,
        "the agent tokens A, (B or 1, H, n, D) (attnzoo.nn.AgentAttention pools them from Q)",
        _check_agents,
        (None, torch.zeros(2, 3), torch.zeros(1, 1, 0, 4), "A"),
        "Tensor",
    ),
    positive_number("scale", "s on both score matrices, s A K^T and s Q A^T; default head_dim ** -0.5"),
    Param(
        "agent_bias",
        None,
        "added to the agent-aggregation scores s A K^T: (B|1, H|1, n, Nk), the paper's agent bias toward the keys",
        _bias_check("agent_bias", lambda p: ("n", p.kv_len)),
        (torch.zeros(3), torch.zeros(1, 1, 2, 10**6), "b"),
        "Tensor | None",
    ),
    Param(
        "query_bias",
        None,
        "added to the broadcast scores s Q A^T: (B|1, H|1, Nq, n), the paper's agent bias from the queries",
        _bias_check("query_bias", lambda p: (p.q_len, "n")),
        (torch.zeros(3), torch.zeros(1, 1, 10**6, 2), "b"),
        "Tensor | None",
    ),
    key_padding_param(
        "(B, Nk) bool, True = ignore that key (torch.nn.MultiheadAttention's convention): masked in the agents' softmax "
        "over the keys (a sequence with no real key gives its agents zero values)"
    ),
)


def _operands(q: Tensor, k: Tensor, v: Tensor, agents: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v and the agents in the compute dtype, key/value heads repeated (GQA), agents broadcast over B."""
    dtype = compute_dtype(q.dtype)
    heads = q.shape[1]
    agents = agents.to(dtype).expand(q.shape[0], -1, -1, -1)
    return q.to(dtype), expand_heads(k, heads).to(dtype), expand_heads(v, heads).to(dtype), agents


def _aggregation_mask(pad: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The keys the agents may attend, (B, 1, 1, Nk) bool, and the sequences with no real key, (B, 1, 1, 1).

    Such a sequence attends every key (no all -inf softmax row, whose NaN would reach the
    gradients) and its agents' values are then set to 0, so its queries output 0."""
    if pad is None:
        return None, None
    empty = pad.all(-1).view(-1, 1, 1, 1)
    return (~pad).view(pad.shape[0], 1, 1, -1) | empty, empty


# --------------------------------------------------------------------------------------------
# reference: the spec
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, agents, scale, agent_bias, query_bias, key_padding_mask=None):
    """softmax(s A K^T + agent_bias) V materialized (n x Nk, pads masked), then softmax(s Q A^T + query_bias) (Nq x n) times it."""
    out_dtype = q.dtype
    q, k, v, agents = _operands(q, k, v, agents)
    s = default_scale(q, scale)
    allowed, empty = _aggregation_mask(key_padding_mask)
    agent_values, _ = materialized_attention(agents, k, v, scale=s, bias=agent_bias, allowed=allowed)
    if empty is not None:
        agent_values = agent_values.masked_fill(empty, 0)
    out, _ = materialized_attention(q, agents, agent_values, scale=s, bias=query_bias)
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# fast: two fused softmax-attention calls
# --------------------------------------------------------------------------------------------
def _sdpa(q, k, v, *, agents, scale, agent_bias, query_bias, key_padding_mask=None):
    """Two calls of ``F.scaled_dot_product_attention``: agents over K/V, then Q over the agents (biases as float masks)."""
    out_dtype = q.dtype
    q, k, v, agents = _operands(q, k, v, agents)
    s = default_scale(q, scale)
    agent_bias, query_bias = (None if b is None else b.to(q.dtype) for b in (agent_bias, query_bias))
    allowed, empty = _aggregation_mask(key_padding_mask)
    if allowed is not None:  # pads as -inf on the aggregation scores (with the bias when there is one)
        agent_bias = allowed if agent_bias is None else agent_bias.masked_fill(~allowed, float("-inf"))
    agent_values = sdpa(agents, k, v, attn_mask=agent_bias, scale=s)
    if empty is not None:
        agent_values = agent_values.masked_fill(empty, 0)
    return sdpa(q, agents, agent_values, attn_mask=query_bias, scale=s).to(out_dtype)


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    """Random agents (B or 1 of them, n in 1..9) with ``rng``; 49 fixed ones (seed 0) without."""
    if rng is None:  # one set of agents for the batch: a sequence run alone takes the same ones
        gen, batch, count = torch.Generator().manual_seed(0), 1, DEFAULT_AGENTS
    else:
        gen, batch, count = torch.Generator().manual_seed(rng.randrange(2**31)), rng.choice((1, p.batch)), rng.randrange(1, 10)
    agents = torch.randn(batch, p.q_heads, count, p.head_dim, generator=gen).to(device=p.device, dtype=p.dtype)
    params: dict[str, Any] = {"agents": agents}
    if rng is None:
        return params
    if rng.random() < 0.3:
        params["scale"] = rng.choice((0.1, 0.5, 1.0))
    for name, last_two in (("agent_bias", (count, p.kv_len)), ("query_bias", (p.q_len, count))):
        if rng.random() < 0.4:
            lead = (rng.choice((1, p.batch)), rng.choice((1, p.q_heads)))
            params[name] = (0.5 * torch.randn(*lead, *last_two, generator=gen)).to(device=p.device, dtype=p.dtype)
    params["key_padding_mask"] = sample_padding(p, rng)
    return params


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
AGENT = register(
    Mechanism(
        name="agent",
        family="linear",
        catalog=("F4",),
        paper="Agent Attention (Han et al., ECCV 2024)",
        formula="out = softmax(s Q A^T + b_q) (softmax(s A K^T + b_a) V), A = agent tokens (B, H, n, D), biases optional",
        cost="O(N n D) time, O(N n) memory for n agents (linear in N)",
        summary="n agent tokens attend to K/V, then the queries attend to the agents; non-causal",
        patterns=frozenset({"noncausal_self", "noncausal_cross"}),
        params=AGENT_PARAMS,
        gqa=True,
        exact=True,
        sample_params=_sample_params,
        check_params=_check_combination,
        state_size=None,
    )
)
AGENT.add_backend(Backend("reference", _reference, doc="both softmaxes materialized (n x Nk, then Nq x n): the spec", priority=-100))
AGENT.add_backend(
    Backend("sdpa", _sdpa, doc="two calls of torch's scaled_dot_product_attention: agents over K/V, Q over the agents", priority=50)
)


def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    *,
    scale: Optional[float] = None,
    agent_bias: Optional[Tensor] = None,
    query_bias: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Agent attention (catalog F4; Han et al., ECCV 2024, Sec. 3.2, eq. 3).

    ::

        out = softmax(s Q A^T + query_bias) (softmax(s A K^T + agent_bias) V)

    The n agents first attend over every key (agent aggregation), then each query attends over
    the agents and their aggregated values (agent broadcast). Non-causal (see the module
    docstring for why there is no causal form).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        agents: the agent tokens A, (B, Hq, n, D) or (1, Hq, n, D); the paper pools them from Q
            (:class:`attnzoo.nn.AgentAttention` does).
        scale: s, default D^-0.5, on both score matrices.
        agent_bias: None or (B|1, H|1, n, Nk), added to s A K^T (the paper's agent bias, Sec. 3.3).
        query_bias: None or (B|1, H|1, Nq, n), added to s Q A^T.
        key_padding_mask: (B, Nk) bool, **True = ignore that key**: masked in the agents'
            softmax over the keys, so with the same agents a padded batch equals each sequence
            alone (either side, self or cross). A sequence with no real key outputs 0. The
            agents are an input: pooled from padded queries (as the module does) they differ.
        backend: force ``sdpa`` (default) or ``reference``.

    Returns:
        (B, Hq, Nq, Dv) in the dtype of q.

    Cost: O(N n D) time and O(N n) memory: linear in N for a fixed agent count n.

    Example::

        >>> q = k = v = torch.randn(1, 8, 3136, 64)
        >>> agents = torch.nn.functional.adaptive_avg_pool1d(q.flatten(0, 1).transpose(1, 2), 49)
        >>> out = agent_attention(q, k, v, agents.transpose(1, 2).view(1, 8, 49, 64))
    """
    return AGENT(
        q, k, v, backend=backend, agents=agents, scale=scale, agent_bias=agent_bias, query_bias=query_bias, key_padding_mask=key_padding_mask
    )


AGENT.function = agent_attention
