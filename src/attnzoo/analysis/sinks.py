"""Attention sinks and drains (catalog A2).

A *sink* is a key that receives a large share of attention whatever the query, typically the
first token (Xiao et al. 2024, StreamingLLM; Gu et al. 2024, "When Attention Sink Emerges in
Language Models: An Empirical View"). Guo et al. (2024, "Active-Dormant Attention Heads:
Mechanistically Demystifying Extreme-Token Phenomena in LLMs") show such extreme tokens have small
value states, so a head attending to them "drains": it outputs almost nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ParameterError
from ._checks import as_float64, attention_maps, heads_first, positive_int

__all__ = ["first_token_mass", "sink_rate", "extreme_token_mass", "value_norm_drain"]


def _received(maps: Tensor) -> Tensor:
    """(H, Nk): the mean attention each key receives, over queries and leading axes."""
    p = heads_first(as_float64(attention_maps(maps, "maps")))
    return p.mean((0, 2))


def first_token_mass(maps: Tensor) -> Tensor:
    """(H,): the mean attention the first key receives, over queries (and leading axes)."""
    return _received(maps)[:, 0]


def sink_rate(maps: Sequence[Tensor], *, threshold: float = 0.3) -> float:
    """Gu et al. (2024)'s sink metric: the share of heads, over all layers, whose first-token mass
    exceeds ``threshold`` (the paper's epsilon = 0.3).

    Args:
        maps: one (..., H, Nq, Nk) map per layer.
    """
    if not isinstance(maps, Sequence) or not maps:
        raise ParameterError("maps: expected a non-empty sequence of per-layer maps", argument="maps")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ParameterError(f"threshold: expected a number in [0, 1], got {threshold!r}", argument="threshold")
    masses = torch.cat([first_token_mass(m) for m in maps])
    return float((masses > threshold).to(torch.float64).mean())


def extreme_token_mass(maps: Tensor, *, top: int = 1) -> tuple[Tensor, Tensor]:
    """The mass on each head's most-attended keys (Guo et al. 2024's extreme tokens).

    Returns ``(mass, index)``: ``mass`` (H,) is the mean attention the ``top`` keys receiving the
    most attention together receive, ``index`` (H, top) which keys they are.
    """
    received = _received(maps)
    top = positive_int(top, "top")
    if top > received.shape[-1]:
        raise ParameterError(f"top: at most Nk = {received.shape[-1]}, got {top}", argument="top")
    mass, index = received.topk(top, dim=-1)
    return mass.sum(-1), index


def value_norm_drain(maps: Tensor, v: Tensor) -> Tensor:
    """(H,): the value norm of each head's most-attended key over the mean value norm of its keys.

    Below 1, the head pours its attention on a key whose value carries little: a drain (Guo et al.
    2024). ``v`` is the call's values (..., Hkv, Nk, Dv), with Hq a multiple of Hkv (GQA), and the
    same leading axes as ``maps``; the norms are averaged over them.
    """
    received = _received(maps)
    if not isinstance(v, Tensor) or not v.is_floating_point() or v.dim() < 3 or v.shape[-2] != received.shape[-1]:
        raise ParameterError(f"v: expected values (..., Hkv, Nk={received.shape[-1]}, Dv)", argument="v")
    norms = heads_first(as_float64(v).norm(dim=-1).unsqueeze(-1)).squeeze(-1).mean(0)  # (Hkv, Nk)
    if received.shape[0] % norms.shape[0]:
        raise ParameterError(f"v: {norms.shape[0]} value heads do not divide {received.shape[0]} query heads", argument="v")
    norms = norms.repeat_interleave(received.shape[0] // norms.shape[0], dim=0)
    top = received.argmax(-1, keepdim=True)
    return norms.gather(-1, top).squeeze(-1) / norms.mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
