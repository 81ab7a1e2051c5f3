"""Random key padding for the conformance suite, shared by every family's ``sample_params``."""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import ParameterError
from ..registry import Param, Problem


def sample_padding(p: Problem, rng: random.Random, *, right_only: bool = False, chance: float = 0.3, spatial: bool = False) -> Optional[Tensor]:
    """A random ``key_padding_mask`` (B, Nk) (or None, with probability ``1 - chance``): pads on
    the right, on the left or scattered, sometimes a batch entry with every key padded (its
    output must be finite, never NaN). ``right_only``: right pads only. ``spatial``: on N-D
    inputs, half the time in the (B, *spatial_k) form."""
    if rng.random() >= chance:
        return None
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    n = p.kv_len
    kind = "right" if right_only else rng.choice(("right", "left", "scattered"))
    if kind == "scattered":
        pad = torch.rand(p.batch, n, generator=gen) < rng.choice((0.2, 0.6))
    else:
        lengths = torch.randint(0, n + 1, (p.batch, 1), generator=gen)
        pos = torch.arange(n).view(1, -1)
        pad = pos >= lengths if kind == "right" else pos < n - lengths
    if rng.random() < 0.2:
        pad[0] = True
    if spatial and len(p.kv_shape) > 1 and rng.random() < 0.5:
        pad = pad.view(p.batch, *p.kv_shape)
    return pad.to(p.device)


def real_keys(key_padding_mask: Optional[Tensor], batch: int, length: int, device: torch.device) -> Tensor:
    """(B, N) bool, True = a real key: the inverse of ``key_padding_mask`` (any layout of N keys), or all True."""
    if key_padding_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return ~key_padding_mask.reshape(batch, length)


def refuse_unless_right_padded(name: str, mask: Optional[Tensor], why: str) -> None:
    """ParameterError naming ``key_padding_mask`` when a real key follows a pad in some row.

    For mechanisms that place tokens by their absolute position (blocks, groups): padding on the
    right leaves every real token where it was alone, padding before it moves it. One host sync.
    """
    if mask is None or mask.shape[1] < 2:
        return
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ParameterError(f"{name}: key_padding_mask: only padding on the right is exact here: {why}", argument="key_padding_mask")


def refuse_padding(name: str, mask: Optional[Tensor], why: str) -> None:
    """ParameterError naming ``key_padding_mask`` when any key is padded (a mask with no pad is
    accepted): for mechanisms whose selection reads every key of the sequence. One host sync."""
    if mask is not None and bool(mask.any()):
        raise ParameterError(f"{name}: key_padding_mask: padding is not supported: {why}", argument="key_padding_mask")


PADDING_DOC = (
    "(B, Nk) bool, or (B, *spatial_k) for spatial inputs (row-major, the same keys); True = ignore "
    "that key (torch.nn.MultiheadAttention's convention)"
)


def key_padding_param(one_d_refusal: Optional[str] = None, doc: str = PADDING_DOC) -> Param:
    """The family's ``key_padding_mask`` parameter: a bool tensor (B, Nk) or (B, *spatial_k).

    ``one_d_refusal``: why a mechanism whose partitions are placed by the sequence length cannot
    pad 1D sequences exactly; a mask on 1D inputs is then refused with that reason (the check
    runs before any backend, so the refusal is the same on every backend).
    """

    def check(value: Any, p: Problem) -> Optional[str]:
        if value is None:
            return None
        shapes = {(p.batch, p.kv_len), (p.batch, *p.kv_shape)}
        if not isinstance(value, Tensor) or value.dtype != torch.bool or tuple(value.shape) not in shapes or value.device != p.device:
            spatial = "" if len(p.kv_shape) == 1 else f" or (B, *spatial_k) = {(p.batch, *p.kv_shape)}"
            return f"None or a bool tensor of shape (B, Nk) = {(p.batch, p.kv_len)}{spatial} on {p.device} (True = ignore the key)"
        if one_d_refusal is not None and len(p.kv_shape) == 1:
            return f"None on 1D sequences: {one_d_refusal}"
        return None

    invalid = (torch.zeros(1, dtype=torch.bool), torch.zeros(1, 1), torch.zeros(1, 10**6, dtype=torch.bool))
    return Param("key_padding_mask", None, doc, check, invalid, "Tensor | None")
