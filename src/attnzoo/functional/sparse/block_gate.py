"""Attention over the blocks a gate scores above a threshold (catalog S2: SeerAttention's execution;
Gao et al., arXiv 2410.13276, Sec. 3).

SeerAttention learns a block gate (``attnzoo.nn.SeerAttentionGate``: pooled Q and K through small
per-head projections, a softmax over key blocks per query block, trained by distillation from the
max-pooled true attention); at inference the blocks whose gate probability exceeds ``threshold``
are attended exactly:

    out_i = sum_{j in blocks with score(I, J) > threshold} softmax_j(scale q_i . k_j) v_j

``block_scores`` (B or 1, H or 1, n_blocks, n_blocks) is any such score (the gate's probabilities, or another
router's); with ``causal`` the future blocks are dropped and the diagonal block is always kept, so
every query sees at least itself (SeerAttention keeps the last block-rows dense too; not done
here). Scores carry no gradient through the selection.

Backends: ``reference`` (dense mask); ``fused`` (the block grid as a plan for the C++ kernel,
O(tiles), block_size a multiple of 64); ``tiled``.
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import refuse_unless_right_padded
from ._params import PADDING_PARAM, native_backend, positive_int, sample_options
from ._select import attend_blocks, block_rows, dense_selection

__all__ = ["block_gate_attention", "BLOCK_GATE"]

_PADDING_WHY = "the score grid's blocks start at position 0, so pads before a sequence would move them"


def _check_scores(value: Any, p: Problem) -> Optional[str]:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 4 or value.device != p.device:
        return f"a floating (B, H, n_blocks, n_blocks) tensor on {p.device} (n_blocks = ceil(N / block_size))"
    return None


def _check_params(params: dict, p: Problem) -> Optional[tuple[str, str]]:
    scores, block = params.get("block_scores"), params.get("block_size")
    if isinstance(scores, Tensor) and isinstance(block, int) and block >= 1:
        blocks = (math.ceil(p.q_len / block), math.ceil(p.kv_len / block))
        if scores.dim() != 4 or tuple(scores.shape[2:]) != blocks or scores.shape[0] not in (1, p.batch) or scores.shape[1] not in (1, p.q_heads):
            want = f"({p.batch} or 1, {p.q_heads} or 1, {blocks[0]}, {blocks[1]})"
            return "block_scores", f"expected shape {want} for N={p.q_len} and block_size={block}, got {tuple(scores.shape)}"
    return None


GATE_PARAMS = (
    Param("block_scores", None, "required: (B, H, n_blocks, n_blocks) block scores (e.g. SeerAttentionGate's probabilities)", _check_scores, (None, "scores", torch.zeros(2)), "Tensor"),
    Param("threshold", 0.0, "blocks scoring above this are attended", lambda v, p: None if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "a finite number", ("0.5", float("nan"), True), "float"),
    Param("block_size", 64, "query and key block of the scores (multiples of 64 run on the fused kernel)", positive_int("tokens per block"), (0, -64, 1.5, "64"), "int"),
    flag("causal", False, "drop future blocks and keys; the diagonal block always kept"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


def gate_selection(block_scores: Tensor, threshold: float, causal: bool) -> Tensor:
    """(B, H, nqb, nkb) bool: blocks above the threshold (causal: no future block, the diagonal kept)."""
    keep = (block_scores.detach() > threshold) | block_scores.detach().isnan()  # a NaN score keeps its block (and shows)
    if causal:
        nqb, nkb = keep.shape[-2:]
        qb, kb = torch.arange(nqb, device=keep.device)[:, None], torch.arange(nkb, device=keep.device)[None, :]
        keep = (keep & (kb <= qb)) | (kb == qb)
    return keep


def _selection(block_scores: Tensor, threshold: float, causal: bool, q: Tensor) -> Tensor:
    """The selection at the inputs' batch and heads (scores given with batch or heads 1 broadcast)."""
    keep = gate_selection(block_scores, threshold, causal)
    return keep.expand(q.shape[0], q.shape[1], *keep.shape[2:])


def _reference(q, k, v, *, block_scores, threshold, block_size, causal, key_padding_mask, scale, return_lse):
    """The selected blocks as a dense mask over materialized scores: the spec."""
    refuse_unless_right_padded("block_gate", key_padding_mask, _PADDING_WHY)
    selected = _selection(block_scores, threshold, causal, q)
    allowed = dense_selection(block_rows(selected, block_size, q.shape[2]), block_size, k.shape[2], 0 if causal else None)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=allowed)
    return (out, lse) if return_lse else out


def _engine(name: str):
    def run(q, k, v, *, block_scores, threshold, block_size, causal, key_padding_mask, scale, return_lse):
        refuse_unless_right_padded("block_gate", key_padding_mask, _PADDING_WHY)
        selected = _selection(block_scores, threshold, causal, q)
        out, lse = attend_blocks(q, k, v, selected, block_size, causal=causal, key_padding_mask=key_padding_mask, scale=scale, engine=name)
        return (out, lse) if return_lse else out

    run.__name__ = f"_block_gate_{name}"
    return run


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    block = 64 if rng is None else rng.choice((1, 2, 5, 16, 64))
    batch = 1 if rng is None or rng.random() < 0.5 else p.batch  # plain: one score grid for the batch
    shape = (batch, p.q_heads, math.ceil(p.q_len / block), math.ceil(p.kv_len / block))
    gen = torch.Generator().manual_seed(0 if rng is None else rng.randrange(2**31))
    params: dict[str, Any] = {
        "block_scores": torch.rand(shape, generator=gen).to(device=p.device, dtype=p.dtype), "block_size": block,
        "threshold": 0.0 if rng is None else 0.5, "causal": pattern.startswith("causal"),  # plain: every block
    }
    return params if rng is None else sample_options(params, p, rng, right_only=True)


BLOCK_GATE = register(
    Mechanism(
        name="block_gate",
        family="sparse",
        catalog=("S2",),
        paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (Gao et al., 2024), Sec. 3",
        formula="out_i = sum_{j in blocks J with score(I, J) > threshold} softmax(scale q_i.k_j) v_j",
        cost="O(selected blocks * block^2 * D) (fused); O(N) memory",
        summary="attention over the blocks a gate (SeerAttention's learned AttnGate, or any router) scores above a threshold",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=GATE_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        check_params=_check_params,
    )
)
BLOCK_GATE.add_backend(Backend("reference", _reference, doc="the selected blocks as a dense mask: the spec", priority=-100, materializes_scores=True))
BLOCK_GATE.add_backend(native_backend("fused", _engine("fused"), "the block grid as a plan (O(tiles)) on the C++ block-sparse kernel"))
BLOCK_GATE.add_backend(Backend("tiled", _engine("tiled"), doc="the PyTorch FA2 engine over the selected blocks", priority=20, traceable=False))


def block_gate_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_scores: Tensor,
    threshold: float = 0.0,
    block_size: int = 64,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Exact attention over the blocks whose score exceeds ``threshold`` (SeerAttention's execution).

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        block_scores: (B, Hq, ceil(N / block_size), ceil(N / block_size)), e.g. the probabilities of
            :class:`attnzoo.nn.SeerAttentionGate`. threshold: keep blocks scoring above it.
        block_size: block of the scores. causal: no future block or key; the diagonal block kept.
        key_padding_mask, scale, return_lse: as softmax.

    Example::

        >>> gate = attnzoo.nn.SeerAttentionGate(num_heads=4, head_dim=64)
        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = block_gate_attention(q, k, v, block_scores=gate(q, k, causal=True), threshold=5e-3, causal=True)
    """
    return BLOCK_GATE(
        q, k, v, backend=backend, block_scores=block_scores, threshold=threshold, block_size=block_size, causal=causal,
        key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


BLOCK_GATE.function = block_gate_attention
BLOCK_GATE.decoder_refusal = "block_scores covers the blocks of the whole sequence: decode with softmax and the selected blocks as a mask"
