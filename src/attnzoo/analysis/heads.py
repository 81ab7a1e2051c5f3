"""What heads do (catalog A3, A4): retrieval score, ablation importance, pattern clustering."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ParameterError
from ..hooks import ablate_heads, attention_hooks
from ._checks import as_float64, attention_maps, heads_first, positive_int

__all__ = ["retrieval_score", "head_ablation_importance", "cluster_heads"]


def retrieval_score(maps: Tensor, context_tokens: Tensor, output_tokens: Tensor, needle: tuple[int, int]) -> Tensor:
    """Retrieval-head score (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
    Factuality"): how often a head copies the needle while the model reproduces it.

    At step t the model emits ``output_tokens[t]``; head h *copies* at that step when the emitted
    token is in the needle and the key h attends to most, ``argmax_j p_h[t, j]``, lies inside the
    needle and holds that same token. The score is the number of copying steps over the needle's
    length (1 for a head that copies the whole needle, token by token).

    Args:
        maps: (..., H, T, Nk): one query per emitted token; leading axes (e.g. batch) averaged.
        context_tokens: (Nk,) token ids of the keys.
        output_tokens: (T,) the emitted token ids.
        needle: ``(start, end)``, the needle's key positions ``start <= j < end``.

    Returns:
        (H,) float64 in [0, 1].
    """
    p = heads_first(as_float64(attention_maps(maps, "maps")))
    nk, steps = p.shape[-1], p.shape[-2]
    if not isinstance(context_tokens, Tensor) or tuple(context_tokens.shape) != (nk,):
        raise ParameterError(f"context_tokens: expected a tensor of the {nk} key token ids", argument="context_tokens")
    if not isinstance(output_tokens, Tensor) or tuple(output_tokens.shape) != (steps,):
        raise ParameterError(f"output_tokens: expected a tensor of the {steps} emitted token ids", argument="output_tokens")
    start, end = needle if isinstance(needle, (tuple, list)) and len(needle) == 2 else (-1, -1)
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= nk):
        raise ParameterError(f"needle: expected (start, end) with 0 <= start < end <= {nk}, got {needle!r}", argument="needle")
    context_tokens, output_tokens = context_tokens.to(p.device), output_tokens.to(p.device)
    top = p.argmax(-1)  # (M, H, T)
    in_needle = (top >= start) & (top < end)
    same_token = context_tokens[top] == output_tokens.view(1, 1, -1)
    emitted_from_needle = torch.isin(output_tokens, context_tokens[start:end]).view(1, 1, -1)
    copies = (in_needle & same_token & emitted_from_needle).to(torch.float64).sum(-1)  # (M, H)
    return copies.mean(0) / (end - start)


def head_ablation_importance(
    metric: Callable[[], Any],
    layers: Sequence[str],
    heads: int,
    *,
    model: Optional[torch.nn.Module] = None,
) -> Tensor:
    """How much ``metric`` changes when one head's output is zeroed (Michel et al. 2019, "Are Sixteen
    Heads Really Better than One?"; the ablations of Wu et al. 2024).

    ``metric()`` runs the model and returns a number (a loss, an accuracy, a distance to the
    unablated output); it is called once as is, then once per (layer, head) inside
    ``attention_hooks(model, capture=False, edits=[ablate_heads(head, layers=[layer])])``.

    Args:
        layers: the layer names the hooks give the calls (``record.layer``: module paths with
            ``model``, ``"call<i>"`` by call order without).
        heads: heads per layer.

    Returns:
        (len(layers), heads) float64: ``metric(ablated) - metric()``. Cost: 1 + L H runs.
    """
    if not callable(metric):
        raise ParameterError("metric: expected a callable returning a number", argument="metric")
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not all(isinstance(x, str) for x in layers):
        raise ParameterError(f"layers: expected a sequence of layer names, got {layers!r}", argument="layers")
    heads = positive_int(heads, "heads")
    base = float(metric())
    result = torch.zeros(len(layers), heads, dtype=torch.float64)
    for i, layer in enumerate(layers):
        for h in range(heads):
            with attention_hooks(model, capture=False, edits=[ablate_heads(h, layers=[layer])]):
                result[i, h] = float(metric()) - base
    return result


def cluster_heads(maps: Tensor, clusters: int, *, iterations: int = 100, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Group heads by the shape of their maps: k-means on the flattened, L2-normalized maps.

    Heads that attend alike (to the previous token, to [CLS], broadly) share a cluster, as in the
    head-pattern groupings of Clark et al. (2019, "What Does BERT Look At?") and Li et al. (2023,
    "How Does Attention Work in Vision Transformers? A Visual Analytics Attempt"). k-means++
    seeding from ``seed`` makes it repeatable.

    Args:
        maps: (K, Nq, Nk): one map per head (e.g. every layer's heads stacked, batch-averaged).
        clusters: k <= K.

    Returns:
        ``(labels, centers)``: labels (K,) long, in order of first appearance (the first head is
        in cluster 0); centers (k, Nq * Nk) float64.
    """
    x = as_float64(attention_maps(maps.unsqueeze(0) if isinstance(maps, Tensor) and maps.dim() == 3 else maps, "maps"))
    if x.dim() != 4:
        raise ParameterError(f"maps: expected one map per head, (K, Nq, Nk), got {tuple(maps.shape)}", argument="maps")
    x = x[0].reshape(x.shape[1], -1)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    k = positive_int(clusters, "clusters")
    if k > x.shape[0]:
        raise ParameterError(f"clusters: at most the number of heads, {x.shape[0]}, got {k}", argument="clusters")
    positive_int(iterations, "iterations")
    centers = _kmeans_pp(x, k, torch.Generator().manual_seed(seed))
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iterations):
        labels = torch.cdist(x, centers).argmin(-1)
        moved = torch.stack([x[labels == c].mean(0) if bool((labels == c).any()) else centers[c] for c in range(k)])
        if torch.equal(moved, centers):
            break
        centers = moved
    return _relabel(labels, centers)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next center drawn with probability
    proportional to the squared distance to the nearest center chosen so far."""
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    centers = [x[first]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).min(-1).values ** 2
        if float(d2.sum()) == 0.0:  # fewer distinct maps than clusters: repeat one
            centers.append(x[first])
            continue
        centers.append(x[int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))])
    return torch.stack(centers)


def _relabel(labels: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Cluster ids renumbered in order of first appearance (repeatable whatever the seeding)."""
    order: list[int] = []
    for c in labels.tolist():
        if c not in order:
            order.append(c)
    order += [c for c in range(centers.shape[0]) if c not in order]
    mapping = torch.empty(len(order), dtype=torch.long)
    mapping[torch.tensor(order)] = torch.arange(len(order))
    return mapping[labels], centers[torch.tensor(order)]
