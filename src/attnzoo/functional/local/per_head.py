"""Heterogeneous per-head sparse patterns (catalog L7): S2-Attention, MoA, LongGen, SinkLoRA."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels import block_sparse
from ...kernels.split_kv import merge_attention_states
from ...registry import PATTERNS, Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from ._shared import (
    _is_extent,
    _add_pattern_backends,
    key_padding_param,
    sample_padding,
)
from .._prefix_decoder import PrefixDecoder


@dataclass(frozen=True)
class HeadPattern:
    """One head's keys: the union of the parts given (query position ``i' = i + offset``).

    - ``window=(left, right)``: keys ``i' - left <= j <= i' + right`` (None: unbounded side);
    - ``sinks=S``: the first S keys;
    - ``stride=(period, phase)``: every key with ``j % period == phase`` (a strided shard);
    - ``block=(size, shift)``: keys in the query's block of ``size`` after shifting positions by
      ``shift`` (``(i' + shift) // size == (j + shift) // size``: LongLoRA/SinkLoRA groups).
    """

    window: Optional[tuple[Optional[int], Optional[int]]] = None
    sinks: int = 0
    stride: Optional[tuple[int, int]] = None
    block: Optional[tuple[int, int]] = None

    def problem(self) -> Optional[str]:
        """What is wrong with the spec, or None."""
        if self.window is None and not self.sinks and self.stride is None and self.block is None:
            return "at least one of window, sinks, stride, block"
        if self.window is not None and not (len(self.window) == 2 and all(_is_extent(x) for x in self.window)):
            return "window as (left, right), each a non-negative int or None"
        if not (isinstance(self.sinks, int) and self.sinks >= 0):
            return "sinks as a non-negative int"
        if self.stride is not None and not (len(self.stride) == 2 and self.stride[0] >= 1 and 0 <= self.stride[1] < self.stride[0]):
            return "stride as (period >= 1, 0 <= phase < period)"
        if self.block is not None and not (len(self.block) == 2 and self.block[0] >= 1 and 0 <= self.block[1] < self.block[0]):
            return "block as (size >= 1, 0 <= shift < size)"
        return None

    def allows(self, qp: Tensor, kv: Tensor) -> Tensor:
        parts = [torch.zeros_like(qp + kv, dtype=torch.bool)] if self.empty else []
        if self.window is not None:  # the built-in predicates for the parts the library already has
            parts.append(masks.sliding_window(*self.window)(None, None, qp, kv))
        if self.sinks:
            parts.append(masks.sinks(self.sinks)(None, None, qp, kv))
        if self.stride is not None:
            parts.append(kv % self.stride[0] == self.stride[1])
        if self.block is not None:
            size, shift = self.block
            parts.append((qp + shift).div(size, rounding_mode="floor") == (kv + shift).div(size, rounding_mode="floor"))
        out = parts[0]
        for part in parts[1:]:
            out = out | part
        return out

    @property
    def empty(self) -> bool:
        """No part at all: no key (only as the remainder of a strided head, see ``without_stride``)."""
        return self.window is None and not self.sinks and self.stride is None and self.block is None

    def without_stride(self) -> "HeadPattern":
        """The pattern less its strided shard (possibly empty)."""
        return HeadPattern(window=self.window, sinks=self.sinks, block=self.block)

    def tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor, offset: int) -> masks.TileGrid:
        """(visit, full) over tiles in closed form, O(tiles): the union of the parts' grids
        (``visit`` exact per part, ``full`` under-reports, as tile plans allow)."""
        nothing = torch.zeros(len(qf), len(kf), dtype=torch.bool)
        grids = [(nothing, nothing)] if self.empty else []
        if self.window is not None:
            grids.append(masks.sliding_window(*self.window, offset=offset)._tile_grid(qf, ql, kf, kl))
        if self.sinks:
            grids.append(masks.sinks(self.sinks)._tile_grid(qf, ql, kf, kl))
        if self.stride is not None:
            period, phase = self.stride
            first_hit = kf + torch.remainder(phase - kf, period)  # the block's first key of the shard
            visit = (first_hit <= kl)[None, :].expand(len(qf), -1)
            grids.append((visit, visit & (period == 1)))
        if self.block is not None:
            size, shift = self.block
            gq_lo, gq_hi = (qf + offset + shift).div(size, rounding_mode="floor"), (ql + offset + shift).div(size, rounding_mode="floor")
            gk_lo, gk_hi = (kf + shift).div(size, rounding_mode="floor"), (kl + shift).div(size, rounding_mode="floor")
            visit = (gq_lo[:, None] <= gk_hi[None, :]) & (gk_lo[None, :] <= gq_hi[:, None])
            full = (gq_lo == gq_hi)[:, None] & (gk_lo == gk_hi)[None, :] & (gq_lo[:, None] == gk_lo[None, :])
            grids.append((visit, full))
        visit, full = grids[0]
        for v, f in grids[1:]:
            visit, full = visit | v, full | f
        return visit, full


@dataclass(frozen=True)
class PerHeadMask(masks.MaskMod):
    """Head h uses ``patterns[h]`` (or the single pattern for every head), causal if asked."""

    patterns: tuple[HeadPattern, ...]
    offset: int
    causal: bool
    cacheable = True
    head_dependent_only = True

    @property
    def batch_head_dependent(self) -> bool:  # type: ignore[override]
        return len(self.patterns) > 1

    def head_tile_grids(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> masks.TileGrid:
        """(visit, full) per pattern head, (len(patterns), n_q_tiles, n_kv_tiles), in closed form."""
        grids = [p.tile_grid(qf, ql, kf, kl, self.offset) for p in self.patterns]
        visit, full = torch.stack([g[0] for g in grids]), torch.stack([g[1] for g in grids])
        if self.causal:
            cv, cf = masks.causal(self.offset)._tile_grid(qf, ql, kf, kl)
            visit, full = visit & cv, full & cf
        return visit, full

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> masks.TileGrid:
        visit, full = self.head_tile_grids(qf, ql, kf, kl)
        return visit.any(0), full.all(0)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qp = q_idx + self.offset
        result = None
        for head, pattern in enumerate(self.patterns):
            ok = pattern.allows(qp, kv_idx)
            result = ok if result is None else torch.where(h == head, ok, result)
        return result & (kv_idx <= qp) if self.causal else result


@dataclass(frozen=True)
class ShardKeys(masks.MaskMod):
    """A strided head's shard on its gathered keys: gathered key ``j'`` is key ``phase + period * j'``,
    visible when the rest of the head's pattern (``rest``, attended separately) does not hold it
    and, if causal, it is not after the query. One head: no batch or head dependence."""

    period: int
    phase: int
    rest: HeadPattern
    offset: int
    causal: bool
    cacheable = True

    def key(self, j: Tensor) -> Tensor:
        return self.phase + self.period * j

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qp, key = q_idx + self.offset, self.key(kv_idx)
        ok = ~self.rest.allows(qp, key)
        return ok & (key <= qp) if self.causal else ok

    def _tile_grid(self, qf: Tensor, ql: Tensor, kf: Tensor, kl: Tensor) -> masks.TileGrid:
        first, last = self.key(kf), self.key(kl)  # a gathered tile spans these original keys
        visit = torch.ones(len(qf), len(kf), dtype=torch.bool)
        full = visit
        if self.causal:
            visit, full = masks.causal(self.offset)._tile_grid(qf, ql, first, last)
        rest_visit, rest_full = self.rest.tile_grid(qf, ql, first, last, self.offset)
        # the rest's grid over the whole span holds for its shard keys: full there = no shard key left
        return visit & ~rest_full, full & ~rest_visit


def _as_head_patterns(value: Any) -> Optional[tuple[HeadPattern, ...]]:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    out = []
    for spec in value:
        if isinstance(spec, dict):
            try:
                spec = HeadPattern(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()})
            except TypeError:
                return None
        if not isinstance(spec, HeadPattern):
            return None
        out.append(spec)
    return tuple(out)


def _check_head_patterns(value: Any, p: Problem) -> Optional[str]:
    patterns = _as_head_patterns(value)
    expected = f"a list of 1 or {p.q_heads} HeadPattern (or dicts of window/sinks/stride/block), one per query head"
    if patterns is None or len(patterns) not in (1, p.q_heads):
        return expected
    for head, pattern in enumerate(patterns):
        issue = pattern.problem()
        if issue is not None:
            return f"{expected}; head {head} needs {issue}"
    return None


PER_HEAD_PARAMS = (
    Param("head_patterns", None, "per query head: a HeadPattern (window, sinks, stride shard, shifted block), or one for all", _check_head_patterns, (None, [], [{}], [{"window": (-1, 0)}], "window"), "list[HeadPattern]"),
    flag("causal", False, "no key after the query"),
    choice("causal_alignment", ("bottom_right", "top_left"), "bottom_right", "when Nq != Nk, where query i sits among the keys: i + Nk - Nq (bottom_right) or i (top_left)"),
    key_padding_param(),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


def _per_head_mask(q: Tensor, k: Tensor, *, head_patterns: Any, causal: bool, causal_alignment: str) -> PerHeadMask:
    return PerHeadMask(_as_head_patterns(head_patterns), masks.causal_offset(q.shape[2], k.shape[2], causal_alignment), causal)


def _per_head_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    causal = pattern.startswith("causal")
    if rng is None:  # plain: S2-Attention-like, a local window plus a strided shard per head
        w = max(1, min(128, p.kv_len // 8))
        heads = [HeadPattern(window=(w, 0 if causal else w), stride=(p.q_heads, h % p.q_heads)) for h in range(p.q_heads)]
        return {"head_patterns": heads, "causal": causal}

    def one() -> HeadPattern:
        spec: dict[str, Any] = {}
        if rng.random() < 0.6:
            spec["window"] = (rng.choice((None, 0, rng.randrange(0, 20))), rng.choice((None, 0, rng.randrange(0, 20))))
        if rng.random() < 0.4:
            spec["sinks"] = rng.randrange(1, 5)
        if rng.random() < 0.4:
            period = rng.randrange(1, 6)
            spec["stride"] = (period, rng.randrange(0, period))
        if rng.random() < 0.4 or not spec:
            size = rng.randrange(1, 12)
            spec["block"] = (size, rng.randrange(0, size))
        return HeadPattern(**spec)

    count = 1 if rng.random() < 0.2 else p.q_heads
    params: dict[str, Any] = {"head_patterns": [one() for _ in range(count)], "causal": causal}
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    if rng.random() < 0.3:
        params["return_lse"] = True
    pad = sample_padding(p, rng, pattern=pattern)
    if pad is not None:
        params["key_padding_mask"] = pad
    return params


#: A shard runs on its gathered keys (``sharded``) when its period is at least the first number,
#: or at least 2 from the second number of keys on. Measured (8 heads, window 64 + shard, causal,
#: D=64, 2 threads, ms sharded / fused): N=1024 period 2: 11.0 / 8.8, period 8: 7.0 / 8.8;
#: N=4096 period 2: 101 / 127, period 8: 39 / 124 (N=16384, the issue's 8 mixed heads: 226 / 1023).
SHARD_PERIOD, SHORT_SHARD_MIN_KEYS = 4, 4096


def _sharded_heads(patterns: tuple[HeadPattern, ...], heads: int, kv_len: int) -> list[tuple[int, HeadPattern]]:
    full = patterns if len(patterns) == heads else patterns * heads
    least = 2 if kv_len >= SHORT_SHARD_MIN_KEYS else SHARD_PERIOD
    return [(h, p) for h, p in enumerate(full) if p.stride is not None and p.stride[0] >= least]


def _sharded_accepts(p: Problem, params: dict) -> Optional[str]:
    reason = block_sparse.decline_reason(p)
    if reason is not None:
        return reason
    if params.get("key_padding_mask") is not None:
        return "key padding places each sequence's shards on its own span: the fused backend does that"
    if not _sharded_heads(_as_head_patterns(params["head_patterns"]), p.q_heads, p.kv_len):
        return f"no head has a strided shard of period >= {SHARD_PERIOD} (>= 2 from {SHORT_SHARD_MIN_KEYS} keys)"
    return None


def _sharded(q: Tensor, k: Tensor, v: Tensor, *, head_patterns: Any, causal: bool, causal_alignment: str, scale: Any, return_lse: bool, key_padding_mask: Optional[Tensor] = None) -> Any:
    """Strided shards on gathered keys: a head with ``stride=(P, phase)`` attends keys
    ``phase + P j'``, which on its own key order touch every 64 x 64 tile at 1/P density. Here
    every head's pattern less its shard runs as one block-sparse call, and each shard as another
    over its gathered keys ``k[phase::P]`` (tiles nearly full), minus the keys the rest already
    holds (:class:`ShardKeys`); the two are merged by their log-sum-exps. Exact: the key sets are
    disjoint and their union is the head's pattern."""
    patterns = _as_head_patterns(head_patterns)
    nq, nk = q.shape[2], k.shape[2]
    offset = masks.causal_offset(nq, nk, causal_alignment)
    sharded = _sharded_heads(patterns, q.shape[1], nk)
    shards = {h for h, _ in sharded}
    full = patterns if len(patterns) == q.shape[1] else patterns * q.shape[1]
    rest = tuple(p.without_stride() if h in shards else p for h, p in enumerate(full))
    rest_mask = PerHeadMask(rest, offset, causal)
    plan = block_sparse.SparsePlan.from_mask(rest_mask, nq, nk, batch=q.shape[0], heads=q.shape[1])
    out, lse = block_sparse.block_sparse_attention(q, k, v, plan, scale=scale)
    group = q.shape[1] // k.shape[1]
    outs, lses = list(out.unbind(1)), list(lse.unbind(1))
    for h, pattern in sharded:
        period, phase = pattern.stride
        keys = ShardKeys(period, phase, rest[h], offset, causal)
        kg, vg = k[:, h // group, phase::period], v[:, h // group, phase::period]
        if kg.shape[1] == 0:
            continue
        shard_plan = block_sparse.SparsePlan.from_mask(keys, nq, kg.shape[1])
        o_s, l_s = block_sparse.block_sparse_attention(q[:, h : h + 1], kg[:, None], vg[:, None], shard_plan, scale=scale)
        outs[h], lses[h] = merge_attention_states([outs[h], o_s[:, 0]], [lses[h], l_s[:, 0]])
    out, lse = torch.stack(outs, 1), torch.stack(lses, 1)
    return (out, lse) if return_lse else out


PER_HEAD = register(
    Mechanism(
        name="per_head_patterns",
        family="local",
        catalog=("L7",),
        paper="S2-Attention (hardware-aware context sharding); MoA (mixture of sparse attention); LongGen; SinkLoRA (SF-Attn)",
        formula="out_i^h = sum_{j in P_h(i)} softmax_j(scale q_i^h.k_j^h) v_j^h, P_h = window U sinks U stride shard U shifted block",
        cost="O(N * (visited keys per query) * D) on tiled; the tile plan is the union over heads",
        summary="a different sparse pattern per head: windows, sinks, strided shards, shifted groups (S2-Attn, MoA, LongGen, SinkLoRA)",
        patterns=frozenset(PATTERNS),
        params=PER_HEAD_PARAMS,
        gqa=True,
        sample_params=_per_head_sample_params,
    )
)
_add_pattern_backends(PER_HEAD, _per_head_mask, flex=True, spans=True)
PER_HEAD.add_backend(
    Backend(
        "sharded", _sharded, doc="each strided shard on its gathered keys (tiles nearly full), the rest on the fused kernel, merged by LSE",
        accepts=_sharded_accepts, **{**block_sparse.FUSED_CAPABILITIES, "priority": block_sparse.FUSED_CAPABILITIES["priority"] + 1},
    )
)


def per_head_patterns_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    head_patterns: Any,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Heterogeneous per-head sparse attention (catalog L7): head h attends the keys of ``head_patterns[h]``.

    Each :class:`HeadPattern` is a union of a local ``window``, ``sinks``, a strided shard
    (``stride=(period, phase)``) and a shifted ``block``; ``causal`` then removes later keys. The
    papers' patterns, expressed with it:

    - S2-Attention: head h reads shard h of the context plus a local window:
      ``HeadPattern(window=(w, 0), stride=(H, h % H))``.
    - MoA: per-head (per-layer) spans: ``HeadPattern(window=(span_h, 0))``.
    - LongGen: window + attention sinks + strided blocks:
      ``HeadPattern(window=(w, 0), sinks=4, stride=(period, 0))``.
    - SinkLoRA's SF-Attn (LongLoRA's shifted groups, plus sinks): half the heads
      ``HeadPattern(block=(G, 0), sinks=4)``, the other half ``HeadPattern(block=(G, G // 2), sinks=4)``.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D|Dv) (GQA allowed).
        head_patterns: one pattern per query head (or a single one for all), HeadPattern or dict.
        causal, causal_alignment: as in ``softmax_attention`` (bottom_right by default).
        key_padding_mask: (B, Nk) bool, True = ignore that key. As in ``sliding_window_attention``,
            each sequence's patterns are placed on its real keys (positions, sinks, shards and
            blocks counted from its first unpadded key; bottom-right cross alignment to its
            last), so a batch padded on either side equals each sequence run alone.
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, Hq, Nq).
        backend: ``sharded`` (strided shards on their gathered keys, the rest on the C++
            block-sparse kernel, merged by LSE: the pick on CPU when a head has a shard),
            ``fused`` (the C++ kernel over each head's tiles), ``tiled`` (the PyTorch FA2 engine),
            ``flex`` or ``reference``.

    Cost: O(N * keys per query * D) plus the tiles the heads' union touches.

    Example::

        >>> H = 8
        >>> heads = [HeadPattern(window=(128, 0), stride=(H, h)) for h in range(H)]  # S2-Attention
        >>> out = per_head_patterns_attention(q, k, v, head_patterns=heads, causal=True)
    """
    return PER_HEAD(
        q, k, v, backend=backend, head_patterns=head_patterns, causal=causal, causal_alignment=causal_alignment,
        key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


PER_HEAD.function = per_head_patterns_attention
PER_HEAD.decoder = PrefixDecoder("per_head_patterns", "new")
