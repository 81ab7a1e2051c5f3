"""Post-softmax calibration edits (catalog V9) on the hook API of :mod:`attnzoo.hooks` (X1).

Each function returns an :class:`attnzoo.hooks.Edit` whose ``probs`` callable rewrites the
attention probabilities ``A`` (B, H, Nq, Nk) of the calls it selects, before ``A @ V``; use them
as ``with attention_hooks(model, edits=[...])``. Every edit moves mass between keys of the same
row, so a row that summed to 1 still does (no renormalization of the whole row is needed), and it
is differentiable. All are training-free (inference-time) interventions.

* :func:`calibrate_sinks` (ACT; Yu et al., "Unveiling and Harnessing Hidden Attention Sinks:
  Enhancing Large Language Models without Training through Attention Calibration", ICML 2024,
  Sec. 4): in the chosen heads, the sink tokens ``S`` keep a fraction ``keep`` of their attention
  and the rest goes to the other keys in proportion to their attention::

      A'_is = keep A_is  (s in S),     A'_ij = A_ij + (1 - keep) (sum_{s in S} A_is) A_ij / sum_{j' not in S} A_ij'

  Sinks are given, or found per (batch, head) as the keys whose attention exceeds ``threshold / Nk``
  averaged over the queries (ACT's ``alpha / N`` criterion; the first token is left alone by
  default, as ACT does).
* :func:`redistribute_visual_sinks` (VAR; Kang et al., "See What You Are Told: Visual Attention Sink
  in Large Multimodal Models", ICLR 2025, Sec. 4): in *image-centric* heads (whose share of the
  image attention that goes to non-sink image tokens, averaged over the queries, is at least
  ``rho``) a fraction ``p`` of the attention to the visual sink tokens is recycled onto the
  non-sink image tokens, in proportion to their attention::

      Omega_i = p sum_{s in V_sink} A_is,   A'_is = (1 - p) A_is,   A'_ij = A_ij + Omega_i A_ij / sum_{j' in V \\ V_sink} A_ij'  (j in V \\ V_sink)

* :func:`modulate_heads` (per-head modulation, as in "Fixing Imbalanced Attention to Mitigate
  In-Context Hallucination of LVLMs" and the head selection of "Vision-aware Head Divergence"):
  head ``h`` scales its attention to the chosen keys by ``m_h`` and renormalizes its rows::

      A'_hij = A_hij w_hj / sum_j' A_hij' w_hj',   w_hj = m_h for the chosen keys j, 1 elsewhere

A row with no mass on the receiving keys (nothing to redistribute onto) is left unchanged. Cost
O(B H Nq Nk) per edited call (on top of the materialized reference the edit already implies).
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor

from .errors import ParameterError
from .hooks import AttentionRecord, Edit, Heads, Layers, _head_mask, _heads_index, _keys_index

__all__ = ["calibrate_sinks", "redistribute_visual_sinks", "modulate_heads", "move_mass"]


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ParameterError(f"{name}: expected a number in [0, 1], got {value!r}", argument=name)
    return float(value)


def move_mass(p: Tensor, donors: Tensor, receivers: Tensor, share: Union[float, Tensor]) -> Tensor:
    """Move ``share`` of each row's mass on ``donors`` onto ``receivers``, in proportion to the receivers' weights.

    ``donors``, ``receivers``: bool masks broadcastable to ``p`` (disjoint); ``share`` a number or a
    tensor broadcastable to (B, H, Nq, 1). Rows whose receivers hold no mass are left unchanged,
    so each row's sum is kept.
    """
    donors, receivers = donors & ~receivers, receivers
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    donated = torch.where(donors, p, zero)
    received = torch.where(receivers, p, zero)
    recv_total = received.sum(-1, keepdim=True)
    share = torch.as_tensor(share, dtype=p.dtype, device=p.device)
    share = torch.where(recv_total > 0, share, zero)  # nothing to receive it: leave the row
    moved = share * donated.sum(-1, keepdim=True)
    safe = torch.where(recv_total > 0, recv_total, torch.ones_like(recv_total))
    return p - share * donated + moved * received / safe


def calibrate_sinks(sinks: Any = None, *, keep: float = 0.4, threshold: float = 5.0, keep_first: bool = True, heads: Heads = None,
                    layers: Layers = None) -> Edit:
    """ACT's attention calibration: sink tokens keep ``keep`` of their attention, the rest goes to the other keys.

    Args:
        sinks: key indices, or an (Nk,) / (B, Nk) bool mask; None: found per (batch, head) as the keys whose
            attention, averaged over the queries, exceeds ``threshold / Nk``.
        keep: the fraction p of the sinks' attention that stays on them (ACT's p; 0.4 in its code).
        threshold: ACT's alpha (auto-detection only). keep_first: never calibrate key 0 (ACT keeps the initial token).
        heads: the heads to calibrate (None: all); layers: which calls (names or a predicate; None: all).
    """
    keep = _fraction("keep", keep)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ParameterError(f"threshold: expected a positive number, got {threshold!r}", argument="threshold")
    head_index = _heads_index(heads)

    def probs(p: Tensor, record: AttentionRecord) -> Tensor:
        nk = p.shape[-1]
        if sinks is None:
            found = p.mean(-2, keepdim=True) > threshold / nk  # (B, H, 1, Nk)
        else:
            found = _keys_index(sinks, nk, p)
        if keep_first:
            first = torch.zeros(nk, dtype=torch.bool, device=p.device)
            first[0] = True
            found = found & ~first
        donors = found & _head_mask(head_index, p, record)
        return move_mass(p, donors, ~found, 1.0 - keep)

    return Edit(probs=probs, layers=layers)


def redistribute_visual_sinks(image_tokens: Any, sink_tokens: Any, *, p: float = 0.6, rho: float = 0.5, heads: Heads = None,
                              layers: Layers = None) -> Edit:
    """VAR: recycle ``p`` of the attention to visual sink tokens onto the other image tokens, in image-centric heads.

    Args:
        image_tokens: the keys that are image tokens (indices, or an (Nk,) / (B, Nk) bool mask).
        sink_tokens: the visual sink tokens among them (same forms; VAR finds them by their massive activation
            in the sink dimensions, :mod:`attnzoo.analysis.sinks` helps).
        p: the fraction recycled (VAR's p). rho: a head is image-centric when, averaged over its queries,
            sum(non-sink image attention) / sum(image attention) >= rho (VAR's rho).
        heads: None selects the image-centric heads per (batch, head); a list forces those heads (rho ignored).
        layers: which calls.
    """
    p_share, rho = _fraction("p", p), _fraction("rho", rho)
    head_index = _heads_index(heads)

    def probs(a: Tensor, record: AttentionRecord) -> Tensor:
        nk = a.shape[-1]
        image, sink = _keys_index(image_tokens, nk, a), _keys_index(sink_tokens, nk, a)
        sink = sink & image
        rest = image & ~sink
        if head_index is None:
            zero = torch.zeros((), dtype=a.dtype, device=a.device)
            on_image = torch.where(image, a, zero).sum(-1)
            on_rest = torch.where(rest, a, zero).sum(-1)
            ratio = torch.where(on_image > 0, on_rest / torch.where(on_image > 0, on_image, torch.ones_like(on_image)), zero)
            chosen = (ratio.mean(-1) >= rho)[..., None, None]  # (B, H, 1, 1)
        else:
            chosen = _head_mask(head_index, a, record)
        return move_mass(a, sink & chosen, rest, p_share)

    return Edit(probs=probs, layers=layers)


def modulate_heads(factors: Union[Sequence[float], Tensor, dict], keys: Any = None, *, layers: Layers = None) -> Edit:
    """Per-head modulation: head h scales its attention to ``keys`` by ``m_h`` and renormalizes the row.

    Args:
        factors: (H,) factors m_h (>= 0), or ``{head: factor}`` (other heads 1).
        keys: the keys modulated (indices or bool mask; None: every key, which leaves a softmax row unchanged
            after renormalization, so give the image/system tokens to boost or damp).
        layers: which calls.
    """
    if isinstance(factors, dict):
        table = dict(factors)
        if not all(isinstance(h, int) and not isinstance(h, bool) for h in table):
            raise ParameterError("factors: a dict must map head indices (int) to factors", argument="factors")
        values = list(table.values())
    else:
        table = None
        values = factors.tolist() if isinstance(factors, Tensor) else list(factors)
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 and f != float("inf") for f in values):
        raise ParameterError(f"factors: expected finite non-negative numbers, got {factors!r}", argument="factors")

    def probs(a: Tensor, record: AttentionRecord) -> Tensor:
        h, nk = a.shape[1], a.shape[-1]
        m = torch.ones(h, dtype=a.dtype, device=a.device)
        if table is None:
            if len(values) != h:
                raise ParameterError(f"factors: {record.name} ({record.mechanism}) has {h} heads, got {len(values)} factors", argument="factors")
            m = torch.tensor(values, dtype=a.dtype, device=a.device)
        else:
            _head_mask(list(table), a, record)  # range check
            for head, f in table.items():
                m[head] = f
        chosen = torch.ones(1, 1, 1, nk, dtype=torch.bool, device=a.device) if keys is None else _keys_index(keys, nk, a)
        w = torch.where(chosen, m.view(1, h, 1, 1), torch.ones((), dtype=a.dtype, device=a.device))
        out = a * w
        total = out.sum(-1, keepdim=True)
        return torch.where(total > 0, out / torch.where(total > 0, total, torch.ones_like(total)), a)

    return Edit(probs=probs, layers=layers)

