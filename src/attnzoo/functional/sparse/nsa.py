"""NSA: Native Sparse Attention (catalog S2; Yuan et al., DeepSeek, arXiv 2502.11089, Sec. 3.3, Eq. 5-11).

Three branches over the same causal context, mixed by per-query gates (Eq. 5):

    o_t = g_cmp * Attn(q_t, K_cmp, V_cmp) + g_slc * Attn(q_t, K_slc, V_slc) + g_win * Attn(q_t, K_win, V_win)

* compression (Eq. 7): blocks of ``compress_block`` keys every ``compress_stride`` tokens, each
  compressed to one key and one value; a query sees the compressed blocks wholly in its past.
  The paper's compressor phi is a learnable MLP with intra-block position encoding:
  :class:`attnzoo.nn.NativeSparseAttention` learns it and passes its output as ``compressed_kv``;
  without it phi is the mean of the block (fla's naive NSA does the same).
* selection (Eq. 8-11): the compression branch's attention probabilities, summed over the heads of
  a GQA group (Eq. 10, one choice per key head) and over the compressed blocks overlapping each
  selection block of ``block_size`` keys (Eq. 9; the paper's indexing assumes its sizes, this sums
  each overlapping compressed block once, and equals it when the sizes are equal, as in fla), give
  block importance; the ``top_n`` most important blocks are attended in full (causal), the first
  block and the two local blocks (current, previous) always among them (the paper's "1 initial
  and 2 local").
* sliding window (Sec. 3.3.3): the last ``window`` keys.

``gates`` (B, H, N, 3) are the g_c in [0, 1] (the paper's sigmoid of an MLP of the input; the module
makes them); None weighs every branch 1. Selection in float64 in every backend, ties to the lowest
block index. Causal self-attention only; right padding only.

Backends: ``reference`` (each branch as a dense mask over materialized scores, importance block
by block); ``fused`` (compression materialized over N x N/stride, the selected (query, block) pairs on the
C++ gathered-rows kernel, the window on the block-sparse kernel).
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels import block_sparse
from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, positive_number, register
from .._padding import refuse_unless_right_padded
from ._params import PADDING_PARAM, native_backend, positive_int, sample_options
from ._select import NEG_INF, attend_row_blocks, dense_selection, softmax_lse, sorted_top_k_mask, top_k_mask
from .._prefix_decoder import PrefixDecoder

__all__ = ["nsa_attention", "NSA"]

_PADDING_WHY = "NSA's compressed and selected blocks start at position 0, so pads before a sequence would move them"


def compressed_count(n: int, compress_block: int, compress_stride: int) -> int:
    """Complete compressed blocks [i * stride, i * stride + block) in a sequence of ``n`` tokens."""
    return max(0, (n - compress_block) // compress_stride + 1)


def _check_compressed(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    want = f"None or (k_cmp, v_cmp): floating tensors (B={p.batch}, Hkv={p.kv_heads}, n_cmp, D={p.head_dim} / Dv={p.value_dim}) on {p.device}"
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 4 for t in value)):
        return want
    k_cmp, v_cmp = value
    if k_cmp.shape[:3] != v_cmp.shape[:3] or tuple(k_cmp.shape[:2]) != (p.batch, p.kv_heads) or k_cmp.shape[-1] != p.head_dim or v_cmp.shape[-1] != p.value_dim or k_cmp.device != p.device or v_cmp.device != p.device:
        return want
    return None


def _check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    given = bound.get("compressed_kv")
    if given is not None:
        want = compressed_count(p.kv_len, bound["compress_block"], bound["compress_stride"])
        if given[0].shape[2] != want:
            return "compressed_kv", (
                f"expected {want} compressed blocks ((N - compress_block) // compress_stride + 1 for N={p.kv_len}), got {given[0].shape[2]}"
            )
    return None


def _check_gates(value: Any, p: Problem) -> Optional[str]:
    if value is None:
        return None
    want = (p.batch, p.q_heads, p.q_len, 3)
    if not isinstance(value, Tensor) or not value.is_floating_point() or tuple(value.shape) != want or value.device != p.device:
        return f"None or a floating tensor of shape {want} on {p.device} (the three branch gates)"
    return None


NSA_PARAMS = (
    Param("gates", None, "(B, H, N, 3) gates of the compression, selection and window branches; None: 1 each", _check_gates, ("g", torch.zeros(1, 3)), "Tensor | None"),
    Param(
        "compressed_kv", None, "(k_cmp, v_cmp) (B, Hkv, n_cmp, D / Dv): a learned compressor's blocks (nn.NativeSparseAttention); None: block means",
        _check_compressed, ("kv", (torch.zeros(1),), [torch.zeros(1, 1, 1, 1)]), "tuple[Tensor, Tensor] | None",
    ),
    Param("block_size", 64, "selection block l' (the paper's 64)", positive_int("keys per selection block"), (0, -64, 1.5, "64"), "int"),
    Param("compress_block", 32, "compression block l (the paper's 32)", positive_int("keys per compressed block"), (0, -32, 1.5, "32"), "int"),
    Param("compress_stride", 16, "compression stride d (the paper's 16)", positive_int("tokens between compressed blocks"), (0, -16, 1.5, "16"), "int"),
    Param("top_n", 16, "selected blocks per query, the first and two local blocks included (the paper's 16)", positive_int("selected blocks"), (0, -1, 1.5, "16"), "int"),
    Param("window", 512, "sliding-window branch: keys t - window + 1 .. t (the paper's 512)", positive_int("window keys"), (0, -1, 1.5, "512"), "int"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
)


#: Up to this many (query, compressed block) scores per (batch, head), the selection scores are
#: float64 (every backend then selects exactly as the reference); above, float32 (half the memory
#: and time of the largest step at N = 16384; a block whose importance ties another within float32
#: rounding may then be chosen differently).
FLOAT64_SCORES_MAX = 1 << 22


# --------------------------------------------------------------------------------------------
# compression branch
# --------------------------------------------------------------------------------------------
def _compressed(
    k: Tensor, v: Tensor, block: int, stride: int, key_padding_mask: Optional[Tensor], given: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Compressed keys and values of the complete blocks [b * stride, b * stride + block) (``given``
    by a learned compressor, else the means over real keys), and (n_cmp,) each block's last position."""
    n = k.shape[2]
    count = compressed_count(n, block, stride)
    ends = torch.arange(count, device=k.device) * stride + block - 1
    if given is not None:
        return given[0], given[1], ends
    if count == 0:
        return k[:, :, :0], v[:, :, :0], ends
    real = torch.ones(k.shape[0], n, dtype=k.dtype, device=k.device) if key_padding_mask is None else (~key_padding_mask).to(k.dtype)
    windows = lambda x: x.unfold(2, block, stride)[:, :, :count]  # noqa: E731 - (B, H, n_cmp, D, block)
    w = real.unfold(1, block, stride)[:, :count]  # (B, n_cmp, block)
    denom = w.sum(-1).clamp(min=1)[:, None, :, None]
    k_cmp = (windows(k) * w[:, None, :, None, :]).sum(-1) / denom
    v_cmp = (windows(v) * w[:, None, :, None, :]).sum(-1) / denom
    return k_cmp, v_cmp, ends


def _compression_branch(
    q: Tensor, k: Tensor, v: Tensor, *, compress_block: int, compress_stride: int, compressed_kv: Optional[tuple[Tensor, Tensor]],
    key_padding_mask: Optional[Tensor], scale: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, probabilities (B, H, N, n_cmp) without gradient, block ends). One score matrix for
    both; the selection reads it in float64 up to :data:`FLOAT64_SCORES_MAX` scores, else float32."""
    k_cmp, v_cmp, ends = _compressed(k, v, compress_block, compress_stride, key_padding_mask, compressed_kv)
    b, h, n = q.shape[:3]
    if ends.numel() == 0:  # shorter than one compressed block: the branch sees nothing
        return q.new_zeros(b, h, n, v.shape[-1]) + 0 * v.sum(), torch.zeros(b, h, n, 0, dtype=torch.float64, device=q.device), ends
    group = h // k.shape[1]
    allowed = ends[None, :] <= torch.arange(n, device=q.device)[:, None]  # (N, n_cmp): wholly past
    sc = default_scale(q, scale)
    small = n * ends.numel() <= FLOAT64_SCORES_MAX
    cdt = torch.float64 if (small or q.dtype == torch.float64) else torch.float32
    k_h, v_h = (k_cmp, v_cmp) if group == 1 else (k_cmp.repeat_interleave(group, dim=1), v_cmp.repeat_interleave(group, dim=1))
    s = ((q.to(cdt) * sc) @ k_h.to(cdt).transpose(-1, -2)).masked_fill(~allowed, NEG_INF)
    p, _ = softmax_lse(s)
    out = (p @ v_h.to(cdt)).to(q.dtype)
    return out, p.detach(), ends


# --------------------------------------------------------------------------------------------
# selection branch
# --------------------------------------------------------------------------------------------
def _importance(p_cmp: Tensor, ends: Tensor, *, compress_block: int, block_size: int, n: int, kv_heads: int, loop: bool) -> Tensor:
    """(B, Hkv, N, n_blocks) float64: compressed probabilities summed over the group's heads and over
    the compressed blocks overlapping each selection block (Eq. 9-10)."""
    b, h, nq, _ = p_cmp.shape
    group = h // kv_heads
    p = p_cmp if group == 1 else p_cmp.view(b, kv_heads, group, nq, -1).sum(2)  # in p_cmp's dtype: no 64-bit copy
    n_blocks = math.ceil(n / block_size)
    starts = ends - compress_block + 1
    if loop:  # the reference: block by block
        out = torch.zeros(b, kv_heads, nq, n_blocks, dtype=p.dtype, device=p.device)
        for j in range(n_blocks):
            lo, hi = j * block_size, (j + 1) * block_size - 1
            overlapping = (starts <= hi) & (ends >= lo)
            out[..., j] = p[..., overlapping].sum(-1)
        return out
    # a compressed block overlaps the selection blocks first .. last: a few index_adds, not a matmul
    first, last = starts // block_size, ends.clamp(max=n - 1) // block_size
    out = torch.zeros(b, kv_heads, nq, n_blocks, dtype=p.dtype, device=p.device)
    for step in range(int((last - first).max()) + 1 if ends.numel() else 0):
        hit = first + step <= last
        weights = p if bool(hit.all()) else p * hit.to(p.dtype)
        out.index_add_(-1, (first + step).clamp(max=n_blocks - 1), weights)
    return out


def _selection(p_cmp: Tensor, ends: Tensor, *, compress_block: int, block_size: int, top_n: int, n: int, kv_heads: int, reference: bool) -> Tensor:
    """(B, Hkv, N, n_blocks) bool: the blocks each query attends (first and two local forced)."""
    score = _importance(p_cmp, ends, compress_block=compress_block, block_size=block_size, n=n, kv_heads=kv_heads, loop=reference)
    blocks = torch.arange(score.shape[-1], device=score.device)
    current = torch.arange(n, device=score.device) // block_size
    score = score.masked_fill(blocks > current[:, None], NEG_INF)  # the future
    forced = (blocks == 0) | (blocks == current[:, None]) | (blocks == current[:, None] - 1)
    score = score.masked_fill(forced & (blocks <= current[:, None]), float("inf"))
    return (sorted_top_k_mask if reference else top_k_mask)(score, top_n)


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _gated(outs: list[Tensor], gates: Optional[Tensor]) -> Tensor:
    if gates is None:
        return outs[0] + outs[1] + outs[2]
    return sum(gates[..., c : c + 1].to(o.dtype) * o for c, o in enumerate(outs))


def _run(q, k, v, *, gates, compressed_kv, block_size, compress_block, compress_stride, top_n, window, key_padding_mask, scale, engine: str):
    refuse_unless_right_padded("nsa", key_padding_mask, _PADDING_WHY)
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    o_cmp, p_cmp, ends = _compression_branch(
        q, k, v, compress_block=compress_block, compress_stride=compress_stride, compressed_kv=compressed_kv, key_padding_mask=key_padding_mask, scale=scale
    )
    selected = _selection(p_cmp, ends, compress_block=compress_block, block_size=block_size, top_n=top_n, n=n, kv_heads=k.shape[1], reference=engine == "reference")
    selected = selected.repeat_interleave(group, dim=1)  # one choice per key head, shared by its query heads
    window_pattern = masks.sliding_window(window - 1, 0)
    if engine == "reference":
        allowed = dense_selection(selected, block_size, n, 0)
        win = masks.dense_mask(window_pattern, n, n, device=q.device)
        if key_padding_mask is not None:
            allowed, win = allowed & ~key_padding_mask[:, None, None, :], win & ~key_padding_mask[:, None, None, :]
        o_slc, _ = materialized_attention(q, k, v, scale=scale, allowed=allowed)
        o_win, _ = materialized_attention(q, k, v, scale=scale, allowed=win)
    else:
        o_slc, _ = attend_row_blocks(q, k, v, selected, block_size, causal_offset=0, key_padding_mask=key_padding_mask, scale=scale)
        plan = block_sparse.SparsePlan.from_mask(window_pattern, n, n)
        o_win, _ = block_sparse.block_sparse_attention(q, k, v, plan, scale=scale, key_padding_mask=key_padding_mask)
    return _gated([o_cmp, o_slc.to(q.dtype), o_win.to(q.dtype)], gates).to(q.dtype)


def _reference(q, k, v, **params):
    """Each branch as a dense mask over materialized scores; importance block by block: the spec."""
    return _run(q, k, v, engine="reference", **params)


def _fused(q, k, v, **params):
    return _run(q, k, v, engine="fused", **params)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    n = p.kv_len
    if rng is None:
        small = n < 1024
        return {"block_size": 16, "compress_block": 8, "compress_stride": 4, "top_n": 4, "window": 32} if small else {}
    stride = rng.randint(1, 6)
    params: dict[str, Any] = {
        "compress_stride": stride, "compress_block": stride * rng.randint(1, 3), "block_size": rng.randint(1, 20),
        "top_n": rng.randint(1, 6), "window": rng.randint(1, n + 2),
    }
    if rng.random() < 0.5:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        params["gates"] = torch.rand(p.batch, p.q_heads, p.q_len, 3, generator=gen).to(device=p.device, dtype=p.dtype)
    if rng.random() < 0.3:  # a learned compressor's output: any tensors of the right shape
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        count = compressed_count(n, params["compress_block"], stride)
        params["compressed_kv"] = tuple(
            torch.randn(p.batch, p.kv_heads, count, dim, generator=gen).to(device=p.device, dtype=p.dtype) for dim in (p.head_dim, p.value_dim)
        )
    params = sample_options(params, p, rng, right_only=True)
    params.pop("return_lse", None)
    return params


NSA = register(
    Mechanism(
        name="nsa",
        family="sparse",
        catalog=("S2",),
        paper="Native Sparse Attention (Yuan et al., DeepSeek, 2025), Sec. 3.3, Eq. 5-11",
        formula="o_t = g_cmp Attn(q_t, compressed blocks phi(K_blk)) + g_slc Attn(q_t, top-n blocks by compressed attention) + g_win Attn(q_t, last w keys)",
        cost="O(N^2 / stride * D) compression + O(N * top_n * block * D) selection + O(N * window * D) window",
        summary="NSA: gated sum of compressed-block, top-n selected-block and sliding-window causal attention",
        patterns=frozenset({"causal_self"}),
        params=NSA_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        check_params=_check_params,
    )
)
NSA.add_backend(Backend("reference", _reference, doc="each branch as a dense mask over materialized scores: the spec", priority=-100, materializes_scores=True))
NSA.add_backend(
    native_backend("fused", _fused, "compression over N x N/stride; the selected pairs on the C++ gathered-rows kernel, the window on the block-sparse kernel")
)


def nsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    gates: Optional[Tensor] = None,
    compressed_kv: Optional[tuple[Tensor, Tensor]] = None,
    block_size: int = 64,
    compress_block: int = 32,
    compress_stride: int = 16,
    top_n: int = 16,
    window: int = 512,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Native Sparse Attention (catalog S2): gated compression, selection and window branches (causal).

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        gates: (B, Hq, N, 3) branch gates (compression, selection, window); None: 1 each.
        compressed_kv: (k_cmp, v_cmp), (B, Hkv, n_cmp, D) and (B, Hkv, n_cmp, Dv) with
            n_cmp = (N - compress_block) // compress_stride + 1: the paper's learned phi applied to
            each block (:class:`attnzoo.nn.NativeSparseAttention`); None: the mean of each block.
        block_size, compress_block, compress_stride, top_n, window: the paper's l', l, d, n, w.
        key_padding_mask: (B, N) bool, right padding only. scale: default ``D ** -0.5``.

    Cost: O(N^2 D / stride) + O(N top_n block_size D) + O(N window D).
    Paper: Yuan et al., "Native Sparse Attention" (2025), Eq. 5-11.

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = nsa_attention(q, k, v, top_n=8, window=256)
    """
    return NSA(
        q, k, v, backend=backend, gates=gates, compressed_kv=compressed_kv, block_size=block_size, compress_block=compress_block, compress_stride=compress_stride,
        top_n=top_n, window=window, key_padding_mask=key_padding_mask, scale=scale,
    )


NSA.function = nsa_attention
NSA.decoder = PrefixDecoder("nsa", "all")
