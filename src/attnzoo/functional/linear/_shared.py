"""What the mechanisms of the linear family share: operands, the three form backends, decoding.

A mechanism of this family is two functions around the engine (:mod:`attnzoo.kernels.linear_scan`):

* ``operands(q, k, v, params) -> Operands``: feature-mapped queries and keys, the values, the
  per-head log-decay or None, all in the compute dtype, and ``normalizer``: the engine then
  takes the values as ``[v, 1]`` and returns the numerator and the denominator in one pass
  (the C++ engine without building the column);
* ``finish(out, params, nq, nk) -> Tensor``: from the engine's output to the mechanism's (split
  the normalizer off and divide, RetNet's normalizations...); ``nk`` counts every key seen so
  far, which places the queries (bottom-right) when decoding.

:func:`add_form_backends` registers the ``chunked`` (Lightning Attention-2) and ``recurrent``
backends from these two, and :class:`ScanDecoder` decodes with a state instead of a cache.
The reference stays each mechanism's own: the formula written with materialized scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ...errors import ParameterError
from ...kernels.linear_scan import DEFAULT_CHUNK, SCAN_BLOCK, chunked_form, chunked_scan, native_scan_usable, parallel_scores, recurrent_form
from .._padding import refuse_unless_right_padded, sample_padding
from ...registry import DecodingState, Mechanism, Param, Problem

__all__ = [
    "Operands",
    "compute_dtype",
    "expand_heads",
    "divide_by_normalizer",
    "chunk_size_param",
    "add_form_backends",
    "ScanState",
    "ScanDecoder",
    "is_int",
    "key_padding_param",
    "padded_keys",
    "zero_padded",
    "visible_keys",
    "refuse_unless_right_padded",
    "sample_padding",
]

RECURRENT_NOTE = "a Python loop per token (the spec of the recurrence and the decoding form): chunked computes the same faster"


@dataclass(frozen=True)
class Operands:
    """What the engine attends with: ``q`` (B, H, Nq, F), ``k`` (B, H, Nk, F), ``v`` (B, H, Nk, Dv),
    ``log_decay`` (H,) or None, ``scale`` on every q . k (when it can stay outside the feature
    map: free in the GEMMs), ``dtype``, the dtype the output goes back to, and ``normalizer``:
    the values are ``[v, 1]``, so the output's last column is the denominator."""

    q: Tensor
    k: Tensor
    v: Tensor
    log_decay: Optional[Tensor]
    dtype: torch.dtype
    scale: float = 1.0
    normalizer: bool = False

    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments every form of the engine takes from these operands."""
        return {"log_decay": self.log_decay, "scale": self.scale, "normalizer": self.normalizer}


Prepare = Callable[[Tensor, Tensor, Tensor, dict], Operands]
Finish = Callable[[Tensor, dict, int, int], Tensor]
Fused = Callable[[Tensor, Tensor, Tensor, dict], Optional[Tensor]]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs: the state sums over the whole sequence, which bf16 cannot hold."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def expand_heads(x: Tensor, heads: int) -> Tensor:
    """Key/value heads repeated to the query heads (GQA/MQA): each query head keeps its own state."""
    group = heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


class _DivideByLastColumn(torch.autograd.Function):
    """``y = x[..., :-1] / (x[..., -1:] + eps)`` with a two-pass backward.

    Autograd of the sliced division measured 300 ms of a 1.7 s training step at N = 16384 (two
    zero-filled slice gradients and the division's own passes); here
    ``dx[..., :-1] = dy / d`` and ``dx[..., -1] = -sum(dy * y) / d``, written once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        denominator = x[..., -1:] + eps
        y = x[..., :-1] / denominator
        ctx.save_for_backward(y, denominator)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        y, denominator = ctx.saved_tensors
        dnum = dy / denominator
        dden = -(dnum * y).sum(-1, keepdim=True)
        return torch.cat([dnum, dden], dim=-1), None


def divide_by_normalizer(out: Tensor, eps: float) -> Tensor:
    """``out[..., :-1] / (out[..., -1:] + eps)`` for an output computed with ``normalizer`` (values ``[v, 1]``)."""
    return _DivideByLastColumn.apply(out, eps)


def _check_chunk_size(value: Any, p: Problem) -> Optional[str]:
    return None if is_int(value) and value >= 1 else "a positive int (tokens per chunk of the chunked backend)"


def chunk_size_param() -> Param:
    return Param(
        "chunk_size",
        DEFAULT_CHUNK,
        "tokens per chunk of the chunked backend (Lightning Attention-2's block size); any N, it need not divide",
        _check_chunk_size,
        (0, -64, 64.0, "64"),
        "int",
    )


# --------------------------------------------------------------------------------------------
# key padding: one parameter, one check and one way to drop keys for the whole family
# --------------------------------------------------------------------------------------------
PADDING_DOC = (
    "(B, Nk) bool, True = ignore that key (torch.nn.MultiheadAttention's convention); "
    "padded keys weigh nothing: their features are zeroed"
)


def _check_key_padding(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    expected = f"None or a bool tensor of shape (B={p.batch}, Nk={p.kv_len}) on {p.device} (True = ignore the key)"
    if not isinstance(value, Tensor) or value.dtype != torch.bool or tuple(value.shape) != (p.batch, p.kv_len) or value.device != p.device:
        return expected
    return None


def key_padding_param(doc: str = PADDING_DOC) -> Param:
    """The family's ``key_padding_mask`` parameter (checked here once for every mechanism)."""
    return Param(
        "key_padding_mask",
        None,
        doc,
        _check_key_padding,
        (torch.zeros(1, dtype=torch.bool), torch.zeros(1, 1), torch.zeros(1, 10**6, dtype=torch.bool)),
        "Tensor | None",
    )


def padded_keys(params: dict) -> Optional[Tensor]:
    """The call's ``key_padding_mask`` (B, Nk), or None (also for callers that never pass one)."""
    return params.get("key_padding_mask")


def zero_padded(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``x`` (B, H, Nk, F) with the rows of padded keys set to 0 (their gradient is 0 too).

    A zero feature row is a key that contributes nothing to ``phi(q) . sum_j phi(k_j)^T [v_j, 1]``,
    numerator and normalizer alike, in every form (parallel, chunked, recurrent, decayed or
    not): this is the whole of the family's padding. ``masked_fill`` rather than a product, so a
    non-finite value at a pad stays out of the sums.
    """
    return x if mask is None else x.masked_fill(mask[:, None, :, None], 0)


def visible_keys(mask: Optional[Tensor], n: int, like: Tensor) -> Tensor:
    """1 for a real key, 0 for a pad, (B|1, 1, Nk, 1) in ``like``'s dtype and device (all ones without a mask)."""
    if mask is None:
        return torch.ones(1, 1, n, 1, dtype=like.dtype, device=like.device)
    return (~mask).to(like.dtype)[:, None, :, None]


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
RECURRENT_MAX_QUERIES = 2048
RECURRENT_STEP_TOKENS = 4  # decoding steps of at most this many tokens run the recurrence  # the loop costs ~100 us per token: past this, chunked (same values) is the tool


def _not_preferred(problem: Problem, params: dict) -> Optional[str]:
    """A Python loop per token: for decoding and checking, never picked by dispatch."""
    return RECURRENT_NOTE


#: Elements of a (B, H, T, max(D, F, Dv)) slice of one piece of :func:`_causal_in_pieces`.
PIECE_ELEMENTS = 2**20 + 2**16  # 2048 tokens of 8 x 65 numbers: 32 chunks of 64, two scan blocks


def _needs_grad(q: Tensor, k: Tensor, v: Tensor, params: dict) -> bool:
    tensors = [q, k, v, *(x for x in params.values() if isinstance(x, Tensor))]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _piece_tokens(q: Tensor, v: Tensor, params: dict, features: int) -> int:
    """Tokens per piece: a multiple of the chunk size (the pieces then cut the same chunks as one
    pass), of SCAN_BLOCK chunks when that fits (the state scan then pads nothing), whose widest
    (B, H, T, .) tensor holds about PIECE_ELEMENTS numbers."""
    b, h, _, d = q.shape
    per_token = b * h * max(d, features, v.shape[-1] + 1)
    chunk = params["chunk_size"]
    step = chunk * SCAN_BLOCK if chunk * SCAN_BLOCK * per_token <= PIECE_ELEMENTS else chunk
    return max(chunk, PIECE_ELEMENTS // per_token // step * step)


def _causal_in_pieces(decoder: "ScanDecoder", q: Tensor, k: Tensor, v: Tensor, params: dict, tokens: int) -> Tensor:
    """The causal forward as decoding steps of ``tokens`` tokens, each from the previous state.

    Exact (the decoder's steps equal one pass; the conformance suite checks it), and faster
    without autograd: every temporary (feature maps, the normalizer column, the division) is
    made for one piece, a few MiB that the allocator reuses, instead of the whole sequence. At
    B H N D = 8 x 16384 x 64 in float32 each full-size temporary is 32 MiB, above glibc's
    largest mmap threshold, so it is mapped and page-faulted afresh on every call.
    """
    state = decoder.init_state(None, **params)  # type: ignore[arg-type]
    pieces = []
    for t0 in range(0, q.shape[2], tokens):
        piece, state = decoder.step(q[:, :, t0 : t0 + tokens], k[:, :, t0 : t0 + tokens], v[:, :, t0 : t0 + tokens], state, **params)
        pieces.append(piece)
    return torch.cat(pieces, dim=2)


def engine_weights(operands: Prepare, finish: Finish, q: Tensor, k: Tensor, v: Tensor, params: dict) -> tuple[Tensor, bool]:
    """``Mechanism.weights`` of the family (for attnzoo.hooks): the (B, H, Nq, Nk) matrix W with out = W v.

    W is ``finish`` applied to the engine's ``w_ij q_i . k_j`` taken as values (with their row sums
    as the normalizer column), which is exact when ``finish`` scales each row (the division,
    RetNet's normalizations): checked here against ``finish(w [v, 1])``. Where it is not (a norm
    over the channels, TransNormer's), the bare ``w`` comes back. The rows are a distribution
    when non-negative and summing to 1.
    """
    ops = operands(q, k, v, params)
    nq, nk = q.shape[2], k.shape[2]
    w = parallel_scores(ops.q, ops.k, causal=params.get("causal", False), log_decay=ops.log_decay, scale=ops.scale)

    def with_normalizer(x: Tensor) -> Tensor:
        return torch.cat([x, w.sum(-1, keepdim=True)], dim=-1) if ops.normalizer else x

    values = torch.cat([ops.v, torch.ones_like(ops.v[..., :1])], dim=-1) if ops.normalizer else ops.v
    try:
        rows = finish(with_normalizer(w), params, nq, nk)
        direct = finish(w @ values, params, nq, nk)
        exact = rows.shape == w.shape and torch.allclose(rows @ ops.v, direct, rtol=1e-4, atol=1e-6)
    except (RuntimeError, ValueError):  # a finish over the channels may not take Nk of them
        exact = False
    if not exact:
        return w, False
    sums = rows.sum(-1)
    return rows, bool((rows >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def add_form_backends(mech: Mechanism, operands: Prepare, finish: Finish, fused: Optional[Fused] = None) -> None:
    """Register ``chunked`` (the default) and ``recurrent`` on ``mech``; the mechanism registers its reference.

    A causal self-attention forward without autograd first tries ``fused(q, k, v, params)``,
    the whole mechanism in one call of the C++ kernel
    (:func:`~attnzoo.kernels.linear_scan.fused_causal_forward`; None when the inputs or the
    parameters are beyond it), else runs in pieces of tokens (:func:`_causal_in_pieces`; one
    pass with a ``key_padding_mask``); with autograd, one pass whose backward is tiled the same
    way. ``operands`` applies the padding mask (:func:`zero_padded` on phi(k)), so every form,
    the C++ kernel's included, sees the pads as zero keys.
    No torch.compile'd variant: fusing the element-wise work around the engine (feature maps,
    normalizer column, division) measured 0-10% faster warm at N = 16384 on the 2-core CPU,
    within the noise, for a 10-12 s first call per dtype and grad mode.
    """
    decoder = ScanDecoder(mech.name, operands, finish)
    if mech.weights is None:
        mech.weights = lambda q, k, v, **params: engine_weights(operands, finish, q, k, v, params)

    def chunked(q, k, v, **params):
        if params["causal"] and q.shape[2] == k.shape[2] and not _needs_grad(q, k, v, params):
            out = None if fused is None else fused(q, k, v, params)
            if out is not None:
                return out
            tokens = _piece_tokens(q, v, params, q.shape[-1])
            # with a padding mask: one pass (a mechanism's finish may need the whole mask, e.g. retention's normalize_decay)
            if q.shape[2] > tokens and padded_keys(params) is None:
                return _causal_in_pieces(decoder, q, k, v, params, tokens)
        ops = operands(q, k, v, params)
        out = chunked_form(ops.q, ops.k, ops.v, causal=params["causal"], chunk_size=params["chunk_size"], **ops.engine_args())
        return finish(out, params, q.shape[2], k.shape[2]).to(ops.dtype)

    def recurrent(q, k, v, **params):
        ops = operands(q, k, v, params)
        out, _ = recurrent_form(ops.q, ops.k, ops.v, causal=params["causal"], **ops.engine_args())
        return finish(out, params, q.shape[2], k.shape[2]).to(ops.dtype)

    mech.implementation(
        "chunked",
        doc="Lightning Attention-2 tiling: quadratic inside chunks of chunk_size tokens, a state across them; chunked backward; C++ on CPU (float32; bfloat16/float16 too in the fused forward)",
        priority=50,
    )(chunked)
    mech.implementation(
        "recurrent",
        doc="per-token state updates: S = gamma S + k^T v, out = q S",
        prefers=_not_preferred,
        max_q_len=RECURRENT_MAX_QUERIES,
        priority=0,
    )(recurrent)


# --------------------------------------------------------------------------------------------
# decoding: a state, not a cache
# --------------------------------------------------------------------------------------------
def refuse_padding_while_decoding(name: str, params: dict) -> None:
    """ParameterError naming ``key_padding_mask`` for a decoder whose running sums count every token
    it is given (positions, group boundaries): a pad would be silently counted."""
    if padded_keys(params) is not None:
        raise ParameterError(f"{name}: key_padding_mask: not supported while decoding (pass None; give only the real tokens)", argument="key_padding_mask")


@dataclass
class ScanState(DecodingState):
    """The decoding state: ``kv`` (B, H, F, Dv') = ``sum_j gamma^(t-1-j) phi(k_j)^T [v_j, 1]`` and
    ``seen``, the number of keys folded into it. Its size does not grow with the context; a
    step replaces ``kv`` (the forms return a new tensor), never writes into it."""

    kv: Optional[Tensor] = None
    seen: int = 0


class ScanDecoder:
    """Incremental decoding of a causal mechanism of the family: fold the new keys into the state.

    A step of at most RECURRENT_STEP_TOKENS tokens runs the recurrence, a longer one (or any one
    the C++ kernel takes: one call) the chunked form from the state (both exact); time and
    memory per token do not depend on how many tokens came before.
    """

    #: ``chunk_size`` changes only the rounding; the padding mask is about the step's own keys.
    per_step = frozenset({"chunk_size", "key_padding_mask"})

    def __init__(self, name: str, operands: Prepare, finish: Finish):
        self.name, self.operands, self.finish = name, operands, finish

    def init_state(self, problem: Problem, **params: Any) -> ScanState:
        return ScanState()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: ScanState, **params: Any) -> tuple[Tensor, ScanState]:
        if not params["causal"]:
            raise ParameterError(f"{self.name}: causal: decoding needs causal=True (a bidirectional output depends on later tokens)", argument="causal")
        if q.shape[2] > k.shape[2]:
            raise ParameterError(f"{self.name}: q: a decoding step takes at most as many queries as new keys, got {q.shape[2]} and {k.shape[2]}", argument="q")
        ops = self.operands(q, k, v, params)
        if k.shape[2] <= RECURRENT_STEP_TOKENS and not native_scan_usable(ops.q, ops.k, ops.v, state.kv, ops.log_decay):  # a few small ops a token
            out, kv = recurrent_form(ops.q, ops.k, ops.v, causal=True, state=state.kv, **ops.engine_args())
        else:  # the chunked form: ~30 ops a call, whatever its length
            out, kv = chunked_scan(ops.q, ops.k, ops.v, state=state.kv, chunk_size=params["chunk_size"], **ops.engine_args())
        after = dataclasses.replace(state, kv=kv, seen=state.seen + k.shape[2])
        return self.finish(out, params, q.shape[2], after.seen).to(ops.dtype), after
