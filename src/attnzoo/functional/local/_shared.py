"""What the local mechanisms share: the backend factory, flattening, tile plans, partitions."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels.flex import FLEX_CAPABILITIES, cpu_decline_reason, flex_forward
from ...kernels.reference import materialized_attention
from ...kernels.sdpa import sdpa
from ...kernels.tiled import tiled_attention
from ..._validate import per_axis
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
    """What compiled FlexAttention cannot do on this device (CPU: small head dims, grad, LSE)."""
    return cpu_decline_reason(p, score_mod=None, return_lse=params["return_lse"])


PatternOf = Callable[..., masks.MaskMod]  # (q, k, **the mechanism's pattern parameters) -> predicate


def _add_pattern_backends(mech: Mechanism, pattern_of: PatternOf, *, flex: bool = False) -> None:
    """Register the backends every fixed-pattern mechanism shares, over its flattened tokens.

    ``reference``: the pattern as a dense mask over materialized scores (the spec); ``tiled``:
    the FA2 engine over the tiles the pattern touches (gives the LSE); ``flex``: compiled
    FlexAttention with the pattern as a BlockMask. Backends receive ``scale``, ``return_lse``
    and the pattern's parameters, which go to ``pattern_of``.
    """

    def reference(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, **params: Any) -> Any:
        pattern = pattern_of(q, k, **params)
        nq, nk = math.prod(q.shape[2:-1]), math.prod(k.shape[2:-1])
        allowed = masks.dense_mask(pattern, nq, nk, heads=q.shape[1], device=q.device)
        out, lse = materialized_attention(_flat(q), _flat(k), _flat(v), scale=scale, allowed=allowed)
        return _unflat(_result(out, lse, return_lse), q, v, return_lse)

    def tiled(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, **params: Any) -> Any:
        pattern = pattern_of(q, k, **params)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        plan = masks.plan_for(pattern, qf.shape[2], kf.shape[2], batch=q.shape[0], heads=q.shape[1])
        out, lse = tiled_attention(qf, kf, vf, plan=plan, scale=scale, mask_mod=pattern)
        return _unflat(_result(out, lse, return_lse), q, v, return_lse)

    def flex_backend(q: Tensor, k: Tensor, v: Tensor, *, scale: Any, return_lse: bool, **params: Any) -> Any:
        pattern = pattern_of(q, k, **params)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        block_mask = masks.flex_block_mask(pattern, qf.shape[2], kf.shape[2], heads=q.shape[1], device=q.device)
        return _unflat(flex_forward(qf, kf, vf, block_mask=block_mask, scale=scale, return_lse=return_lse), q, v, return_lse)

    mech.add_backend(
        Backend("reference", reference, doc="the pattern as a dense mask over materialized scores: the spec", priority=-100, materializes_scores=True)
    )
    # traceable=False: the BlockPlan is built from tensor values (a graph break under torch.compile)
    mech.add_backend(Backend("tiled", tiled, doc="the tiled FA2 engine over the key tiles the pattern touches (gives the LSE)", priority=20, traceable=False))
    if flex:
        mech.add_backend(Backend("flex", flex_backend, doc="compiled FlexAttention with the pattern as a BlockMask", accepts=_flex_accepts, **FLEX_CAPABILITIES))


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


def _attend_groups(q: Tensor, k: Tensor, v: Tensor, keys: Optional[Tensor], batch: int, scale: Optional[float]) -> Tensor:
    """One SDPA over partitioned groups (B * n_groups, H, members, D).

    ``keys`` (n_groups, members|1, members) bool says which keys each query of a group sees,
    the same for every batch entry (groups are batch-major); None or all True: no mask.
    """
    mask = None if keys is None or bool(keys.all()) else keys.repeat(batch, 1, 1).unsqueeze(1)
    return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


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
