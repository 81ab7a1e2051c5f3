"""Random key padding for the conformance suite, shared by every family's ``sample_params``."""

from __future__ import annotations

import random
from typing import Optional

import torch
from torch import Tensor

from ..errors import ParameterError
from ..registry import Problem


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


def refuse_unless_right_padded(name: str, mask: Optional[Tensor], why: str) -> None:
    """ParameterError naming ``key_padding_mask`` when a real key follows a pad in some row.

    For mechanisms that place tokens by their absolute position (blocks, groups): padding on the
    right leaves every real token where it was alone, padding before it moves it. One host sync.
    """
    if mask is None or mask.shape[1] < 2:
        return
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ParameterError(f"{name}: key_padding_mask: only padding on the right is exact here: {why}", argument="key_padding_mask")
