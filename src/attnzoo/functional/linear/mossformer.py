"""Joint chunk attention: relu^2 attention inside groups plus linear attention across them (catalog F10).

FLASH's *mixed chunk attention* (Hua et al., ICML 2022, "Transformer Quality in Linear Time",
Sec. 3.2), the attention of MossFormer's gated single-head block (Zhao & Ma, ICASSP 2023,
"MossFormer: ... Gated Single-Head Transformer with Convolution-Augmented Joint
Self-Attentions", Sec. 2: quadratic attention over local chunks joined with linear attention
over the whole sequence). The tokens are cut into groups of ``g = group_size`` consecutive
tokens (the last may be shorter); with c(i) the group of token i, N the sequence length:

non-causal::

    out_i = sum_(j in c(i))  relu(q_i . k_j / g)^2 v_j   +   (1/N) sum_(j=1..N) (lq_i . lk_j) v_j

causal::

    out_i = sum_(j in c(i), j <= i)  relu(q_i . k_j / g)^2 v_j   +   (1/g) sum_(j before c(i)) (lq_i . lk_j) v_j

q, k are the quadratic operands, ``lq = linear_q`` and ``lk = linear_k`` the linear ones (FLASH
and MossFormer derive all four from one shared base by per-dim scale and offset; that lives in
:class:`attnzoo.nn.linear.mossformer.MossFormerAttention`, the functional form takes the tensors,
``linear_q``/``linear_k`` defaulting to q and k). The scalings are the official code's
(modelscope/ClearerVoice-Studio and alibabasglab/MossFormer2, ``FLASH_ShareA_FFConvM.cal_attention``,
after lucidrains' FLASH-pytorch): scores divided by the group size g before relu^2; the linear
term divided by N (the unpadded length) when non-causal, by g when causal, where each group reads
the *exclusive* cumulative sum of the previous groups' lk^T v (its own group is the quadratic
part's, masked to j <= i).

Padding: the official code zero-pads the last group to g tokens and masks the padded keys. A
zero key scores relu(0)^2 = 0 and a zero value adds nothing to lk^T v, so the padding changes
nothing either way: here the last group is simply shorter (the ``chunked`` backend pads with
zeros, which is exact for the same reason) and the scalings keep g and N as above, exactly as
there. The official attention-weight dropout is not part of the functional form.

Cost: O(N g D) for the quadratic part (N/g groups of g x g scores) and O(N D Dv) for the linear
part: ``chunked`` runs the groups as one batched GEMM and the linear part as one sum (or a
cumulative sum over groups when causal; memory O(N g + (N/g) D Dv)); ``reference`` materializes
the whole (N, N) weight matrix (block-diagonal relu^2 part plus the dense linear part).

Causal decoding (``init_state``/``step``) carries :class:`JointChunkState`: the linear state of
the complete groups, the partial sum of the current group and the current group's keys and
values (fewer than g tokens): 2 D Dv + (g - 1)(D + Dv) numbers per head, whatever the context.
Self-attention only (queries and keys are one sequence cut into the same groups).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ParameterError
from ...registry import Backend, DecodingState, Mechanism, Param, Problem, flag, register
from ._shared import compute_dtype, expand_heads, is_int, key_padding_param, refuse_padding_while_decoding, refuse_unless_right_padded, sample_padding, visible_keys, zero_padded

__all__ = ["joint_chunk_attention", "JOINT_CHUNK", "JointChunkState"]

#: the official group size (MossFormer and MossFormer2, ``group_size=256``).
DEFAULT_GROUP_SIZE = 256


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _check_group_size(value: Any, p: Problem) -> Optional[str]:
    return None if is_int(value) and value >= 1 else "a positive int (tokens per group of the quadratic part)"


def _operand_check(like: str):
    """None, or a tensor shaped, typed and placed like ``like`` (``"q"`` or ``"k"``)."""

    def check(value: Any, p: Problem) -> Optional[str]:
        heads, length = (p.q_heads, p.q_len) if like == "q" else (p.kv_heads, p.kv_len)
        shape = (p.batch, heads, length, p.head_dim)
        expected = f"None or a {str(p.dtype).replace('torch.', '')} tensor shaped like {like}, {shape}, on {p.device}"
        if value is None:
            return None
        if not isinstance(value, Tensor) or value.dtype != p.dtype or value.device != p.device or tuple(value.shape) != shape:
            return expected
        return None

    return check


JOINT_CHUNK_PARAMS = (
    Param(
        "group_size",
        DEFAULT_GROUP_SIZE,
        "g, tokens per group: relu^2 attention inside each group (scores / g), linear attention across groups; any N, the last group may be shorter",
        _check_group_size,
        (0, -4, 2.5, "256", True),
        "int",
    ),
    flag("causal", False, "quadratic part masked to j <= i, linear part over the previous groups only (exclusive cumulative sum, / g)"),
    Param(
        "linear_q",
        None,
        "the linear part's queries lq, shaped like q; None: q itself",
        _operand_check("q"),
        (torch.zeros(3), torch.zeros(1, 1, 1, 1), "q"),
        "Tensor | None",
    ),
    Param(
        "linear_k",
        None,
        "the linear part's keys lk, shaped like k; None: k itself",
        _operand_check("k"),
        (torch.zeros(3), torch.zeros(1, 1, 1, 1), "k"),
        "Tensor | None",
    ),
    key_padding_param(
        "(B, N) bool, True = ignore that key (torch.nn.MultiheadAttention's convention): padded values are zeroed and "
        "the non-causal 1/N counts the real tokens; padding on the right only (the groups are cut from position 0)"
    ),
)
_PADDING_WHY = "the groups are cut from position 0 of the padded sequence, so pads before a real token move its group boundaries"


def _operands(
    q: Tensor, k: Tensor, v: Tensor, linear_q: Optional[Tensor], linear_k: Optional[Tensor], pad: Optional[Tensor] = None
) -> tuple[Tensor, ...]:
    """q, k, v, lq, lk in the compute dtype, key/value heads repeated to the query heads (GQA).

    A padded key's value is zeroed: both parts weigh v_j (relu^2 scores and lq . lk), so a zero
    value removes the key from the quadratic sum and from the linear state alike."""
    dtype, heads = compute_dtype(q.dtype), q.shape[1]
    lq = q if linear_q is None else linear_q
    lk = k if linear_k is None else linear_k
    k, v, lk = (expand_heads(t, heads).to(dtype) for t in (k, v, lk))
    return q.to(dtype), k, zero_padded(v, pad), lq.to(dtype), lk


def _real_length(n: int, pad: Optional[Tensor], like: Tensor) -> Tensor:
    """N for the non-causal linear part's 1/N: the real tokens of each sequence (at least 1), (B|1, 1, 1, 1)."""
    return visible_keys(pad, n, like).sum(2, keepdim=True).clamp(min=1)


# --------------------------------------------------------------------------------------------
# reference: the (N, N) weight matrix materialized
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, group_size, causal, linear_q, linear_k, key_padding_mask=None):
    """W = relu(q k^T / g)^2 on the group blocks + c (lq lk^T) on the linear pairs; out = W v."""
    refuse_unless_right_padded("joint_chunk", key_padding_mask, _PADDING_WHY)
    out_dtype = q.dtype
    q, k, v, lq, lk = _operands(q, k, v, linear_q, linear_k, key_padding_mask)
    n, g = q.shape[2], group_size
    pos = torch.arange(n, device=q.device)
    group = pos // g
    same_group = group[:, None] == group[None, :]
    if causal:
        quadratic_pairs = same_group & (pos[:, None] >= pos[None, :])
        linear_pairs, linear_scale = group[:, None] > group[None, :], 1.0 / g
    else:
        quadratic_pairs = same_group
        linear_pairs, linear_scale = torch.ones_like(same_group), 1.0 / _real_length(n, key_padding_mask, q)
    quadratic = torch.relu(q @ k.transpose(-1, -2) / g).square()
    linear = (lq @ lk.transpose(-1, -2)) * linear_scale
    zero = quadratic.new_zeros(())
    weights = torch.where(quadratic_pairs, quadratic, zero) + torch.where(linear_pairs, linear, zero)
    return (weights @ v).to(out_dtype)


# --------------------------------------------------------------------------------------------
# fast: one batched GEMM over the groups, the linear part as a (cumulative) sum
# --------------------------------------------------------------------------------------------
def _grouped(x: Tensor, g: int) -> Tensor:
    """(B, H, N, F) -> (B, H, ceil(N/g), g, F), the last group zero-padded (zero keys and values weigh nothing)."""
    pad = -x.shape[2] % g
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(2, (-1, g))


def _quadratic_part(q: Tensor, k: Tensor, v: Tensor, g: int, causal: bool) -> Tensor:
    """sum_(j in c(i)[, j <= i]) relu(q_i . k_j / g)^2 v_j, grouped: (B, H, G, g, Dv).

    1/g scales q (N x D numbers) rather than the scores (N x g); without autograd the relu, the
    square and the mask run in place on the one (B, H, G, g, g) score tensor.
    """
    scores = _grouped(q / g, g) @ _grouped(k, g).transpose(-1, -2)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        weights = torch.relu(scores).square()
        weights = weights.tril() if causal else weights
    else:
        weights = scores.relu_().square_()
        weights = weights.tril_() if causal else weights
    return weights @ _grouped(v, g)


def _linear_part_causal(lq: Tensor, lk: Tensor, v: Tensor, g: int) -> Tensor:
    """(1/g) lq_i . sum_(j in earlier groups) lk_j^T v_j, grouped: each group reads the exclusive prefix of group states."""
    group_states = _grouped(lk, g).transpose(-1, -2) @ _grouped(v, g)  # (B, H, G, D, Dv)
    earlier = group_states.cumsum(2) - group_states  # exclusive: the groups before this one
    return _grouped(lq, g) @ (earlier / g)


def _chunked(q, k, v, *, group_size, causal, linear_q, linear_k, key_padding_mask=None):
    """Groups as one batched GEMM of (g, g) relu^2 scores; linear part as lq (lk^T v) / N, or its causal per-group prefix / g."""
    refuse_unless_right_padded("joint_chunk", key_padding_mask, _PADDING_WHY)
    out_dtype = q.dtype
    q, k, v, lq, lk = _operands(q, k, v, linear_q, linear_k, key_padding_mask)
    n, g = q.shape[2], group_size
    out = _quadratic_part(q, k, v, g, causal)
    if causal:
        out = out + _linear_part_causal(lq, lk, v, g)
        return out.flatten(2, 3)[:, :, :n].to(out_dtype)
    out = out.flatten(2, 3)[:, :, :n]
    return (out + lq @ (lk.transpose(-1, -2) @ v / _real_length(n, key_padding_mask, v))).to(out_dtype)


# --------------------------------------------------------------------------------------------
# decoding: the complete groups' linear state, the current group's keys
# --------------------------------------------------------------------------------------------
@dataclass
class JointChunkState(DecodingState):
    """After ``seen`` tokens, per batch entry and head: ``before`` = sum of lk_j^T v_j over the
    complete groups (B, H, D, Dv), ``current`` = the same sum over the current, incomplete group,
    and that group's quadratic keys ``keys`` (B, H, m, D) and ``values`` (B, H, m, Dv), m < g.
    None before the first token."""

    seen: int = 0
    before: Optional[Tensor] = None
    current: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    values: Optional[Tensor] = None


def _append(cache: Optional[Tensor], new: Tensor) -> Tensor:
    # a copy either way: a view of the step's input would keep the whole input alive in the state
    return new.clone() if cache is None else torch.cat([cache, new], dim=2)


def _add(total: Optional[Tensor], term: Tensor) -> Tensor:
    return term if total is None else total + term


def _step_within_group(q, k, v, lq, lk, g: int, state: JointChunkState) -> tuple[Tensor, JointChunkState]:
    """Tokens that all fall in the current group: attend to its keys so far, read the earlier
    groups' state; returns the outputs and a new state (``state`` is not changed)."""
    keys, values = _append(state.keys, k), _append(state.values, v)
    weights = torch.relu(q @ keys.transpose(-1, -2) / g).square()
    weights = weights.tril(keys.shape[2] - q.shape[2])  # query t sees the group's keys up to itself (bottom-right)
    out = weights @ values
    if state.before is not None:
        out = out + lq @ (state.before / g)
    current, seen = _add(state.current, lk.transpose(-1, -2) @ v), state.seen + q.shape[2]
    if seen % g == 0:  # the group is complete: fold it into the linear state
        return out, dataclasses.replace(state, seen=seen, before=_add(state.before, current), current=None, keys=None, values=None)
    return out, dataclasses.replace(state, seen=seen, current=current, keys=keys, values=values)


class JointChunkDecoder:
    """Causal decoding: each step is cut at group boundaries; within a group, relu^2 over the group's keys plus the linear state.

    ``group_size`` and ``causal`` are bound at init_state; ``linear_q``/``linear_k`` are the
    step's own tokens' operands. Each step makes a new state."""

    per_step = frozenset({"linear_q", "linear_k", "key_padding_mask"})

    def init_state(self, problem: Problem, **params: Any) -> JointChunkState:
        return JointChunkState()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: JointChunkState, **params: Any) -> tuple[Tensor, JointChunkState]:
        if not params["causal"]:
            raise ParameterError(
                "joint_chunk: causal: decoding needs causal=True (a bidirectional output depends on later tokens)", argument="causal"
            )
        refuse_padding_while_decoding("joint_chunk", params)
        out_dtype, g = q.dtype, params["group_size"]
        q, k, v, lq, lk = _operands(q, k, v, params["linear_q"], params["linear_k"])
        outs, start = [], 0
        while start < q.shape[2]:
            stop = min(q.shape[2], start + g - state.seen % g)  # to the end of the current group
            part = slice(start, stop)
            out, state = _step_within_group(q[:, :, part], k[:, :, part], v[:, :, part], lq[:, :, part], lk[:, :, part], g, state)
            outs.append(out)
            start = stop
        return torch.cat(outs, dim=2).to(out_dtype), state


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark; state size
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    """Random group sizes (most smaller than N) and separate linear operands half the time, with ``rng``; the defaults without."""
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    params["group_size"] = rng.choice((1, 2, 3, 5, 8, 16, 64, 256))
    if rng.random() < 0.5:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        for name, heads in (("linear_q", p.q_heads), ("linear_k", p.kv_heads)):
            params[name] = torch.randn(p.batch, heads, p.q_len, p.head_dim, generator=gen).to(device=p.device, dtype=p.dtype)
    params["key_padding_mask"] = sample_padding(p, rng, right_only=True)
    return params


def _state_size(head_dim: int, value_dim: Optional[int] = None, group_size: int = DEFAULT_GROUP_SIZE, **params: Any) -> int:
    """2 D Dv + (g - 1)(D + Dv) per head (causal): the linear state of the complete groups and of the current one, and the current group's keys and values."""
    dv = head_dim if value_dim is None else value_dim
    return 2 * head_dim * dv + (group_size - 1) * (head_dim + dv)


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
JOINT_CHUNK = register(
    Mechanism(
        name="joint_chunk",
        family="linear",
        catalog=("F10",),
        paper="MossFormer (Zhao & Ma, ICASSP 2023); FLASH mixed chunk attention (Hua et al., ICML 2022, Sec. 3.2)",
        formula="out_i = sum_(j in group(i)) relu(q_i.k_j / g)^2 v_j + c lq_i . sum_j lk_j^T v_j; c = 1/N over all j, or (causal) 1/g over earlier groups, j <= i in the group",
        cost="O(N g D + N D Dv) time, O(N g + (N/g) D Dv) memory (chunked); O(N^2) (reference)",
        summary="relu^2 attention inside groups of g tokens joined with linear attention across the sequence (MossFormer / FLASH); causal or not",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=JOINT_CHUNK_PARAMS,
        gqa=True,
        exact=True,
        decoder=JointChunkDecoder(),
        sample_params=_sample_params,
        state_size=_state_size,
    )
)
JOINT_CHUNK.add_backend(
    Backend(
        "reference",
        _reference,
        doc="the (N, N) weight matrix materialized: block-diagonal relu^2 part plus the linear part, then W v: the spec",
        priority=-100,
        materializes_scores=True,
    )
)
JOINT_CHUNK.add_backend(
    Backend(
        "chunked",
        _chunked,
        doc="relu^2 scores of all groups in one batched GEMM; linear part as one sum (causal: exclusive cumulative sum over groups)",
        priority=50,
    )
)


def joint_chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    causal: bool = False,
    linear_q: Optional[Tensor] = None,
    linear_k: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Joint chunk attention: MossFormer's joint local/global attention, FLASH's mixed chunk
    attention (catalog F10; Zhao & Ma, ICASSP 2023, Sec. 2; Hua et al., ICML 2022, Sec. 3.2).

    ::

        non-causal: out_i = sum_(j in c(i)) relu(q_i . k_j / g)^2 v_j + (1/N) sum_j (lq_i . lk_j) v_j
        causal:     out_i = sum_(j in c(i), j <= i) relu(q_i . k_j / g)^2 v_j + (1/g) sum_(j in groups before c(i)) (lq_i . lk_j) v_j

    with c(i) the group of ``g = group_size`` consecutive tokens holding token i (the last group
    may be shorter: the official zero padding weighs nothing), ``lq``/``lk`` the linear operands.
    Scalings as in the official code (``FLASH_ShareA_FFConvM.cal_attention``).

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        group_size: g, tokens per group (the official models: 256); need not divide N.
        causal: mask the group to j <= i and read only the earlier groups' linear state.
        linear_q: lq, shaped like q; None: q. linear_k: lk, shaped like k; None: k.
        key_padding_mask: (B, N) bool, **True = ignore that key**: its value is zeroed (it
            weighs nothing in either part) and the non-causal 1/N counts the real tokens, so a
            batch padded on the right equals each sequence alone on its real rows. Padding on
            the left is refused (the groups are cut from position 0), and so is a mask at a
            decoding step (ParameterError).
        backend: force ``chunked`` (default) or ``reference``.

    Returns:
        (B, Hq, N, Dv) in the dtype of q (computed in float32 for half inputs).

    Cost: O(N g D + N D Dv) time on ``chunked``; decoding keeps 2 D Dv + (g - 1)(D + Dv) numbers per head.

    Example::

        >>> q, k, lq, lk = torch.randn(4, 1, 1, 4096, 128).unbind(0)   # one head, as MossFormer
        >>> v = torch.randn(1, 1, 4096, 512)
        >>> out = joint_chunk_attention(q, k, v, linear_q=lq, linear_k=lk, group_size=256)
    """
    return JOINT_CHUNK(
        q, k, v, backend=backend, group_size=group_size, causal=causal, linear_q=linear_q, linear_k=linear_k, key_padding_mask=key_padding_mask
    )


JOINT_CHUNK.function = joint_chunk_attention
