"""Sliding-window attention with attention sinks (catalog L2) and its StreamingLLM decoder."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...errors import ParameterError
from ...kernels.band import band_supported, causal_band_attention
from ...kernels.reference import default_scale, materialized_attention
from ...registry import PATTERNS, Backend, DecodingState, Mechanism, Param, Problem, choice, flag, positive_number, register
from ._shared import (
    _is_extent,
    _result,
    _add_pattern_backends,
    key_padding_param,
    no_padding,
    sample_padding,
)


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _check_window(value: Any, p: Problem) -> Optional[str]:
    expected = "an int (the same extent both sides) or a (left, right) pair, each a non-negative int or None (unbounded on that side)"
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value >= 0 else expected
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_extent(x) for x in value):
        return None
    return expected


def _check_sinks(value: Any, p: Problem) -> Optional[str]:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "a non-negative int"


def _extents(window: Any, causal: bool) -> tuple[Optional[int], Optional[int]]:
    """(left, right) from ``window`` (an int means both sides; causal means right = 0)."""
    if isinstance(window, int):
        return window, (0 if causal else window)
    return window[0], window[1]


def _check_combination(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound["causal"] and not isinstance(bound["window"], int) and bound["window"][1] != 0:
        return "window", f"the right extent must be 0 with causal=True (causal means right = 0), got {tuple(bound['window'])}"
    return None


SLIDING_WINDOW_PARAMS = (
    Param(
        "window",
        None,
        "required: (left, right) keys each side of the query (an entry None: unbounded on that side), or an int for both sides",
        _check_window,
        (None, (-1, 0), (3,), "256", (1.5, 0)),
        "int | (int | None, int | None)",
    ),
    flag("causal", False, "no key after the query (right extent 0)"),
    Param("sinks", 0, "the first `sinks` keys are seen by every query (attention sinks)", _check_sinks, (-1, 1.0, "2"), "int"),
    choice(
        "causal_alignment",
        ("bottom_right", "top_left"),
        "bottom_right",
        "when Nq != Nk, where query i sits among the keys: i + Nk - Nq (bottom_right) or i (top_left)",
    ),
    key_padding_param(),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row, (B, H, Nq)"),
)


# --------------------------------------------------------------------------------------------
# the pattern
# --------------------------------------------------------------------------------------------
def _pattern(nq: int, nk: int, window: Any, causal: bool, sinks: int, alignment: str) -> masks.MaskMod:
    left, right = _extents(window, causal)
    offset = masks.causal_offset(nq, nk, alignment)
    pattern = masks.sliding_window(left, right, offset=offset)
    if sinks:
        sink = masks.sinks(sinks)
        pattern = pattern | (sink & masks.causal(offset) if causal else sink)
    return pattern


def _sliding_pattern(q: Tensor, k: Tensor, *, window: Any, causal: bool, sinks: int, causal_alignment: str) -> masks.MaskMod:
    return _pattern(q.shape[2], k.shape[2], window, causal, sinks, causal_alignment)


# --------------------------------------------------------------------------------------------
# decoding: a rolling cache of the sinks and the last `left` keys (StreamingLLM)
# --------------------------------------------------------------------------------------------
@dataclass
class RollingKV(DecodingState):
    """The keys a causal sliding window can still need: the sinks and the last ``left`` keys.

    Memory stays O((sinks + left) * D) however long the stream; ``positions`` are the keys'
    absolute positions. Each step makes new tensors (a concatenation, then the kept rows), so
    the state a step read is never changed.
    """

    k: Optional[Tensor] = None
    v: Optional[Tensor] = None
    positions: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    seen: int = 0


class _SlidingWindowDecoder:
    """StreamingLLM decoding; ``window``, ``sinks``, ``scale`` and ``causal`` are bound at init_state."""

    per_step = frozenset({"causal_alignment", "return_lse", "key_padding_mask"})  # decoding is bottom-right whatever the alignment

    def init_state(self, problem: Problem, **params: Any) -> RollingKV:
        return RollingKV()

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: RollingKV, **params: Any) -> tuple[Any, RollingKV]:
        if params.get("key_padding_mask") is not None:
            raise ParameterError("sliding_window: key_padding_mask: not supported while decoding (pass None)", argument="key_padding_mask")
        left, right = _extents(params["window"], True)
        if not params["causal"] or right != 0:
            raise ParameterError("sliding_window: causal: decoding needs causal=True (no key after the query)", argument="causal")
        sinks, t = params["sinks"], q.shape[2]
        new_pos = torch.arange(state.seen, state.seen + t)
        keys = k if state.k is None else torch.cat([state.k, k], dim=2)
        values = v if state.v is None else torch.cat([state.v, v], dim=2)
        pos = torch.cat([state.positions, new_pos])
        # the forward's own pattern, on absolute positions (so no alignment offset)
        pattern = _pattern(0, 0, params["window"], True, sinks, "top_left")
        allowed = pattern(None, None, new_pos[:, None], pos[None, :])
        out, lse = materialized_attention(q, keys, values, scale=params["scale"], allowed=allowed.to(q.device))
        seen = state.seen + t
        keep = torch.ones_like(pos, dtype=torch.bool) if left is None else (pos < sinks) | (pos >= seen - left)
        keep_idx = keep.nonzero().flatten().to(keys.device)
        after = dataclasses.replace(
            state, k=keys.index_select(2, keep_idx), v=values.index_select(2, keep_idx), positions=pos[keep], seen=seen
        )
        return _result(out, lse, params["return_lse"]), after


# --------------------------------------------------------------------------------------------
# parameters for the suite and the benchmark
# --------------------------------------------------------------------------------------------
def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    causal = pattern.startswith("causal")
    if rng is None:  # the plain case: a quarter of the keys (256 at most) each side
        extent = max(1, min(256, p.kv_len // 4))
        return {"window": (extent, 0) if causal else (extent, extent), "causal": causal}
    left = rng.choice((None, 0, 1, rng.randrange(0, 40)))
    right = 0 if causal else rng.choice((None, 0, rng.randrange(0, 40)))
    params: dict[str, Any] = {"window": (left, right), "causal": causal}
    if rng.random() < 0.4:
        params["sinks"] = rng.randrange(0, 6)
    if rng.random() < 0.3:
        params["causal_alignment"] = "top_left"
    if rng.random() < 0.3:
        params["return_lse"] = True
    pad = sample_padding(p, rng, pattern=pattern)
    if pad is not None:
        params["key_padding_mask"] = pad
    return params


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
SLIDING_WINDOW = register(
    Mechanism(
        name="sliding_window",
        family="local",
        catalog=("L2",),
        paper="Longformer (Beltagy et al., 2020) local attention; sinks: StreamingLLM (Xiao et al., 2024) via SinkLoRA, LongGen",
        formula="out_i = sum_{j in W(i)} softmax_j(scale q_i.k_j) v_j, W(i) = {i'-left <= j <= i'+right} U {j < sinks}",
        cost="O(N * (left + right + sinks) * D) time (tiled, flex); O(Nq * Nk) memory (reference)",
        summary="1D sliding-window attention, (left, right) extents, causal, attention sinks",
        patterns=frozenset(PATTERNS),
        params=SLIDING_WINDOW_PARAMS,
        gqa=True,
        decoder=_SlidingWindowDecoder(),
        sample_params=_sample_params,
        check_params=_check_combination,
    )
)
_add_pattern_backends(SLIDING_WINDOW, _sliding_pattern, flex=True, spans=True)


# --------------------------------------------------------------------------------------------
# the causal band on PyTorch's fused CPU kernel
# --------------------------------------------------------------------------------------------
#: Windows below this many keys leave the band's chunks too short for the fused kernel to pay.
_BAND_MIN_LEFT = 32


def _band_accepts(p: Problem, params: dict) -> Optional[str]:
    left, right = _extents(params["window"], params["causal"])
    if right != 0 or left is None or left < 1:
        return "needs a causal window with a finite left extent >= 1 (window=(left, 0))"
    if params["sinks"]:
        return "no attention sinks (the band has no room for them: use tiled)"
    if p.q_len != p.kv_len:
        return "needs self-attention shapes (Nq == Nk)"
    if p.value_dim != p.head_dim:
        return "the fused CPU kernel needs v's head dim equal to q's"
    if params["return_lse"] and p.dtype != torch.float32:
        # the fused kernel scales q in the input dtype: its bf16 LSE was measured 4e-4 off (relative)
        return "returns a float32-exact LSE only for float32 inputs (use tiled)"
    return no_padding(p, params) or band_supported(p.device, p.dtype)


def _band_prefers(p: Problem, params: dict) -> Optional[str]:
    left = _extents(params["window"], params["causal"])[0]
    return None if left >= _BAND_MIN_LEFT else f"left < {_BAND_MIN_LEFT}: chunks too short for the fused kernel, tiled is faster"


def _band(q: Tensor, k: Tensor, v: Tensor, *, window: Any, causal: bool, scale: Any, return_lse: bool, **_: Any) -> Any:
    group = q.shape[1] // k.shape[1]
    if group > 1:  # the fused kernel wants equal heads; autograd sums the copies' gradients back
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    left = _extents(window, causal)[0]
    out, lse = causal_band_attention(q, k, v, left=left, scale=default_scale(q, scale))
    return _result(out, lse, return_lse)


SLIDING_WINDOW.add_backend(
    Backend(
        "band",
        _band,
        doc="causal window as two fused CPU SDPA calls over chunks (diagonal and reversed previous chunk), merged by LSE",
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        devices=frozenset({"cpu"}),
        accepts=_band_accepts,
        prefers=_band_prefers,
        priority=30,
    )
)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: Any,
    causal: bool = False,
    sinks: int = 0,
    causal_alignment: str = "bottom_right",
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Sliding-window attention with optional attention sinks (catalog L2).

    Query i, at key position ``i' = i + Nk - Nq`` (``causal_alignment="bottom_right"``, the
    default) or ``i' = i`` (``"top_left"``), attends the keys
    ``W(i) = {j : i' - left <= j <= i' + right} U {j < sinks}`` with softmax weights::

        out_i = sum_{j in W(i)} exp(s_ij) v_j / sum_{j in W(i)} exp(s_ij),   s_ij = scale * q_i . k_j

    Args:
        q: (B, Hq, Nq, D). k, v: (B, Hkv, Nk, D|Dv), Hq a multiple of Hkv.
        window: ``(left, right)`` key counts before/after the query (``None``: unbounded on that
            side), or an int for both sides (with ``causal``, left only).
        causal: no key after the query (the right extent must then be 0).
        sinks: every query also sees the first ``sinks`` keys (StreamingLLM); causally if causal.
        key_padding_mask: (B, Nk) bool, True = ignore that key. Each sequence's pattern is placed
            on its real keys (from its first to its last unpadded key) as if it ran alone: the
            sinks are its first real keys and positions count from there; in cross-attention
            (Nq != Nk) bottom-right alignment is to its last real key. So a batch padded on the
            right or the left equals each sequence run alone (self-attention: on its real
            query rows); pads inside a span are simply masked. A query with no visible key
            outputs 0. One host sync per call (the spans).
        scale: defaults to ``D ** -0.5``. return_lse: also return lse (B, Hq, Nq), float32.
        backend: force ``reference``, ``tiled`` or ``flex``.

    Cost: O(N * (left + right + 1 + sinks) * D) time and O(N * tile) memory on ``tiled``.
    Decoding (``init_state``/``step``, causal) keeps only the sinks and the last ``left`` keys.
    Papers: Longformer (local window); StreamingLLM sinks as used by SinkLoRA and LongGen.

    Example::

        >>> q = k = v = torch.randn(1, 8, 16384, 64)
        >>> out = sliding_window_attention(q, k, v, window=(256, 0), causal=True, sinks=4)
    """
    return SLIDING_WINDOW(
        q, k, v, backend=backend, window=window, causal=causal, sinks=sinks,
        causal_alignment=causal_alignment, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


SLIDING_WINDOW.function = sliding_window_attention
SLIDING_WINDOW.check_inputs = True  # a key is seen by its window alone: an inf one could vanish
