"""Flow attention: linear attention normalized by flow conservation (Flowformer, catalog F6).

Queries are sinks, keys are sources, ``A_ij = phi(q_i) . phi(k_j)`` the flow from source j to
sink i, phi = sigmoid (Wu et al., ICML 2022, "Flowformer", Sec. 3.2-3.3, eqs. 5-9):

    incoming flow of sink i      I_i = sum_j A_ij + eps
    outgoing flow of source j    O_j = sum_i A_ij + eps
    conserved incoming           I^_i = sum_j A_ij / O_j       (every source sends out 1)
    conserved outgoing           O^_j = sum_i A_ij / I_i       (every sink takes in 1)
    competition (sources)        c = softmax_j(clamp(O^, -1, 1)) * Nk
    allocation (sinks)           a_i = sigmoid(I^_i * Nq / Nk)
    out_i = a_i * sum_j (A_ij / I_i) c_j v_j

No scaling of q (phi = sigmoid of q itself, as the paper's code). The clamp of O^ to [-1, 1]
and the factors Nk and Nq / Nk are the official code's (thuml/Flowformer, ``Flow_Attention``);
its ``eps`` is added to both factors of each flow's dot product, here to the flow itself: the
two agree at ``eps = 0``.

Causal (the official ``Flow_Attention_Causal``; Nq = Nk = N, positions t = 1..N): each sum runs
over the prefix and is rescaled by the number of its terms,

    I_i = sum_(j <= i) A_ij + eps,   O_j = sum_(i <= j) A_ij + eps
    I^_i = (1/i) sum_(j <= i) A_ij j / O_j,   O^_j = (1/j) sum_(i <= j) A_ij i / I_i
    c_j = exp(clamp(O^_j)) / sum_(t <= j) exp(clamp(O^_t)) * j,   a_i = sigmoid(I^_i)
    out_i = a_i * sum_(j <= i) (A_ij / I_i) c_j v_j

(the outgoing flow of source j counts the sinks i <= j, the ones that exist when j is emitted:
the paper's approximation, which keeps every quantity causal). Every prefix sum is a running
sum, so the causal form is a recurrence: decoding (``init_state``/``step``) carries
:class:`FlowState`, D x Dv + 4 D + 1 numbers per head, whatever the context length.

Every flow is a dot product with a sum of feature vectors, so the cost is O(N D Dv) time and
O(N (D + Dv)) memory: ``chunked`` computes the flows as O(N D) cumulative sums and the final
product with the linear-attention engine (:func:`attnzoo.kernels.linear_scan.chunked_form`);
``reference`` materializes A (O(N^2)) and reads each equation off it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ...errors import ParameterError
from ...kernels.linear_scan import chunked_form, chunked_scan
from ...registry import Backend, Mechanism, Problem, flag, positive_number, register
from ._shared import chunk_size_param, compute_dtype, expand_heads

__all__ = ["flow_attention", "FLOW", "FlowState"]

FLOW_PARAMS = (
    flag("causal", False, "the official causal Flow-Attention: every flow over the prefix, rescaled by its length (Nq = Nk)"),
    dataclasses.replace(
        positive_number("eps", "added to the incoming and outgoing flows (their reciprocals are taken)", optional=False), default=1e-6
    ),
    chunk_size_param(),
)


def _check_combination(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound["causal"] and p.q_len != p.kv_len:
        return (
            "causal",
            f"causal flow attention places queries and keys on one sequence: needs as many queries as keys, got {p.q_len} and {p.kv_len}",
        )
    return None


def _phi(x: Tensor) -> Tensor:
    """sigmoid(x), NaN where x is not finite: sigmoid(inf) = 1 would hide a bad input from the
    library's finite check, which looks at the output only (``x * 0`` is 0, or NaN for inf/NaN)."""
    return torch.sigmoid(x) + x * 0


def _operands(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """sigmoid(q), sigmoid(k) and v in the compute dtype, key/value heads repeated (GQA)."""
    dtype, heads = compute_dtype(q.dtype), q.shape[1]
    return _phi(q.to(dtype)), _phi(expand_heads(k, heads).to(dtype)), expand_heads(v, heads).to(dtype)


def _positions(n: int, like: Tensor, start: int = 0) -> Tensor:
    """start + 1 .. start + n: each token's position, the number of terms of its prefix sums."""
    return torch.arange(start + 1, start + n + 1, device=like.device, dtype=like.dtype)


def _clamped_exp(conserved_out: Tensor) -> Tensor:
    """exp of the conserved outgoing flows clamped to [-1, 1] (the official code's clamp "for stability")."""
    return conserved_out.clamp(-1.0, 1.0).exp()


# --------------------------------------------------------------------------------------------
# reference: the equations read off the materialized flow matrix
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, causal, eps, chunk_size):
    """A = phi(Q) phi(K)^T materialized; its row and column sums are the flows."""
    out_dtype = q.dtype
    q, k, v = _operands(q, k, v)
    nq, nk = q.shape[2], k.shape[2]
    a = q @ k.transpose(-1, -2)  # (B, H, Nq, Nk): A_ij, flow from source j to sink i
    if causal:
        t = _positions(nq, q)
        seen, emitted = a.tril(), a.triu()  # sinks read keys j <= i; source j counts sinks i <= j
        incoming = seen.sum(-1) + eps
        outgoing = emitted.sum(-2) + eps
        conserved_in = (seen * (t / outgoing).unsqueeze(-2)).sum(-1) / t
        conserved_out = (emitted * (t / incoming).unsqueeze(-1)).sum(-2) / t
        allocation = torch.sigmoid(conserved_in)
        e = _clamped_exp(conserved_out)
        competition = e / (e @ torch.ones(nk, nk, dtype=e.dtype, device=e.device).triu()) * t  # softmax over sources j' <= j
    else:
        seen = a
        incoming = a.sum(-1) + eps
        outgoing = a.sum(-2) + eps
        conserved_in = (a / outgoing.unsqueeze(-2)).sum(-1)
        conserved_out = (a / incoming.unsqueeze(-1)).sum(-2)
        allocation = torch.sigmoid(conserved_in * (nq / nk))
        competition = torch.softmax(conserved_out.clamp(-1.0, 1.0), dim=-1) * nk
    out = (seen / incoming.unsqueeze(-1)) @ (v * competition.unsqueeze(-1))
    return (allocation.unsqueeze(-1) * out).to(out_dtype)


# --------------------------------------------------------------------------------------------
# fast: flows as (cumulative) sums of features, the product on the linear-attention engine
# --------------------------------------------------------------------------------------------
def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot product over the feature axis: (B, H, N, F) x (B, H, N|1, F) -> (B, H, N)."""
    return (x * y).sum(-1)


@dataclass
class FlowState:
    """The causal recurrence's state after ``seen`` tokens, per batch entry and head: the running
    sums ``keys`` = sum phi(k_j), ``queries`` = sum phi(q_i), ``keys_out`` = sum phi(k_j) j / O_j,
    ``queries_in`` = sum phi(q_i) i / I_i (each (B, H, D)), ``exp_sum`` = sum exp(clamp(O^_j))
    (B, H), and ``kv`` = sum phi(k_j)^T c_j v_j (B, H, D, Dv). None before the first token."""

    seen: int = 0
    keys: Optional[Tensor] = None
    queries: Optional[Tensor] = None
    keys_out: Optional[Tensor] = None
    queries_in: Optional[Tensor] = None
    exp_sum: Optional[Tensor] = None
    kv: Optional[Tensor] = None


def _prefix(x: Tensor, carried: Optional[Tensor], dim: int = 2) -> Tensor:
    """Prefix sums of ``x`` along the tokens, starting from ``carried`` (the sum of the tokens before)."""
    sums = x.cumsum(dim)
    return sums if carried is None else sums + carried.unsqueeze(dim)


def _causal_step(q: Tensor, k: Tensor, v: Tensor, eps: float, chunk_size: int, state: FlowState) -> tuple[Tensor, FlowState]:
    """Causal flows of the tokens after ``state`` (phi applied; q and k at the same positions), and the state after them."""
    t = _positions(q.shape[2], q, state.seen)
    keys, queries = _prefix(k, state.keys), _prefix(q, state.queries)
    incoming = _dot(q, keys) + eps
    outgoing = _dot(k, queries) + eps
    keys_out = _prefix(k * (t / outgoing).unsqueeze(-1), state.keys_out)
    queries_in = _prefix(q * (t / incoming).unsqueeze(-1), state.queries_in)
    conserved_in, conserved_out = _dot(q, keys_out) / t, _dot(k, queries_in) / t
    e = _clamped_exp(conserved_out)
    exp_sum = _prefix(e, state.exp_sum, dim=-1)
    competition = e / exp_sum * t
    out, kv = chunked_scan(q / incoming.unsqueeze(-1), k, v * competition.unsqueeze(-1), state=state.kv, chunk_size=chunk_size)
    after = FlowState(
        state.seen + q.shape[2], keys[:, :, -1], queries[:, :, -1], keys_out[:, :, -1], queries_in[:, :, -1], exp_sum[..., -1], kv
    )
    return torch.sigmoid(conserved_in).unsqueeze(-1) * out, after


def _chunked(q, k, v, *, causal, eps, chunk_size):
    """O(N D) flows (sums, or prefix sums when causal), then ``chunked_form(phi(q) / I, phi(k), c v)``."""
    out_dtype = q.dtype
    q, k, v = _operands(q, k, v)
    if causal:
        return _causal_step(q, k, v, eps, chunk_size, FlowState())[0].to(out_dtype)
    nq, nk = q.shape[2], k.shape[2]
    incoming = _dot(q, k.sum(2, keepdim=True)) + eps
    outgoing = _dot(k, q.sum(2, keepdim=True)) + eps
    conserved_in = _dot(q, (k / outgoing.unsqueeze(-1)).sum(2, keepdim=True))
    conserved_out = _dot(k, (q / incoming.unsqueeze(-1)).sum(2, keepdim=True))
    allocation = torch.sigmoid(conserved_in * (nq / nk))
    competition = torch.softmax(conserved_out.clamp(-1.0, 1.0), dim=-1) * nk
    out = chunked_form(q / incoming.unsqueeze(-1), k, v * competition.unsqueeze(-1), causal=False)
    return (allocation.unsqueeze(-1) * out).to(out_dtype)


# --------------------------------------------------------------------------------------------
# decoding: the running sums, not a cache
# --------------------------------------------------------------------------------------------
class FlowDecoder:
    """Causal decoding from a :class:`FlowState`: the same step as the ``chunked`` backend, from the carried sums."""

    def init_state(self, problem: Problem, **params: Any) -> FlowState:
        return FlowState()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: FlowState, **params: Any) -> tuple[Tensor, FlowState]:
        if not params["causal"]:
            raise ParameterError(
                "flow: causal: decoding needs causal=True (a bidirectional output depends on later tokens)", argument="causal"
            )
        if q.shape[2] != k.shape[2]:
            raise ParameterError(f"flow: q: a decoding step takes one query per new key, got {q.shape[2]} and {k.shape[2]}", argument="q")
        out_dtype = q.dtype
        q, k, v = _operands(q, k, v)
        out, state = _causal_step(q, k, v, params["eps"], params["chunk_size"], state)
        return out.to(out_dtype), state


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark; state size
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is not None:
        params["chunk_size"] = rng.choice((1, 2, 3, 7, 16, 64))
        if rng.random() < 0.2:
            params["eps"] = rng.choice((1e-12, 1e-3))
    return params


def _state_size(head_dim: int, value_dim: Optional[int] = None, **params: Any) -> int:
    """D x Dv + 4 D + 1 per head (causal): sum phi(k)^T c v, four flow sums of feature vectors, the running sum of exp(O^)."""
    return head_dim * (head_dim if value_dim is None else value_dim) + 4 * head_dim + 1


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
FLOW = register(
    Mechanism(
        name="flow",
        family="linear",
        catalog=("F6",),
        paper="Flowformer (Wu et al., ICML 2022)",
        formula="out_i = sigmoid(I^_i Nq/Nk) sum_j (A_ij / I_i) softmax_j(O^)_j Nk v_j, A = sigmoid(Q) sigmoid(K)^T, I/O = row/column sums, ^ = conserved",
        cost="O(N D Dv) time, O(N (D + Dv)) memory (chunked); O(Nq Nk) (reference)",
        summary="linear attention with flow conservation: competition among sources (softmax), allocation to sinks (sigmoid); causal or not",
        patterns=frozenset({"noncausal_self", "causal_self", "noncausal_cross"}),
        params=FLOW_PARAMS,
        gqa=True,
        exact=True,
        decoder=FlowDecoder(),
        sample_params=_sample_params,
        check_params=_check_combination,
        state_size=_state_size,
    )
)
FLOW.add_backend(
    Backend(
        "reference",
        _reference,
        doc="the flow matrix A materialized, each equation read off it: the spec",
        priority=-100,
        materializes_scores=True,
    )
)
FLOW.add_backend(
    Backend("chunked", _chunked, doc="flows as (prefix) sums of features, the product on the chunked linear-attention engine", priority=50)
)


def flow_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, eps: float = 1e-6, chunk_size: int = 64, backend: Optional[str] = None
) -> Tensor:
    """Flow attention (Flowformer, Wu et al., ICML 2022, Sec. 3.2-3.3, eqs. 5-9; catalog F6).

    ::

        out_i = sigmoid(I^_i Nq/Nk) * sum_j (A_ij / I_i) * softmax_j(clamp(O^, -1, 1)) Nk * v_j

    with ``A_ij = sigmoid(q_i) . sigmoid(k_j)``, ``I``/``O`` its row/column sums (+ eps) and
    ``I^_i = sum_j A_ij / O_j``, ``O^_j = sum_i A_ij / I_i`` (the module docstring has the
    causal form).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        causal: the official causal variant (prefix flows rescaled by their length); Nq = Nk.
        eps: added to the incoming and outgoing flows.
        chunk_size: tokens per chunk of the causal ``chunked`` product.
        backend: force ``chunked`` (default) or ``reference``.

    Returns:
        (B, Hq, Nq, Dv) in the dtype of q (computed in float32 for half inputs).

    Cost: O(N D Dv) time, O(N (D + Dv)) memory on ``chunked``.

    Example::

        >>> q = k = v = torch.randn(1, 8, 4096, 64)
        >>> out = flow_attention(q, k, v, causal=True)
    """
    return FLOW(q, k, v, backend=backend, causal=causal, eps=eps, chunk_size=chunk_size)


FLOW.function = flow_attention
