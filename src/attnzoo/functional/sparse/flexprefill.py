"""FlexPrefill: context-aware sparse prefill (catalog S2; Lai et al., ICLR 2025, arXiv 2502.20766, Sec. 3, Alg. 1-3).

Per head and input, FlexPrefill picks one of two patterns from the last ``block_size`` queries Q^:

* **pattern choice** (Alg. 1): the block-pooled estimate a- = softmax(mean(Q^) avgpool(K)^T / sqrt(d))
  over key blocks is compared with the true block distribution a^ = block sums of the mean causal
  attention of Q^; ``sqrt(JSD(a- || a^)) < tau`` makes the head *query-aware*, else *vertical-slash*.
* **query-aware** (Alg. 3): block attention A = softmax(avgpool(Q) avgpool(K)^T / sqrt(d)) (causal over
  blocks), normalized and flattened over the whole head; the fewest blocks whose mass reaches gamma
  of the total are attended.
* **vertical-slash** (Alg. 2): from the exact causal attention of Q^, the column sums and diagonal
  sums; the fewest columns and the fewest diagonals covering gamma of their mass each (the first key
  and the main diagonal always kept). The official kernel rounds these lines to blocks; here they
  stay element lines (MInference's form), attended exactly.

Then exact causal softmax over the chosen pairs. Selections in float64, ties to the lowest index.
The choice reads the last queries: no output is independent of later tokens (prefill;
``Mechanism.causal_block``). Right padding is exact; left padding refused.

Backends: ``reference`` (stable-sort rules, dense mask per head); ``fused`` (query-aware blocks and
vertical-slash lines as per-tile words in one plan, the C++ block-sparse kernel; block_size a
multiple of 64); ``tiled``.
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
from ...kernels.tiled import tiled_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import refuse_unless_right_padded
from ._params import WHOLE_SEQUENCE, unit_interval, PADDING_PARAM, native_backend, positive_int, sample_options
from ._select import NEG_INF, block_means, block_selection_plan, mass_mask, masked_softmax, sorted_mass_mask
from .minference import VerticalSlashMask, _estimate, _last_rows, _line_scores, causal_plan_from_words, vs_tile_words
from .._prefix_decoder import READS_AHEAD

__all__ = ["flexprefill_attention", "FLEXPREFILL"]

_PADDING_WHY = "the pattern is read from the last queries and blocks placed from position 0, which pads before a sequence would move"


FLEX_PARAMS = (
    Param("gamma", 0.9, "attention mass the chosen pattern must cover (the paper's gamma)", unit_interval("covered mass"), (0.0, 1.5, "0.9"), "float"),
    Param("tau", 0.1, "JS-distance threshold below which a head is query-aware (the paper's tau)", unit_interval("JS distance"), (0.0, 1.5, "0.1"), "float"),
    Param("block_size", 128, "query/key block of the estimate and of query-aware blocks; the last block_size queries estimate", positive_int("tokens per block"), (0, -128, 1.5, "128"), "int"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, N)"),
)


# --------------------------------------------------------------------------------------------
# the pattern choice and the two selections
# --------------------------------------------------------------------------------------------
def _js_distance(p: Tensor, q: Tensor) -> Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) of distributions along the last dim."""
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), torch.zeros_like(a)).sum(-1)

    return ((kl(p, m) + kl(q, m)) / 2).clamp_min(0).sqrt()


def _block_sums(x: Tensor, block: int) -> Tensor:
    n = x.shape[-1]
    blocks = math.ceil(n / block)
    return torch.nn.functional.pad(x, (0, blocks * block - n)).view(*x.shape[:-1], blocks, block).sum(-1)


def flexprefill_selection(q, k, *, gamma, tau, block_size, scale, key_padding_mask, reference=False):
    """(query_aware (B, H) bool, blocks (B, H, nb, nb) bool, vertical (B, H, N) bool, slash (B, H, N) bool)."""
    b, h, n, _ = q.shape
    group = h // k.shape[1]
    rows, exists = _last_rows(key_padding_mask, b, n, block_size, q.device)
    a = _estimate(q, k, scale, rows, exists, key_padding_mask)  # (B, H, L, N): the last queries' causal softmax
    count = exists.sum(-1).clamp(min=1).double()[:, None, None]  # (B, 1, 1)
    lengths = rows[:, -1] + 1
    beyond = torch.arange(n, device=q.device)[None, :] >= lengths[:, None]
    mass_select = sorted_mass_mask if reference else mass_mask
    # Alg. 1: pooled estimate against the true block distribution of the last queries
    k_means, has_keys = block_means(k.detach(), block_size, key_padding_mask)
    q_last = (q.detach().gather(2, rows[:, None, :, None].expand(-1, h, -1, q.shape[3])).double() * exists[:, None, :, None]).sum(2) / count
    pooled = (q_last[:, :, None, :] @ k_means.repeat_interleave(group, dim=1).transpose(-1, -2))[:, :, 0] * scale
    last_block = (lengths - 1) // block_size
    visible_blocks = (torch.arange(has_keys.shape[-1], device=q.device)[None, :] <= last_block[:, None])[:, None] & has_keys
    estimate = torch.softmax(pooled.masked_fill(~visible_blocks, NEG_INF), dim=-1)
    truth = _block_sums(a.sum(2) / count, block_size)
    query_aware = _js_distance(estimate, truth) < tau
    # Alg. 3: block attention of pooled queries and keys, the fewest blocks covering gamma of the head
    q_means, _ = block_means(q.detach(), block_size, key_padding_mask)
    nb = q_means.shape[2]
    causal_blocks = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    s = (q_means @ k_means.repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    probs = masked_softmax(s, causal_blocks & has_keys[:, :, None, :])
    probs = probs * has_keys[:, :, :, None]  # query blocks of padding only take no share of the mass
    blocks = mass_select(probs.flatten(2), gamma).view(b, h, nb, nb)
    # Alg. 2: the fewest columns and diagonals covering gamma of their mass; key 0 and the diagonal kept
    if bool(query_aware.all()):  # no vertical-slash head: no lines to find
        none = torch.zeros(b, h, n, dtype=torch.bool, device=q.device)
        return query_aware, blocks, none, none.clone()
    vertical, slash = _line_scores(a, rows, n, by_diagonal_loop=reference)
    vertical = mass_select(vertical.masked_fill(beyond[:, None], 0.0), gamma)
    slash = mass_select(slash.masked_fill(beyond[:, None], 0.0), gamma)
    vertical[..., 0] = True
    slash[..., 0] = True
    return query_aware, blocks, vertical, slash


def _dense(query_aware: Tensor, blocks: Tensor, vertical: Tensor, slash: Tensor, block_size: int, n: int) -> Tensor:
    """(B, H, N, N) bool: each head's chosen pairs, causal."""
    block_mask = blocks.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[:, :, :n, :n]
    i, j = torch.arange(n, device=blocks.device)[:, None], torch.arange(n, device=blocks.device)[None, :]
    lines = vertical[:, :, None, :] | slash[:, :, (i - j).clamp(min=0)]
    return torch.where(query_aware[:, :, None, None], block_mask, lines) & (j <= i)


class _FlexMask(masks.MaskMod):
    """Per head: the query-aware blocks or the vertical-slash lines, causal (the tiled engine's predicate)."""

    batch_head_dependent = True
    cacheable = False

    def __init__(self, query_aware: Tensor, blocks: Tensor, vertical: Tensor, slash: Tensor, block_size: int):
        self.qa, self.blocks, self.block = query_aware, blocks, block_size
        self.lines = VerticalSlashMask(vertical, slash)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        in_blocks = self.blocks[b, h, q_idx // self.block, kv_idx // self.block] & (kv_idx <= q_idx)
        return torch.where(self.qa[b, h], in_blocks, self.lines(b, h, q_idx, kv_idx))


def flexprefill_plan(query_aware: Tensor, blocks: Tensor, vertical: Tensor, slash: Tensor, block_size: int, n: int) -> block_sparse.SparsePlan:
    """One plan for every head: query-aware heads' blocks as whole tiles, the others' lines as tile
    words (built only when some head is vertical-slash: the block grid alone is O(tiles))."""
    if bool(query_aware.all()):
        return block_selection_plan(blocks, block_size, n, n, causal=True)
    per = block_size // block_sparse.BLOCK
    nb = -(-n // block_sparse.BLOCK)
    tiles = blocks.cpu().repeat_interleave(per, 2).repeat_interleave(per, 3)[:, :, :nb, :nb]
    block_words = torch.where(tiles, -1, 0).to(torch.int64)[..., None].expand(-1, -1, -1, -1, block_sparse.BLOCK)
    words = torch.where(query_aware.cpu()[:, :, None, None, None], block_words, vs_tile_words(vertical, slash, n))
    return causal_plan_from_words(words, n)


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _select(q, k, gamma, tau, block_size, scale, key_padding_mask, reference):
    refuse_unless_right_padded("flexprefill", key_padding_mask, _PADDING_WHY)
    return flexprefill_selection(q, k, gamma=gamma, tau=tau, block_size=block_size, scale=default_scale(q, scale), key_padding_mask=key_padding_mask, reference=reference)


def _result(out: Tensor, lse: Tensor, return_lse: bool) -> Any:
    return (out, lse) if return_lse else out


def _reference(q, k, v, *, gamma, tau, block_size, key_padding_mask, scale, return_lse):
    """Stable-sort selections and one dense mask per head over materialized scores: the spec."""
    chosen = _select(q, k, gamma, tau, block_size, scale, key_padding_mask, reference=True)
    allowed = _dense(*chosen, block_size, q.shape[2])
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return _result(*materialized_attention(q, k, v, scale=scale, allowed=allowed), return_lse)


def _fused(q, k, v, *, gamma, tau, block_size, key_padding_mask, scale, return_lse):
    chosen = _select(q, k, gamma, tau, block_size, scale, key_padding_mask, reference=False)
    plan = flexprefill_plan(*chosen, block_size, q.shape[2])
    return _result(*block_sparse.block_sparse_attention(q, k, v, plan, scale=scale, key_padding_mask=key_padding_mask), return_lse)


def _fused_accepts(p: Problem, params: dict) -> Optional[str]:
    if params["block_size"] % block_sparse.BLOCK:
        return f"needs block_size a multiple of {block_sparse.BLOCK} (query-aware blocks as whole tiles), got {params['block_size']}"
    return None


def _tiled(q, k, v, *, gamma, tau, block_size, key_padding_mask, scale, return_lse):
    chosen = _select(q, k, gamma, tau, block_size, scale, key_padding_mask, reference=False)
    pattern = _FlexMask(*chosen, block_size)
    plan = masks.plan_for(pattern, q.shape[2], k.shape[2], batch=q.shape[0], heads=q.shape[1])
    return _result(*tiled_attention(q, k, v, plan=plan, scale=scale, mask_mod=pattern, key_padding_mask=key_padding_mask), return_lse)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {} if p.kv_len >= 1024 else {"block_size": 64 if p.kv_len >= 256 else max(1, p.kv_len // 4)}
    params: dict[str, Any] = {"gamma": rng.choice((0.3, 0.6, 0.9, 1.0)), "tau": rng.choice((0.05, 0.1, 0.5, 1.0)), "block_size": rng.choice((1, 2, 3, 4, 7, 16, 64))}
    return sample_options(params, p, rng, right_only=True)


FLEXPREFILL = register(
    Mechanism(
        name="flexprefill",
        family="sparse",
        catalog=("S2",),
        paper="FlexPrefill: A Context-Aware Sparse Attention Mechanism (Lai et al., ICLR 2025), Sec. 3, Alg. 1-3",
        formula="per head: JS(pooled estimate, true block mass) < tau ? fewest blocks covering gamma : fewest vertical+slash lines covering gamma; exact causal softmax over them",
        cost="O(block * N * D) estimate + O(N^2 / block^2 * D) block scores + attention over the chosen pairs",
        summary="FlexPrefill: per head, query-aware blocks or vertical-slash lines chosen by JS distance, each covering gamma of the mass",
        patterns=frozenset({"causal_self"}),
        params=FLEX_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        causal_block=lambda bound: WHOLE_SEQUENCE,  # the choice reads the last queries
        sparsity_params=lambda p, share: {"gamma": share, "block_size": 64 if p.kv_len >= 256 else max(1, p.kv_len // 8)},
    )
)
FLEXPREFILL.add_backend(Backend("reference", _reference, doc="stable-sort selections, one dense mask per head: the spec", priority=-100, materializes_scores=True))
FLEXPREFILL.add_backend(
    native_backend("fused", _fused, "query-aware blocks and vertical-slash lines as per-tile words in one plan, C++ block-sparse kernel", accepts=_fused_accepts)
)
FLEXPREFILL.add_backend(Backend("tiled", _tiled, doc="the PyTorch FA2 engine with each head's pattern as its predicate", priority=20, traceable=False))


def flexprefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    gamma: float = 0.9,
    tau: float = 0.1,
    block_size: int = 128,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """FlexPrefill (catalog S2): per head, query-aware blocks or vertical-slash lines covering ``gamma``.

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        gamma: covered mass. tau: JS-distance threshold. block_size: estimate and block size
            (the last ``block_size`` queries estimate; multiples of 64 run on the fused kernel).
        key_padding_mask: (B, N) bool, right padding only. scale, return_lse: as softmax.

    Cost: O(block_size N D) + O(N^2 D / block_size^2) + the chosen pairs.
    Paper: Lai et al., "FlexPrefill" (ICLR 2025), Alg. 1-3.

    Example::

        >>> q = k = v = torch.randn(1, 8, 8192, 64)
        >>> out = flexprefill_attention(q, k, v, gamma=0.9, tau=0.1)
    """
    return FLEXPREFILL(q, k, v, backend=backend, gamma=gamma, tau=tau, block_size=block_size, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


FLEXPREFILL.function = flexprefill_attention
FLEXPREFILL.decoder_refusal = READS_AHEAD
