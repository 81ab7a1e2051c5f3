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
from ...registry import Backend, DecodingState, Mechanism, Problem, flag, positive_number, register
from ._shared import chunk_size_param, compute_dtype, expand_heads, key_padding_param, refuse_padding_while_decoding, sample_padding, zero_padded

__all__ = ["flow_attention", "FLOW", "FlowState"]

FLOW_PARAMS = (
    flag("causal", False, "the official causal Flow-Attention: every flow over the prefix, rescaled by its length (Nq = Nk)"),
    dataclasses.replace(
        positive_number("eps", "added to the incoming and outgoing flows (their reciprocals are taken)", optional=False), default=1e-6
    ),
    chunk_size_param(),
    key_padding_param(
        "(B, Nk) bool, True = ignore that key (torch.nn.MultiheadAttention's convention): padded sources leave every flow, "
        "softmax and count; in self-attention (Nq = Nk) the same positions' queries leave the sinks too"
    ),
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


def _operands(q: Tensor, k: Tensor, v: Tensor, pad: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """sigmoid(q), sigmoid(k) and v in the compute dtype, key/value heads repeated (GQA); with
    ``pad``, the padded sources' features are zeroed, and in self-attention (Nq = Nk) the padded
    sinks' too (a pad query would otherwise draw flow from the real sources)."""
    dtype, heads = compute_dtype(q.dtype), q.shape[1]
    fq, fk = _phi(q.to(dtype)), _phi(expand_heads(k, heads).to(dtype))
    return zero_padded(fq, _sink_padding(pad, q.shape[2])), zero_padded(fk, pad), expand_heads(v, heads).to(dtype)


def _sink_padding(pad: Optional[Tensor], nq: int) -> Optional[Tensor]:
    """The padded queries: the keys' mask in self-attention (Nq = Nk), none in cross-attention."""
    return pad if pad is not None and pad.shape[1] == nq else None


def _real(pad: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """1 for a real token, 0 for a pad, (B, 1, N) in ``like``'s dtype; None without a mask."""
    return None if pad is None else (~pad).to(like.dtype).unsqueeze(1)


def _counts(pad: Optional[Tensor], n: int, like: Tensor) -> Tensor | int:
    """How many tokens a full sum runs over: N, or each sequence's real count (>= 1), (B, 1, 1)."""
    return n if pad is None else _real(pad, like).sum(-1, keepdim=True).clamp(min=1)


def _masked_softmax(x: Tensor, real: Optional[Tensor]) -> Tensor:
    """softmax over the last axis on the real tokens (0 at pads, and everywhere in a sequence
    with no real token). x is clamped to [-1, 1] by the caller, so exp cannot overflow."""
    if real is None:
        return torch.softmax(x, dim=-1)
    e = x.exp() * real
    return e / e.sum(-1, keepdim=True).clamp(min=torch.finfo(e.dtype).tiny)


def _positions(n: int, like: Tensor, start: int = 0, real: Optional[Tensor] = None) -> Tensor:
    """start + 1 .. start + n: each token's position, the number of terms of its prefix sums; with
    ``real`` (B, 1, N), the count of real tokens up to each one (B, 1, N), at least 1 (a pad's is unused)."""
    if real is None:
        return torch.arange(start + 1, start + n + 1, device=like.device, dtype=like.dtype)
    return (real.cumsum(-1) + start).clamp(min=1)


def _clamped_exp(conserved_out: Tensor) -> Tensor:
    """exp of the conserved outgoing flows clamped to [-1, 1] (the official code's clamp "for stability")."""
    return conserved_out.clamp(-1.0, 1.0).exp()


# --------------------------------------------------------------------------------------------
# reference: the equations read off the materialized flow matrix
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, causal, eps, chunk_size, key_padding_mask=None):
    """A = phi(Q) phi(K)^T materialized (pads' rows and columns 0); its row and column sums are the flows."""
    out_dtype = q.dtype
    q, k, v = _operands(q, k, v, key_padding_mask)
    nq, nk = q.shape[2], k.shape[2]
    real = _real(key_padding_mask, q)  # (B, 1, Nk) or None
    a = q @ k.transpose(-1, -2)  # (B, H, Nq, Nk): A_ij, flow from source j to sink i
    if causal:
        t = _positions(nq, q, real=real)
        seen, emitted = a.tril(), a.triu()  # sinks read keys j <= i; source j counts sinks i <= j
        incoming = seen.sum(-1) + eps
        outgoing = emitted.sum(-2) + eps
        conserved_in = (seen * (t / outgoing).unsqueeze(-2)).sum(-1) / t
        conserved_out = (emitted * (t / incoming).unsqueeze(-1)).sum(-2) / t
        allocation = torch.sigmoid(conserved_in)
        e = _clamped_exp(conserved_out)
        if real is not None:  # pads leave the running softmax; a pad's own share is 0
            e = e * real
        prefix = e @ torch.ones(nk, nk, dtype=e.dtype, device=e.device).triu()
        competition = e / (prefix if real is None else prefix.clamp(min=torch.finfo(e.dtype).tiny)) * t  # softmax over sources j' <= j
    else:
        seen = a
        incoming = a.sum(-1) + eps
        outgoing = a.sum(-2) + eps
        conserved_in = (a / outgoing.unsqueeze(-2)).sum(-1)
        conserved_out = (a / incoming.unsqueeze(-1)).sum(-2)
        sinks = _counts(_sink_padding(key_padding_mask, nq), nq, q)
        sources = _counts(key_padding_mask, nk, q)
        allocation = torch.sigmoid(conserved_in * (sinks / sources))
        competition = _masked_softmax(conserved_out.clamp(-1.0, 1.0), real) * sources
    out = (seen / incoming.unsqueeze(-1)) @ (v * competition.unsqueeze(-1))
    return (allocation.unsqueeze(-1) * out).to(out_dtype)


# --------------------------------------------------------------------------------------------
# fast: flows as (cumulative) sums of features, the product on the linear-attention engine
# --------------------------------------------------------------------------------------------
def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot product over the feature axis: (B, H, N, F) x (B, H, N|1, F) -> (B, H, N)."""
    return (x * y).sum(-1)


@dataclass
class FlowState(DecodingState):
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


def _causal_step(
    q: Tensor, k: Tensor, v: Tensor, eps: float, chunk_size: int, state: FlowState, real: Optional[Tensor] = None
) -> tuple[Tensor, FlowState]:
    """Causal flows of the tokens after ``state`` (phi applied, pads zeroed; q and k at the same
    positions), and the state after them. ``real`` (B, 1, N): 1 for a real token; the positions
    then count the real tokens, and the pads leave the running softmax."""
    t = _positions(q.shape[2], q, state.seen, real)
    keys, queries = _prefix(k, state.keys), _prefix(q, state.queries)
    incoming = _dot(q, keys) + eps
    outgoing = _dot(k, queries) + eps
    keys_out = _prefix(k * (t / outgoing).unsqueeze(-1), state.keys_out)
    queries_in = _prefix(q * (t / incoming).unsqueeze(-1), state.queries_in)
    conserved_in, conserved_out = _dot(q, keys_out) / t, _dot(k, queries_in) / t
    e = _clamped_exp(conserved_out)
    if real is not None:
        e = e * real
    exp_sum = _prefix(e, state.exp_sum, dim=-1)
    competition = e / (exp_sum if real is None else exp_sum.clamp(min=torch.finfo(e.dtype).tiny)) * t
    out, kv = chunked_scan(q / incoming.unsqueeze(-1), k, v * competition.unsqueeze(-1), state=state.kv, chunk_size=chunk_size)
    last = {"keys": keys[:, :, -1], "queries": queries[:, :, -1], "keys_out": keys_out[:, :, -1], "queries_in": queries_in[:, :, -1], "exp_sum": exp_sum[..., -1]}
    # copies of the last prefix sums: views would keep the step's whole (B, H, T, D) sums alive
    after = dataclasses.replace(state, seen=state.seen + q.shape[2], kv=kv, **{name: x.clone() for name, x in last.items()})
    return torch.sigmoid(conserved_in).unsqueeze(-1) * out, after


def _chunked(q, k, v, *, causal, eps, chunk_size, key_padding_mask=None):
    """O(N D) flows (sums, or prefix sums when causal), then ``chunked_form(phi(q) / I, phi(k), c v)``."""
    out_dtype = q.dtype
    q, k, v = _operands(q, k, v, key_padding_mask)
    real = _real(key_padding_mask, q)
    if causal:
        return _causal_step(q, k, v, eps, chunk_size, FlowState(), real)[0].to(out_dtype)
    nq, nk = q.shape[2], k.shape[2]
    incoming = _dot(q, k.sum(2, keepdim=True)) + eps
    outgoing = _dot(k, q.sum(2, keepdim=True)) + eps
    conserved_in = _dot(q, (k / outgoing.unsqueeze(-1)).sum(2, keepdim=True))
    conserved_out = _dot(k, (q / incoming.unsqueeze(-1)).sum(2, keepdim=True))
    sinks = _counts(_sink_padding(key_padding_mask, nq), nq, q)
    sources = _counts(key_padding_mask, nk, q)
    allocation = torch.sigmoid(conserved_in * (sinks / sources))
    competition = _masked_softmax(conserved_out.clamp(-1.0, 1.0), real) * sources
    out = chunked_form(q / incoming.unsqueeze(-1), k, v * competition.unsqueeze(-1), causal=False)
    return (allocation.unsqueeze(-1) * out).to(out_dtype)


# --------------------------------------------------------------------------------------------
# decoding: the running sums, not a cache
# --------------------------------------------------------------------------------------------
class FlowDecoder:
    """Causal decoding from a :class:`FlowState`: the same step as the ``chunked`` backend, from the carried sums.

    ``causal`` and ``eps`` are bound at init_state; each step makes a new state."""

    per_step = frozenset({"chunk_size", "key_padding_mask"})

    def init_state(self, problem: Problem, **params: Any) -> FlowState:
        return FlowState()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: FlowState, **params: Any) -> tuple[Tensor, FlowState]:
        if not params["causal"]:
            raise ParameterError(
                "flow: causal: decoding needs causal=True (a bidirectional output depends on later tokens)", argument="causal"
            )
        if q.shape[2] != k.shape[2]:
            raise ParameterError(f"flow: q: a decoding step takes one query per new key, got {q.shape[2]} and {k.shape[2]}", argument="q")
        refuse_padding_while_decoding("flow", params)
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
        params["key_padding_mask"] = sample_padding(p, rng)
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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
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
        key_padding_mask: (B, Nk) bool, **True = ignore that key**: padded sources leave every
            flow, the competition softmax and the counts (Nk, the causal positions t). In
            self-attention (Nq = Nk) the same positions are taken as padded sinks too (their
            features zeroed, Nq counting the real ones), so a padded batch equals each sequence
            alone on its real rows, on either side. A padded query row outputs 0; a sequence
            with no real key outputs 0. A decoding step refuses it (ParameterError).
        backend: force ``chunked`` (default) or ``reference``.

    Returns:
        (B, Hq, Nq, Dv) in the dtype of q (computed in float32 for half inputs).

    Cost: O(N D Dv) time, O(N (D + Dv)) memory on ``chunked``.

    Example::

        >>> q = k = v = torch.randn(1, 8, 4096, 64)
        >>> out = flow_attention(q, k, v, causal=True)
    """
    return FLOW(q, k, v, backend=backend, causal=causal, eps=eps, chunk_size=chunk_size, key_padding_mask=key_padding_mask)


FLOW.function = flow_attention
