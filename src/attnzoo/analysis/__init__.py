"""Analysis of captured attention maps (catalog A1-A4).

Every function takes maps as :mod:`attnzoo.hooks` captures them, ``(..., H, Nq, Nk)`` (leading
axes, e.g. the batch, are averaged), and returns plain tensors, one number per head where that
makes sense:

* :mod:`.maps` (A1): :func:`rollout` (Abnar & Zuidema 2020), :func:`head_entropy`;
* :mod:`.sinks` (A2): :func:`first_token_mass`, :func:`sink_rate` (Gu et al. 2024),
  :func:`extreme_token_mass`, :func:`value_norm_drain` (Guo et al. 2024);
* :mod:`.heads` (A3, A4): :func:`retrieval_score` (Wu et al. 2024), :func:`head_ablation_importance`
  (Michel et al. 2019), :func:`cluster_heads`;
* :mod:`.spatial` (A4): :func:`attention_distance` (Dosovitskiy et al. 2021, Fig. 7).

``attnzoo analyze`` runs them on all-MiniLM-L6-v2 and writes a Markdown report with heatmaps.
"""

from __future__ import annotations

from .heads import cluster_heads, head_ablation_importance, retrieval_score
from .maps import head_entropy, rollout
from .sinks import extreme_token_mass, first_token_mass, sink_rate, value_norm_drain
from .spatial import attention_distance

__all__ = [
    "rollout",
    "head_entropy",
    "first_token_mass",
    "sink_rate",
    "extreme_token_mass",
    "value_norm_drain",
    "retrieval_score",
    "head_ablation_importance",
    "cluster_heads",
    "attention_distance",
]
