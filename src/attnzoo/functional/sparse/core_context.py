"""Core Context Aware attention (catalog S7; Chen et al., "Core Context Aware Transformers for Long
Context Language Modeling", ICML 2025, arXiv 2412.12465, Sec. 3: globality-aware pooling,
locality-preserving module, and their fusion into one attention).

The keys are cut into groups of ``group_size`` (g) tokens from position 0. The **core token** of
group p is a weighted sum of the group's tokens, the weights being the group's *last query*
against the group's keys (Sec. 3.1, "globality-aware pooling"; no new parameters):

    a_p = softmax_j(scale q_{pg+g-1} . k_j),  j in [pg, pg + g)
    kc_p = sum_j a_pj k_j,   vc_p = sum_j a_pj v_j                (one core per query head)

Query i attends, in **one joint softmax** (Sec. 3.3, the fused key/value set), the cores of the
m_i complete groups that end before its local window and the raw tokens of that window:

    m_i = max(0, floor((i + 1 - window) / g))
    out_i = softmax over {scale q_i . kc_p : p < m_i} U {scale q_i . k_j : m_i g <= j <= i}, applied
            to {vc_p} U {v_j}

so the raw window holds between ``window`` and ``window + g - 1`` tokens (it is aligned to the
groups: a group is either pooled or wholly raw), and every past token is reached, raw or through
its core ("reachability", the paper's point). This is the rule of the authors' released mask
(``generate_mask`` in ``codebase/core/cca_attn.py``: pool token p visible when
``(i + 1 - w) // g >= p + 1``, raw keys from the first unpooled group to i); the paper's text
gives the same two sets. Choices: the pooling weights use the attention ``scale`` (the code's
``1 / sqrt(head_dim)``, equal by default); under GQA each query head pools with its own last query
(the code repeats K/V to the query heads first).

Causal self-attention only. Key padding: right padding only (groups are placed from position 0);
a padded key is left out of its group's pooling and of every window, a group of pads has no core.
With right padding a real query never reaches a group holding a pad, so the padded batch equals
each sequence alone.

Cost: O(N * (N / g + window + g) * D) time and O(N * (N / g + window)) memory for the fast path;
the reference materializes N x (N / g + N).

Backends: ``reference`` (cores group by group, the joint (core + raw) key set with the paper's
mask, one dense softmax: the spec); ``chunked`` (cores in one batched pass, queries in
chunks of 256 against the cores and an unfolded key window of 256 + window + g - 1 keys, no N x N tensor).
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, stable_softmax_lse
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import real_keys, refuse_unless_right_padded
from ._params import PADDING_PARAM, positive_int, sample_options
from .._prefix_decoder import PrefixDecoder

__all__ = ["core_context_attention", "CORE_CONTEXT"]

_PADDING_WHY = "CCA's groups start at position 0, so pads before a sequence would move its groups"
NEG_INF = float("-inf")
CHUNK = 256  # queries per chunk of the fast path

CCA_PARAMS = (
    Param("group_size", 16, "g: tokens pooled into one core token (the paper's 16)", positive_int("tokens per group"), (0, -16, 1.5, "16"), "int"),
    Param("window", 1024, "w: the local window holds the last w to w + g - 1 raw tokens, aligned to the groups (the paper's 1024)", positive_int("window tokens"), (0, -1, 2.5, "8"), "int"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k (attention and pooling); default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row over the joint (core + raw) keys, (B, H, N)"),
)


def pooled_groups(i: Tensor, group_size: int, window: int) -> Tensor:
    """m_i: how many groups query position ``i`` sees as core tokens (the rest of its past is raw)."""
    return torch.div(i + 1 - window, group_size, rounding_mode="floor").clamp(min=0)


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, group_size, window, key_padding_mask, scale, return_lse):
    """Cores group by group (Sec. 3.1), the joint key set [cores; raw tokens] with the released
    mask, one dense softmax (Sec. 3.3): the spec."""
    refuse_unless_right_padded("core_context", key_padding_mask, _PADDING_WHY)
    b, hq, n, _ = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    sc = default_scale(q, scale)
    group = hq // k.shape[1]
    qq = q.to(cdt)
    kk, vv = k.to(cdt).repeat_interleave(group, dim=1), v.to(cdt).repeat_interleave(group, dim=1)
    real = real_keys(key_padding_mask, b, n, q.device)
    n_groups = n // group_size
    kc = qq.new_zeros(b, hq, n_groups, kk.shape[-1])
    vc = qq.new_zeros(b, hq, n_groups, vv.shape[-1])
    has_core = torch.zeros(b, n_groups, dtype=torch.bool, device=q.device)
    for p in range(n_groups):
        span = slice(p * group_size, (p + 1) * group_size)
        last_query = qq[:, :, (p + 1) * group_size - 1]  # (B, H, D)
        s = torch.einsum("bhd,bhjd->bhj", last_query, kk[:, :, span]) * sc
        a, _ = stable_softmax_lse(s.masked_fill(~real[:, None, span], NEG_INF))
        kc[:, :, p] = torch.einsum("bhj,bhjd->bhd", a, kk[:, :, span])
        vc[:, :, p] = torch.einsum("bhj,bhjd->bhd", a, vv[:, :, span])
        has_core[:, p] = real[:, span].any(-1)
    rows = torch.arange(n, device=q.device)[:, None]
    m = pooled_groups(rows, group_size, window)  # (N, 1)
    core_ok = (torch.arange(n_groups, device=q.device)[None, :] < m)[None, None] & has_core[:, None, None, :]
    cols = torch.arange(n, device=q.device)[None, :]
    raw_ok = ((cols >= m * group_size) & (cols <= rows))[None, None] & real[:, None, None, :]
    keys, values = torch.cat([kc, kk], dim=2), torch.cat([vc, vv], dim=2)
    s = torch.matmul(qq, keys.transpose(-1, -2)) * sc
    s = s.masked_fill(~torch.cat([core_ok, raw_ok], dim=-1), NEG_INF)
    p_, lse = stable_softmax_lse(s)
    out = torch.matmul(p_, values).to(q.dtype)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# fast path
# --------------------------------------------------------------------------------------------
def core_tokens(q: Tensor, k: Tensor, v: Tensor, group_size: int, real: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """All cores in one batched pass: (kc (B, H, G, D), vc (B, H, G, Dv), has_core (B, G)),
    G = N // group_size complete groups; ``k``, ``v`` already per query head."""
    b, h, n, d = q.shape
    n_groups = n // group_size
    span = n_groups * group_size
    kg = k[:, :, :span].reshape(b, h, n_groups, group_size, d)
    vg = v[:, :, :span].reshape(b, h, n_groups, group_size, v.shape[-1])
    last = q[:, :, group_size - 1 : span : group_size]  # (B, H, G, D)
    s = torch.einsum("bhgd,bhgjd->bhgj", last, kg) * scale
    ok = real[:, :span].reshape(b, 1, n_groups, group_size)
    a, _ = stable_softmax_lse(s.masked_fill(~ok, NEG_INF))
    return torch.einsum("bhgj,bhgjd->bhgd", a, kg), torch.einsum("bhgj,bhgjd->bhgd", a, vg), ok[:, 0].any(-1)


def _chunked(q, k, v, *, group_size, window, key_padding_mask, scale, return_lse):
    """Queries in chunks of 256: each chunk against every core (N x N/g scores in all) and against an
    unfolded window of the 256 + window + g - 1 keys that can be raw for it; one joint softmax."""
    refuse_unless_right_padded("core_context", key_padding_mask, _PADDING_WHY)
    b, hq, n, d = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    sc = default_scale(q, scale)
    group = hq // k.shape[1]
    qq = q.to(cdt)
    kk, vv = k.to(cdt).repeat_interleave(group, dim=1), v.to(cdt).repeat_interleave(group, dim=1)
    real = real_keys(key_padding_mask, b, n, q.device)
    kc, vc, has_core = core_tokens(qq, kk, vv, group_size, real, sc)
    n_groups = kc.shape[2]
    c = min(CHUNK, n)
    t = -(-n // c)
    span = min(c + window + group_size - 1, t * c)  # keys a chunk may see raw: m_i g >= i + 1 - window - g + 1
    front, back = span - c, t * c - n
    pad = torch.nn.functional.pad
    kw = pad(kk, (0, 0, front, back)).unfold(2, span, c).transpose(-1, -2)  # (B, H, T, span, D)
    vw = pad(vv, (0, 0, front, back)).unfold(2, span, c).transpose(-1, -2)
    realw = pad(real, (front, back)).unfold(1, span, c)  # (B, T, span)
    qc = pad(qq, (0, 0, 0, back)).view(b, hq, t, c, d)
    rows = torch.arange(t * c, device=q.device).view(t, c, 1)
    m = pooled_groups(rows, group_size, window)  # (T, c, 1)
    cols = (torch.arange(t, device=q.device) * c + c - span).view(t, 1, 1) + torch.arange(span, device=q.device)  # key positions
    raw_ok = ((cols >= m * group_size) & (cols <= rows))[None, None] & realw[:, None, :, None, :]
    core_ok = (torch.arange(n_groups, device=q.device) < m)[None, None] & has_core[:, None, None, None, :]
    s_core = torch.matmul(qc, kc[:, :, None].transpose(-1, -2)) * sc  # (B, H, T, c, G)
    s_raw = torch.matmul(qc, kw.transpose(-1, -2)) * sc  # (B, H, T, c, span)
    s = torch.cat([s_core.masked_fill(~core_ok, NEG_INF), s_raw.masked_fill(~raw_ok, NEG_INF)], dim=-1)
    p_, lse = stable_softmax_lse(s)
    out = torch.matmul(p_[..., :n_groups], vc[:, :, None]) + torch.matmul(p_[..., n_groups:], vw)
    out = out.reshape(b, hq, t * c, -1)[:, :, :n].to(q.dtype)
    lse = lse.reshape(b, hq, t * c)[:, :, :n]
    return (out, lse) if return_lse else out


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:
        return {"group_size": 16, "window": min(1024, max(16, p.kv_len // 4))}
    params: dict[str, Any] = {"group_size": rng.randint(1, 9), "window": rng.randint(1, 40)}
    return sample_options(params, p, rng, right_only=True)


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    """About ``share`` of the last query's keys: half of them raw (the window), half as cores
    (N / g of them); share 1: a window of N, every key raw (softmax attention)."""
    n = p.kv_len
    if share >= 1:
        return {"group_size": 16, "window": n}
    return {"group_size": max(1, round(2 / share)), "window": max(1, round(share * n / 2))}


CORE_CONTEXT = register(
    Mechanism(
        name="core_context",
        family="sparse",
        catalog=("S7",),
        paper="Core Context Aware Transformers for Long Context Language Modeling (Chen et al., ICML 2025, arXiv 2412.12465), Sec. 3.1-3.3",
        formula="out_i = softmax over {q_i.kc_p : p < m_i} U {q_i.k_j : m_i g <= j <= i}; kc_p = sum_j softmax_j(q_{pg+g-1}.k_j) k_j (same for v), m_i = max(0, (i+1-w) // g)",
        cost="O(N * (N / g + w + g) * D) time, O(N * (N / g + w)) memory (chunked)",
        summary="CCA-Attention: core tokens pooled from groups by their last query, plus a group-aligned local window, in one joint softmax",
        patterns=frozenset({"causal_self"}),
        params=CCA_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        sparsity_params=_sparsity_params,
    )
)
CORE_CONTEXT.add_backend(Backend("reference", _reference, doc="cores group by group, joint [cores; raw] keys with the released mask, dense softmax: the spec", priority=-100, materializes_scores=True))
CORE_CONTEXT.add_backend(Backend("chunked", _chunked, doc="batched pooling; 256-query chunks against the cores and an unfolded raw window; no N x N tensor", priority=10))


def core_context_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group_size: int = 16,
    window: int = 1024,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Core Context Aware attention (catalog S7): pooled core tokens of past groups + a raw local window.

    Each group of ``group_size`` tokens is pooled into one core key and value, weighted by
    ``softmax(scale q_last . k_j)`` over the group (q_last: the group's last query). Query i sees,
    in one softmax, the cores of the groups before its window and the raw tokens of the window
    (``window`` to ``window + group_size - 1`` tokens, aligned to the groups):

        m_i = max(0, (i + 1 - window) // group_size)
        out_i = softmax({q_i.kc_p}_{p < m_i} U {q_i.k_j}_{m_i g <= j <= i}) @ ({vc_p} U {v_j})

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D), Hq a multiple of Hkv. v: (B, Hkv, N, Dv).
        group_size: g (the paper's 16). window: w (the paper's 1024); ``window >= N`` is softmax attention.
        key_padding_mask: (B, N) bool, True = pad; right padding only (ParameterError otherwise).
        scale: defaults to ``D ** -0.5``. return_lse: also return the LSE of the joint softmax (B, Hq, N).

    Cost: O(N (N / g + w) D) (chunked backend). Paper: Chen et al., ICML 2025, Sec. 3.

    Example::

        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> out = core_context_attention(q, k, v, group_size=16, window=256)
    """
    return CORE_CONTEXT(q, k, v, backend=backend, group_size=group_size, window=window, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


CORE_CONTEXT.function = core_context_attention
CORE_CONTEXT.decoder = PrefixDecoder("core_context", "all")
