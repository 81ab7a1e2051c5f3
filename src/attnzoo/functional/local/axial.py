"""Axial attention: along one spatial axis (catalog L5)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ... import masks
from ...kernels.sdpa import sdpa
from ...registry import Mechanism, Param, Problem, flag, positive_number, register
from ._shared import (
    _no_lse,
    _check_self,
    _add_pattern_backends,
    key_padding_param,
    masked_sdpa,
    sample_padding,
    unpadded_keys,
)


@dataclass(frozen=True)
class AxialMask(masks.MaskMod):
    """Tokens see the tokens of their line along ``axis`` (all other coordinates equal)."""

    shape: tuple[int, ...]
    axis: int
    causal: bool
    cacheable = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        inner = math.prod(self.shape[self.axis + 1 :])
        size = self.shape[self.axis]
        cq, ck = (q_idx // inner) % size, (kv_idx // inner) % size
        # the same line: every coordinate but `axis` agrees
        same_line = (q_idx - cq * inner) == (kv_idx - ck * inner)
        return same_line & (ck <= cq) if self.causal else same_line


def _check_axis(value: Any, p: Problem) -> Optional[str]:
    n = len(p.q_shape)
    ok = isinstance(value, int) and not isinstance(value, bool) and -n <= value < n
    return None if ok else f"a spatial axis index in [{-n}, {n}) (0 is the first axis after the heads)"


AXIAL_PARAMS = (
    Param("axis", None, "the spatial axis to attend along (negative counts from the last)", _check_axis, (None, 3, -4, "0", 1.0), "int"),
    flag("causal", False, "only earlier tokens of the line (along the axis)"),
    key_padding_param(),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _axial_mask(q: Tensor, k: Tensor, *, axis: int, causal: bool) -> AxialMask:
    shape = tuple(q.shape[2:-1])
    return AxialMask(shape, axis % len(shape), causal)


def _lines(x: Tensor, axis: int) -> tuple[Tensor, tuple[int, ...]]:
    """(B, H, *spatial, D) -> (B * other, H, L_axis, D): one attention problem per line."""
    d = x.dim()
    moved = x.movedim(2 + axis, d - 2)  # (B, H, *other, L, D)
    other = tuple(moved.shape[2:-2])
    lines = moved.movedim(1, d - 3)  # (B, *other, H, L, D)
    return lines.reshape(-1, *lines.shape[-3:]), other


def _unlines(out: Tensor, batch: int, other: tuple[int, ...], axis: int) -> Tensor:
    lines = out.reshape(batch, *other, *out.shape[-3:])  # (B, *other, H, L, D)
    d = lines.dim()
    return lines.movedim(d - 3, 1).movedim(d - 2, 2 + axis)


def _axial_sdpa(q, k, v, *, axis, causal, scale, return_lse, key_padding_mask=None):
    """Each line along the axis becomes one SDPA problem (other axes folded into the batch): exact, O(N * L_axis)."""
    axis = axis % (q.dim() - 3)
    ql, other = _lines(q, axis)
    kl, _ = _lines(k, axis)
    vl, _ = _lines(v, axis)
    if key_padding_mask is None:
        out = sdpa(ql, kl, vl, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    else:  # the padding through the same lines: (B * other, 1, 1, L) keys kept
        allowed = (_lines(unpadded_keys(key_padding_mask, k), axis)[0] > 0.5).transpose(-1, -2)
        if causal:
            length = ql.shape[2]
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        out = masked_sdpa(ql, kl, vl, allowed, scale)
    return _unlines(out, q.shape[0], other, axis)


def _axial_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    n = len(p.q_shape)
    params: dict[str, Any] = {"axis": -1 if rng is None else rng.randrange(-n, n), "causal": pattern.startswith("causal")}
    if rng is not None and rng.random() < 0.3:
        params["return_lse"] = True
    pad = None if rng is None else sample_padding(p, rng)
    if pad is not None:
        params["key_padding_mask"] = pad
    return params


AXIAL = register(
    Mechanism(
        name="axial",
        family="local",
        catalog=("L5",),
        paper="Axial Attention in Multidimensional Transformers (Ho et al., 2019); used by P2AT and light-field EPI attention",
        formula="out_x = sum_{y on x's line along axis} softmax_y(scale q_x.k_y) v_y",
        cost="O(N * L_axis * D) time; O(N) memory (sdpa on lines)",
        summary="attention along one spatial axis (the other coordinates fixed), causal along it",
        patterns=frozenset({"noncausal_self", "causal_self"}),
        params=AXIAL_PARAMS,
        spatial_dims=(1, 2, 3),
        gqa=True,
        sample_params=_axial_sample_params,
        check_params=_check_self,
    )
)
_add_pattern_backends(AXIAL, _axial_mask, flex=True)
AXIAL.implementation("sdpa", accepts=_no_lse, priority=50)(_axial_sdpa)


def axial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    axis: int,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Axial attention (catalog L5): each token attends the tokens of its line along ``axis``.

    For q, k, v of shape (B, H, S_0, ..., S_{n-1}, D), token x attends the tokens y that agree
    with it on every spatial coordinate except ``axis``::

        out_x = sum_{y: y_a = x_a for a != axis} softmax_y(scale * q_x . k_y) v_y

    (causal: only ``y_axis <= x_axis``). On 1 spatial axis this is full attention.

    Args:
        q, k, v: (B, H, *spatial, D), 1-3 spatial axes, k/v may have fewer heads (GQA).
        axis: which spatial axis (0 = the first after the heads; negative from the last).
        causal: along the axis. scale: defaults to ``D ** -0.5``. return_lse: also return lse.
        key_padding_mask: (B, Nk) or (B, *spatial) bool, True = ignore that key: pads are masked
            out of their line (a query left with no key outputs 0). A line is the whole
            sequence in 1D and causality is relative, so a 1D batch padded on either side
            equals each sequence alone.
        backend: ``sdpa`` (lines folded into the batch), ``tiled`` (gives the LSE), ``flex``
            (FlexAttention: the LSE with gradients on CUDA) or ``reference``.

    Cost: O(N * S_axis * D). Paper: Axial Attention in Multidimensional Transformers.

    Example::

        >>> x = torch.randn(2, 8, 64, 64, 32)          # (B, H, height, width, D)
        >>> rows = axial_attention(x, x, x, axis=-1)   # along the width
        >>> cols = axial_attention(x, x, x, axis=0)    # along the height
    """
    return AXIAL(q, k, v, backend=backend, axis=axis, causal=causal, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


AXIAL.function = axial_attention
AXIAL.decoder_refusal = "a causal line along one axis of an N-D grid has no token order to decode in"
