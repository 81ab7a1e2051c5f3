"""What the local mechanisms share: the backend factory, flattening, tile plans, partitions,
and key padding."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels import block_sparse
from ...kernels.flex import FLEX_CAPABILITIES, decline_reason as flex_decline_reason, flex_forward
from ...kernels.reference import materialized_attention
from ...kernels.sdpa import sdpa
from ...kernels.tiled import tiled_attention
from ..._validate import per_axis
from .._padding import PADDING_DOC, key_padding_param  # noqa: F401 - re-exported for the family
from .._padding import sample_padding as _sample_padding
from ...registry import Backend, Mechanism, Problem


def _is_extent(x: Any) -> bool:
    return x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)


def _result(out: Tensor, lse: Tensor, return_lse: bool) -> Any:
    return (out, lse) if return_lse else out


def _flat(x: Tensor) -> Tensor:
    """(B, H, *spatial, D) -> (B, H, N, D): the tokens in row-major order."""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _unflat(out: Any, q: Tensor, v: Tensor, return_lse: bool) -> Any:
    spatial = tuple(q.shape[2:-1])
    if return_lse:
        o, lse = out
        return o.reshape(*q.shape[:2], *spatial, v.shape[-1]), lse.reshape(*q.shape[:2], *spatial)
    return out.reshape(*q.shape[:2], *spatial, v.shape[-1])


def _no_lse(p: Problem, params: dict) -> Optional[str]:
    """SDPA over lines, windows or groups gives no LSE."""
    return "cannot return the LSE (use tiled)" if params["return_lse"] else None


def _check_self(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    """Spatial patterns relate a token to its neighbours: q and k must share their grid."""
    if p.q_shape != p.kv_shape:
        return "k", f"self-attention over a grid: k must have q's spatial sizes {p.q_shape}, got {p.kv_shape}"
    return None


def _flex_accepts(p: Problem, params: dict) -> Optional[str]:
    """What compiled FlexAttention cannot do on this device (CPU: small head dims, grad, LSE; CUDA: head dims below 16)."""
    return flex_decline_reason(p, score_mod=None, return_lse=params["return_lse"])


PatternOf = Callable[..., masks.MaskMod]  # (q, k, **the mechanism's pattern parameters) -> predicate


# --------------------------------------------------------------------------------------------
# key padding
# --------------------------------------------------------------------------------------------
def flat_padding(mask: Optional[Tensor], batch: int) -> Optional[Tensor]:
    """The mask as (B, Nk) over the flattened keys (row-major, like :func:`_flat`)."""
    return None if mask is None else mask.reshape(batch, -1)


def sample_padding(p: Problem, rng: random.Random, *, pattern: str = "", chance: float = 0.3) -> Optional[Tensor]:
    """A random ``key_padding_mask`` for the conformance suite (or None), N-D ones sometimes in
    their spatial form.

    ``causal_cross``: right pads only. Sequence patterns count key positions from each sequence's
    first real key (:func:`span_shifted`), so with pads before it, causality holds in those
    positions, not in the absolute ones the suite's "outputs ignore the future" test perturbs.
    """
    return _sample_padding(p, rng, right_only=pattern == "causal_cross", chance=chance, spatial=True)


@dataclass(frozen=True, eq=False)
class _SpanShifted(masks.MaskMod):
    """A 1D pattern placed on each batch entry's real span of keys, as if the sequence ran alone.

    Batch entry b's real keys span ``[first_b, stop_b)`` (its first and last unpadded key); key
    ``j`` is key ``j - first_b`` of the sequence alone, query ``i`` is its query ``i + q_shift_b``.
    ``inner`` is the pattern built for the padded lengths; a shift makes its positions those of the
    run alone (pads inside a span are masked by the padding itself, not here).
    """

    inner: masks.MaskMod
    q_shift: Tensor  # (B,) long
    k_shift: Tensor  # (B,) long
    batch_head_dependent = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.inner(b, h, q_idx + self.q_shift[b], kv_idx - self.k_shift[b])

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> Optional[masks.TileGrid]:
        """The union over batch entries of the inner pattern's tiles, shifted (O(B * tiles))."""
        visit = full = None
        for dq, dk in sorted(set(zip(self.q_shift.tolist(), self.k_shift.tolist()))):
            grid = self.inner._tile_grid(qf + dq, ql + dq, kf - dk, kl - dk)
            if grid is None:
                return None
            visit = grid[0] if visit is None else visit | grid[0]
            full = grid[1] if full is None else full & grid[1]
        return visit, full


def key_spans(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(first, stop)``, each (B,) long: the span from each entry's first to its last real key
    (``stop`` exclusive); ``(0, 0)`` for an entry whose keys are all padded."""
    real = ~mask
    any_real = real.any(dim=1)
    nk = mask.shape[1]
    first = torch.where(any_real, real.int().argmax(dim=1), 0).long()
    stop = torch.where(any_real, nk - real.flip(1).int().argmax(dim=1), 0).long()
    return first, stop


def span_shifted(pattern: masks.MaskMod, mask: Optional[Tensor], nq: int, alignment: str = "bottom_right") -> masks.MaskMod:
    """``pattern`` (built for Nq = ``nq`` queries over the padded Nk keys) placed on each
    sequence's real keys, so a padded batch equals each sequence run alone.

    Self-attention (Nq == Nk): the queries are padded like the keys, query i is query
    ``i - first_b`` alone. Cross-attention (Nq != Nk): every query is real; bottom-right alignment
    puts query i at key ``i + L_b - Nq`` of the sequence alone (``L_b = stop_b - first_b``), so
    its shift is ``L_b - Nk``; top-left needs none. One host sync (the spans).
    """
    if mask is None:
        return pattern
    nk = mask.shape[1]
    first, stop = key_spans(mask)
    if nq == nk:
        q_shift = -first
    elif alignment == "bottom_right":
        q_shift = stop - first - nk
    else:
        q_shift = torch.zeros_like(first)
    q_shift, k_shift = q_shift.long().cpu(), first.long().cpu()
    if not bool(q_shift.any()) and not bool(k_shift.any()):
        return pattern  # right padding, self-attention: the pattern already sits where it would alone
    return _SpanShifted(pattern, q_shift.to(mask.device), k_shift.to(mask.device))


def _add_pattern_backends(mech: Mechanism, pattern_of: PatternOf, *, flex: bool = False, spans: bool = False) -> None:
    """Register the backends every fixed-pattern mechanism shares, over its flattened tokens.

    ``reference``: the pattern as a dense mask over materialized scores (the spec); ``tiled``:
    the FA2 engine over the tiles the pattern touches (gives the LSE); ``flex``: compiled
    FlexAttention with the pattern as a BlockMask (forward only on CPU; forward, backward and
    LSE on CUDA, where it ranks above tiled: ``FLEX_CAPABILITIES``). Backends receive ``scale``, ``return_lse``,
    ``key_padding_mask`` and the pattern's parameters, which go to ``pattern_of``.

    ``key_padding_mask`` is ANDed into the pattern (a query with no visible key outputs 0, LSE
    -inf). ``spans`` (1D sequence patterns): the pattern is also placed on each sequence's real
    span (:func:`span_shifted`), so a padded batch equals each sequence run alone.
    """

    def padded_pattern(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], params: dict) -> tuple[masks.MaskMod, Optional[Tensor]]:
        pattern = pattern_of(q, k, **params)
        pad = flat_padding(key_padding_mask, q.shape[0])
        if spans and pad is not None:
            pattern = span_shifted(pattern, pad, q.shape[2], params.get("causal_alignment", "bottom_right"))
        return pattern, pad

    def reference(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, key_padding_mask: Optional[Tensor] = None, **params: Any) -> Any:
        pattern, pad = padded_pattern(q, k, key_padding_mask, params)
        nq, nk = math.prod(q.shape[2:-1]), math.prod(k.shape[2:-1])
        allowed = masks.dense_mask(pattern, nq, nk, batch=q.shape[0], heads=q.shape[1], device=q.device)
        if pad is not None:
            allowed = allowed & ~pad.view(q.shape[0], 1, 1, nk)
        out, lse = materialized_attention(_flat(q), _flat(k), _flat(v), scale=scale, allowed=allowed)
        return _unflat(_result(out, lse, return_lse), q, v, return_lse)

    def tiled(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, key_padding_mask: Optional[Tensor] = None, **params: Any) -> Any:
        pattern, pad = padded_pattern(q, k, key_padding_mask, params)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        plan = masks.plan_for(pattern, qf.shape[2], kf.shape[2], batch=q.shape[0], heads=q.shape[1])
        out, lse = tiled_attention(qf, kf, vf, plan=plan, scale=scale, mask_mod=pattern, key_padding_mask=pad)
        return _unflat(_result(out, lse, return_lse), q, v, return_lse)

    def flex_backend(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, key_padding_mask: Optional[Tensor] = None, **params: Any) -> Any:
        pattern, pad = padded_pattern(q, k, key_padding_mask, params)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        batch = None
        if pad is not None:
            pattern, batch = masks.and_masks(pattern, _KeepKeys(pad)), q.shape[0]
        block_mask = masks.flex_block_mask(pattern, qf.shape[2], kf.shape[2], batch=batch, heads=q.shape[1], device=q.device)
        return _unflat(flex_forward(qf, kf, vf, block_mask=block_mask, scale=scale, return_lse=return_lse), q, v, return_lse)

    def fused(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, key_padding_mask: Optional[Tensor] = None, **params: Any) -> Any:
        pattern, pad = padded_pattern(q, k, key_padding_mask, params)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        plan = block_sparse.SparsePlan.from_mask(pattern, qf.shape[2], kf.shape[2], batch=q.shape[0], heads=q.shape[1])
        out, lse = block_sparse.block_sparse_attention(qf, kf, vf, plan, scale=scale, key_padding_mask=pad)
        return _unflat(_result(out, lse, return_lse), q, v, return_lse)

    mech.add_backend(
        Backend("reference", reference, doc="the pattern as a dense mask over materialized scores: the spec", priority=-100, materializes_scores=True)
    )
    mech.add_backend(Backend("fused", fused, doc=FUSED_DOC, accepts=_fused_accepts, **block_sparse.FUSED_CAPABILITIES))
    # traceable=False: the BlockPlan is built from tensor values (a graph break under torch.compile)
    mech.add_backend(Backend("tiled", tiled, doc="the tiled FA2 engine over the key tiles the pattern touches (gives the LSE)", priority=20, traceable=False))
    if flex:
        mech.add_backend(Backend("flex", flex_backend, doc="compiled FlexAttention with the pattern as a BlockMask", accepts=_flex_accepts, **FLEX_CAPABILITIES))


FUSED_DOC = "the C++ block-sparse FA2 kernel over the 64x64 blocks the pattern touches (kernels/block_sparse.py; forward, backward, LSE)"


def _fused_accepts(p: Problem, params: dict) -> Optional[str]:
    """Whether the C++ block-sparse kernel runs these inputs here (CPU, float32/bf16/f16, built)."""
    return block_sparse.decline_reason(p)


#: The grouped-SDPA backends (window, halo: one SDPA over padded groups) compute pairs at about
#: 0.4-0.7x dense SDPA's rate on CPU, the fused kernel its blocks at 0.7-0.8x (measured:
#: ``benchmarks/block_sparse_targets.py --cases dispatch``, 32x32 and 64x64 grids). Grouped SDPA
#: is declined once its padded pairs exceed this share of the fused kernel's block pairs.
GROUPED_SDPA_SHARE_OF_FUSED = 0.75


def grouped_sdpa_waste(p: Problem, pattern: masks.MaskMod, grouped_pairs: int) -> Optional[str]:
    """Why a grouped-SDPA backend should give way to the fused kernel here, or None.

    ``grouped_pairs``: the (query, key) pairs per (batch, head) its padded groups compute. Only
    declines where the fused kernel runs (CPU, built): elsewhere grouped SDPA is the fast path."""
    if block_sparse.decline_reason(p) is not None or p.device.type != "cpu":
        return None
    n = math.prod(p.q_shape)
    fused_pairs = block_sparse.SparsePlan.from_mask(pattern, n, n).blocks * block_sparse.BLOCK**2  # cached per pattern
    if grouped_pairs > GROUPED_SDPA_SHARE_OF_FUSED * fused_pairs:
        return (
            f"its padded groups compute {grouped_pairs} pairs, more than {GROUPED_SDPA_SHARE_OF_FUSED} x the fused kernel's "
            f"{fused_pairs} block pairs: slower on CPU (measured)"
        )
    return None


class _KeepKeys(masks.MaskMod):
    """The unpadded keys as a predicate (FlexAttention takes padding only through its mask)."""

    batch_head_dependent = True

    def __init__(self, pad: Tensor):
        self.pad = pad

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ~self.pad[b, kv_idx]


def no_padding(p: Problem, params: dict) -> Optional[str]:
    """``accepts`` of a fast path that has no place for key padding (tiled takes it)."""
    return "takes no key_padding_mask (use tiled)" if params.get("key_padding_mask") is not None else None


def ints_per_axis(minimum: int) -> Callable[[Any, Problem], Optional[str]]:
    """A parameter check: one int (or one per spatial axis), each at least ``minimum``."""
    wording = "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0 else f"an int >= {minimum}"

    def check(value: Any, p: Problem) -> Optional[str]:
        n = len(p.q_shape)
        sizes = per_axis(value, n, int)
        return None if sizes is not None and all(x >= minimum for x in sizes) else f"{wording} or a tuple of {n} (one per spatial axis)"

    return check


def _pad_to(x: Tensor, padded: list[int]) -> Tensor:
    """Zero-pad the spatial axes of (B, H, *S, D) at their ends to ``padded``."""
    pads = []
    for size, target in zip(reversed(x.shape[2:-1]), reversed(padded)):
        pads += [0, target - size]
    return torch.nn.functional.pad(x, [0, 0] + pads)


def _crop(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`_pad_to`: (B, H, *P, D) cut back to the spatial sizes ``shape``."""
    return x[(slice(None), slice(None)) + tuple(slice(0, size) for size in shape)]


def _attend_groups(
    q: Tensor, k: Tensor, v: Tensor, keys: Optional[Tensor], batch: int, scale: Optional[float], unpadded: Optional[Tensor] = None
) -> Tensor:
    """One SDPA over partitioned groups (B * n_groups, H, members, D).

    ``keys`` (n_groups, members|1, members) bool says which keys each query of a group sees,
    the same for every batch entry (groups are batch-major); None or all True: no mask.
    ``unpadded`` (B * n_groups, members) bool: the keys ``key_padding_mask`` leaves (the same
    partition of :func:`unpadded_keys`); a query left with no key then outputs 0.
    """
    if unpadded is None:
        mask = None if keys is None or bool(keys.all()) else keys.repeat(batch, 1, 1).unsqueeze(1)
        return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    allowed = unpadded[:, None, None, :]
    if keys is not None:
        allowed = allowed & keys.repeat(batch, 1, 1).unsqueeze(1)
    return masked_sdpa(q, k, v, allowed, scale)


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: Optional[float]) -> Tensor:
    """SDPA under a bool mask (True = attend) where a row may have no key: that row outputs 0.

    Such rows are let see every key (finite on every SDPA kernel), then zeroed, so their
    gradient is exactly 0 too (the convention of softmax's ``sdpa`` backend).
    """
    empty = ~allowed.any(-1, keepdim=True)
    out = sdpa(q, k, v, attn_mask=allowed | empty, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(empty, 0.0)


def unpadded_keys(key_padding_mask: Tensor, k: Tensor) -> Tensor:
    """(B, 1, *spatial_k, 1) float, 1 at a real key: to go through the partition k goes through
    (pad, roll, split, unfold), where 0 then also marks the partition's own padding."""
    return (~key_padding_mask).reshape(k.shape[0], 1, *k.shape[2:-1], 1).to(torch.float32)


def _split_groups(x: Tensor, splits: list[tuple[int, int]], group_is_inner: bool) -> Tensor:
    """(B, H, *P, D), each axis split as (outer, inner) -> (B * n_groups, H, group size, D).

    Windows (Swin) group by the outer factor (the window index), grids (MaxViT) by the inner
    one (the offset within a stride); the other factor indexes the members of a group.
    """
    b, h, d = x.shape[0], x.shape[1], x.shape[-1]
    n = len(splits)
    x = x.reshape(b, h, *[f for pair in splits for f in pair], d)
    outer, inner = [2 + 2 * i for i in range(n)], [3 + 2 * i for i in range(n)]
    groups, members = (inner, outer) if group_is_inner else (outer, inner)
    x = x.permute(0, *groups, 1, *members, x.dim() - 1)
    return x.reshape(-1, h, math.prod(x.shape[2 + n : 2 + 2 * n]), d)


def _merge_groups(x: Tensor, splits: list[tuple[int, int]], group_is_inner: bool, batch: int) -> Tensor:
    """The inverse of :func:`_split_groups`: back to (B, H, *P, D)."""
    n = len(splits)
    h, d = x.shape[1], x.shape[-1]
    group_sizes = [pair[1] if group_is_inner else pair[0] for pair in splits]
    member_sizes = [pair[0] if group_is_inner else pair[1] for pair in splits]
    x = x.reshape(batch, *group_sizes, h, *member_sizes, d)
    order = [0, n + 1]
    for i in range(n):
        member, group = n + 2 + i, 1 + i
        order += [member, group] if group_is_inner else [group, member]
    return x.permute(*order, x.dim() - 1).reshape(batch, h, *[o * i for o, i in splits], d)


def _window_splits(shape: tuple[int, ...], window: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(-(-size // w), w) for size, w in zip(shape, window)]
