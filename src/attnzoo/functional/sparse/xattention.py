"""XAttention: block-sparse attention chosen by antidiagonal scoring (catalog S2; Xu et al., ICML 2025,
arXiv 2503.16428, Sec. 2.1-2.2).

Estimate (Sec. 2.1, "antidiagonal selection"): with stride S, every S x S tile (m, n) of the score
matrix is represented by the sum along one of its antidiagonals,

    a_mn = sum_{j < S} q_{mS + S-1-j} . k_{nS + j}

(the paper's code concatenates the strided query rows in reverse order and the strided key rows,
so one matmul of width S*D gives every a_mn). The tile scores, scaled by ``scale / S`` (the
attention's scale; the paper's 1 / (sqrt(d) S)), are softmaxed along each tile row (causal: tiles
after the query tile excluded), and summed into ``block_size x block_size`` blocks: the estimated
attention mass of each (query block, key block).

Selection (Sec. 2.2, "threshold block selection"): per query block, the smallest set of key blocks,
by decreasing mass (ties to the lowest index), whose mass reaches ``threshold`` (tau) x the row's
total; in causal mode the first key block and the diagonal block are always kept (the paper's
code). Then exact softmax attention over the selected blocks (causal inside).

Causal mode is block-causal, as the paper's prefill: a query block's selection reads all its
queries and its diagonal tiles, so a query's output may depend on later tokens of its own block
(never on later blocks; ``Mechanism.causal_block``). Every backend estimates in float64 (the same
blocks everywhere). Right padding is exact (padded
keys and queries are zeroed and key tiles with no real key excluded, so a sequence's blocks are
what they are alone); left padding is refused. Gradients flow through the attention; the estimate
is a selection (no gradient), as in the paper.

Backends: ``reference`` (the S strided matmuls summed, row-by-row mass selection, dense mask);
``fused`` (one matmul on the reordered rows, vectorized selection, the C++ block-sparse kernel over
the selected blocks: O(N^2 D / S^2) estimate + O(selected blocks) attention); ``tiled``.
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import refuse_unless_right_padded
from ._params import PADDING_PARAM, multiple_of, native_backend, positive_int, sample_options, unit_interval
from ._select import attend_blocks, block_rows, dense_selection, masked_softmax, mass_mask, sorted_mass_mask
from .._prefix_decoder import READS_AHEAD

__all__ = ["xattention", "XATTENTION"]

_PADDING_WHY = "XAttention's blocks and stride tiles start at position 0, so pads before a sequence would move them"


_check_params = multiple_of("block_size", "stride")


XATTENTION_PARAMS = (
    Param("block_size", 128, "query and key block size (the paper's 128); a multiple of stride", positive_int("tokens per block"), (0, -128, 1.5, "128"), "int"),
    Param("stride", 8, "antidiagonal stride S (the paper's 8 or 16)", positive_int("tokens per tile side"), (0, -8, 2.5, "8"), "int"),
    Param("threshold", 0.9, "tau: the share of each query block's estimated mass its selected key blocks cover", unit_interval("the share of estimated attention mass kept"), (0.0, 1.5, -0.1, "0.9"), "float"),
    flag("causal", False, "no key after the query (tiles after the query tile excluded from the estimate)"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, N)"),
)


# --------------------------------------------------------------------------------------------
# estimate and selection
# --------------------------------------------------------------------------------------------
def _real_lengths(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """Real tokens per sequence (right padding), or None without padding."""
    return None if key_padding_mask is None else (~key_padding_mask).sum(-1)


def _or_full(lengths: Optional[Tensor], batch: int, n: int, device: torch.device) -> Tensor:
    return torch.full((batch,), n, device=device) if lengths is None else lengths


def _padded(x: Tensor, lengths: Optional[Tensor], total: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """x in ``dtype`` with the rows past each sequence's real length zeroed (``lengths`` None: all
    real), padded with zeros to ``total`` rows. Copies only what it must (the estimate's input)."""
    x = x.detach().to(dtype)
    if lengths is not None:
        x = x * (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]).to(dtype)[:, None, :, None]
    return x if total == x.shape[2] else torch.nn.functional.pad(x, (0, 0, 0, total - x.shape[2]))


def _tile_mask(tiles: int, lengths: Tensor, stride: int, causal: bool) -> Tensor:
    """(B, 1, tiles, tiles) bool: key tiles holding a real key (and, causal, not after the query tile)."""
    n = torch.arange(tiles, device=lengths.device)
    ok = (n * stride < lengths[:, None])[:, None, None, :]  # (B, 1, 1, tiles)
    if causal:
        ok = ok & (n[None, :] <= n[:, None])[None, None]
    return ok


def _block_mass(tile_scores: Tensor, ok: Tensor, block_size: int, stride: int) -> Tensor:
    """Softmax of the tile scores along each tile row, summed into (query block, key block) masses."""
    probs = masked_softmax(tile_scores, ok.expand_as(tile_scores))  # a row with no tile: 0
    b, h, t, _ = probs.shape
    per = block_size // stride
    return probs.view(b, h, t // per, per, t // per, per).sum((3, 5))


def _force_causal_blocks(keep: Tensor) -> Tensor:
    """The first key block and the diagonal block, always kept in causal mode (the paper's code)."""
    blocks = keep.shape[-1]
    forced = torch.eye(blocks, dtype=torch.bool, device=keep.device)
    forced[:, 0] = True
    return keep | forced


#: Up to this many tile scores per (batch, head), the fast path estimates in float64 (its selection
#: then equals the reference's exactly); above, in float32 (4x faster here: a float64 estimate at
#: N = 16384, S = 8 took longer than the attention it selects for). A block whose cumulative mass
#: sits within float32 rounding of the threshold may then be chosen differently.
FLOAT64_ESTIMATE_MAX_TILES = 1 << 20


def xattention_selection(q: Tensor, k: Tensor, *, block_size: int, stride: int, threshold: float, causal: bool, scale: float, key_padding_mask: Optional[Tensor]) -> Tensor:
    """(B, H, n_blocks, n_blocks) bool: the key blocks of each query block (the fast path's)."""
    b, h, n, d = q.shape
    total = math.ceil(n / block_size) * block_size
    lengths = _real_lengths(key_padding_mask)
    group = h // k.shape[1]
    dtype = torch.float64 if (total // stride) ** 2 <= FLOAT64_ESTIMATE_MAX_TILES else torch.float32
    qp = _padded(q, lengths, total, dtype)
    kp = _padded(k if group == 1 else k.repeat_interleave(group, dim=1), lengths, total, dtype)
    tiles = total // stride
    # one matmul: query rows of each tile in reverse order, key rows in order (the antidiagonal)
    q_re = qp.view(b, h, tiles, stride, d).flip(3).reshape(b, h, tiles, stride * d)
    k_re = kp.view(b, h, tiles, stride * d)
    scores = (q_re * (scale / stride)) @ k_re.transpose(-1, -2)  # scaled on the smaller operand
    mass = _block_mass(scores, _tile_mask(tiles, _or_full(lengths, b, n, q.device), stride, causal), block_size, stride)
    keep = mass_mask(mass, threshold)
    return _force_causal_blocks(keep) if causal else keep


def _reference_selection(q: Tensor, k: Tensor, *, block_size: int, stride: int, threshold: float, causal: bool, scale: float, key_padding_mask: Optional[Tensor]) -> Tensor:
    """The estimate as the sum of S strided matmuls (one per antidiagonal position), then the mass rule row by row."""
    b, h, n, _ = q.shape
    total = math.ceil(n / block_size) * block_size
    lengths = _real_lengths(key_padding_mask)
    group = h // k.shape[1]
    qp, kp = _padded(q, lengths, total), _padded(k.repeat_interleave(group, dim=1), lengths, total)
    scores = sum(qp[:, :, stride - 1 - j :: stride] @ kp[:, :, j::stride].transpose(-1, -2) for j in range(stride)) * (scale / stride)
    mass = _block_mass(scores, _tile_mask(total // stride, _or_full(lengths, b, n, q.device), stride, causal), block_size, stride)
    keep = sorted_mass_mask(mass, threshold)
    return _force_causal_blocks(keep) if causal else keep


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, block_size, stride, threshold, causal, key_padding_mask, scale, return_lse):
    """Strided-matmul estimate, row-by-row mass selection, dense masked softmax: the spec."""
    refuse_unless_right_padded("xattention", key_padding_mask, _PADDING_WHY)
    selected = _reference_selection(
        q, k, block_size=block_size, stride=stride, threshold=threshold, causal=causal, scale=default_scale(q, scale), key_padding_mask=key_padding_mask
    )
    n = q.shape[2]
    allowed = dense_selection(block_rows(selected, block_size, n), block_size, n, 0 if causal else None)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(q.shape[0], 1, 1, n)
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=allowed)
    return (out, lse) if return_lse else out


def _engine(name: str):
    def run(q, k, v, *, block_size, stride, threshold, causal, key_padding_mask, scale, return_lse):
        refuse_unless_right_padded("xattention", key_padding_mask, _PADDING_WHY)
        selected = xattention_selection(
            q, k, block_size=block_size, stride=stride, threshold=threshold, causal=causal, scale=default_scale(q, scale), key_padding_mask=key_padding_mask
        )
        out, lse = attend_blocks(q, k, v, selected, block_size, causal=causal, key_padding_mask=key_padding_mask, scale=scale, engine=name)
        return (out, lse) if return_lse else out

    run.__name__ = f"_xattention_{name}"
    return run


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        if p.q_len < 512:  # short inputs: blocks and tiles that still make several blocks
            params.update(block_size=16, stride=4)
        return params
    stride = rng.choice((1, 2, 3, 4, 8))
    params.update(stride=stride, block_size=stride * rng.randint(1, 6), threshold=rng.choice((0.3, 0.6, 0.9, 1.0)))
    return sample_options(params, p, rng, right_only=True)


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    """tau = share (the kept share of the *estimated* mass; the measured density differs); the
    paper's blocks of 128 and stride 8 from N = 1024; below, about 16 blocks (a power of two, at
    least 2 tokens) with a stride of a quarter block, so that short inputs still have blocks."""
    if p.kv_len >= 1024:
        return {"threshold": share}
    block = max(2, 2 ** int(math.log2(max(1.0, p.kv_len / 16))))
    return {"threshold": share, "block_size": block, "stride": max(1, block // 4)}


XATTENTION = register(
    Mechanism(
        name="xattention",
        family="sparse",
        catalog=("S2",),
        paper="XAttention: Block Sparse Attention with Antidiagonal Scoring (Xu et al., ICML 2025), Sec. 2.1-2.2",
        formula="mass_IJ = sum_{tiles in block} softmax_n(scale/S sum_j q_{mS+S-1-j}.k_{nS+j}); keep the fewest key blocks J reaching tau of row I's mass",
        cost="O(N^2 D / S^2) estimate (float64) + O(selected blocks * block^2 * D) attention (fused); O(N^2 / S^2) estimate memory",
        summary="XAttention: antidiagonal tile scores estimate block mass; the fewest blocks covering tau of it are attended exactly",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=XATTENTION_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        check_params=_check_params,
        causal_block=lambda bound: bound["block_size"],
        sparsity_params=_sparsity_params,
    )
)
XATTENTION.add_backend(
    Backend("reference", _reference, doc="S strided matmuls summed, row-by-row mass selection, dense masked softmax: the spec", priority=-100, materializes_scores=True)
)
XATTENTION.add_backend(
    native_backend("fused", _engine("fused"), "one reordered matmul for the estimate, the C++ block-sparse kernel over the selected blocks")
)
XATTENTION.add_backend(Backend("tiled", _engine("tiled"), doc="the PyTorch FA2 engine over the selected blocks", priority=20, traceable=False))


def xattention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 128,
    stride: int = 8,
    threshold: float = 0.9,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """XAttention (catalog S2): exact attention over the key blocks an antidiagonal estimate selects.

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        block_size: query/key block (paper: 128; multiples of 64 plan in O(blocks)); a multiple of ``stride``.
        stride: antidiagonal stride S (paper: 8 or 16). threshold: tau in (0, 1].
        causal: causal attention (first and diagonal blocks always kept).
        key_padding_mask: (B, N) bool, True = pad; right padding only.
        scale: defaults to ``D ** -0.5`` (the estimate uses ``scale / S``). return_lse: also the LSE.

    Cost: O(N^2 D / S^2) estimate + attention over the selected blocks only.
    Paper: Xu et al., "XAttention" (ICML 2025), Sec. 2.1-2.2.

    Example::

        >>> q = k = v = torch.randn(1, 8, 8192, 64)
        >>> out = xattention(q, k, v, threshold=0.9, causal=True)
    """
    return XATTENTION(
        q, k, v, backend=backend, block_size=block_size, stride=stride, threshold=threshold, causal=causal,
        key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


XATTENTION.function = xattention
XATTENTION.decoder_refusal = READS_AHEAD
