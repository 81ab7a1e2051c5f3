"""Attention maps across layers and heads (catalog A1): rollout and per-head entropy."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ParameterError
from ._checks import as_float64, attention_maps, heads_first

__all__ = ["rollout", "head_entropy"]


def rollout(maps: Sequence[Tensor], *, residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

    Each layer's map is averaged over heads and mixed with the residual connection,
    ``A_l = residual I + (1 - residual) mean_h(W_l)``, its rows renormalized, and the layers are
    composed from the input up: ``R = A_L ... A_2 A_1``. Row i of R is how much each input token
    flows into position i of the last layer; rows sum to 1 when the maps' rows do.

    Args:
        maps: one (B, H, N, N) or (H, N, N) map per layer, first layer first.
        residual: the identity's share (the paper's 0.5).

    Returns:
        (B, N, N) or (N, N) in float64. Cost: O(L N^3).
    """
    if not isinstance(maps, Sequence) or not maps:
        raise ParameterError("maps: expected a non-empty sequence of per-layer maps", argument="maps")
    if not isinstance(residual, (int, float)) or isinstance(residual, bool) or not 0.0 <= residual <= 1.0:
        raise ParameterError(f"residual: expected a number in [0, 1], got {residual!r}", argument="residual")
    result = None
    for layer in maps:
        w = as_float64(attention_maps(layer, "maps", square=True)).mean(-3)
        if result is not None and w.shape != result.shape:
            raise ParameterError(f"maps: every layer must have the same shape, got {tuple(result.shape)} and {tuple(w.shape)}", argument="maps")
        eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
        mixed = residual * eye + (1.0 - residual) * w
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed if result is None else mixed @ result
    return result


def head_entropy(maps: Tensor, *, per_query: bool = False) -> Tensor:
    """Entropy of each head's rows, in nats (attention entropy; Zhai et al. 2023, "Stabilizing
    Transformer Training by Preventing Attention Entropy Collapse").

    ``H_i = -sum_j p_ij log p_ij`` (0 log 0 = 0), between 0 (one key) and log(n) (uniform over the
    n keys a row can see). Rows with no mass (a query that sees nothing) are left out.

    Args:
        maps: (..., H, Nq, Nk); leading axes are averaged.
        per_query: return (..., H, Nq) instead of the mean over queries.

    Returns:
        (H,) mean entropy per head (float64).
    """
    p = as_float64(attention_maps(maps, "maps"))
    terms = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    entropy = -terms.sum(-1)
    if per_query:
        return entropy
    live = (p.sum(-1) > 0).to(p.dtype)
    entropy, live = heads_first(entropy.unsqueeze(-1)).squeeze(-1), heads_first(live.unsqueeze(-1)).squeeze(-1)
    return (entropy * live).sum((0, 2)) / live.sum((0, 2)).clamp_min(1.0)


def max_entropy(n_keys: int) -> float:
    """log(n): the entropy of a uniform row over n keys (the upper bound of :func:`head_entropy`)."""
    return math.log(n_keys)
