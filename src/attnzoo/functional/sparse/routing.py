"""Bi-level routing attention (catalog S3): BiFormer (Zhu et al., CVPR 2023), Sec. 3.2, Eq. 2-5.

The (H, W) map is cut into ``n_win x n_win`` regions. Region-level queries and keys are the means
of their tokens (Eq. 2, over all heads' channels together: one routing shared by the heads, as
BiFormer's ``TopkRouting``); the region adjacency ``A_r = Q_r K_r^T`` (Eq. 3) keeps the ``top_k``
regions of each region (Eq. 4: ``I_r = topk(A_r)``, ties to the lowest region index here; BiFormer
leaves them to ``torch.topk``); each token then attends to every token of its region's routed
regions (Eq. 5, token-to-token attention over the gathered keys):

    out_x = sum_{y in regions I_{r(x)}} softmax_y(scale q_x . k_y) v_y

Scale: per head, ``head_dim ** -0.5``. BiFormer's code uses ``qk_dim ** -0.5`` with ``qk_dim`` the
full channel width of all heads (a quirk: its scores are sqrt(H) times flatter than standard
multi-head attention); pass ``scale=(H * head_dim) ** -0.5`` to reproduce it. BiFormer's local
context enhancement (a depthwise conv on V) belongs to its module, not to the attention.
Routing is computed in float64 in every backend (the same regions everywhere) and carries no
gradient (BiFormer's default ``TopkRouting`` detaches it too).

Backends: ``reference`` (region adjacency region by region, stable-sort top-k, a dense N x N
mask); ``gathered`` (BiFormer's KV gather: the routed regions' tokens stacked per region, one
batched softmax: O(N * top_k * N / n_win^2 * D), no N x N tensor).
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from .._padding import key_padding_param
from ._params import positive_int, sample_options
from ._select import NEG_INF, sorted_top_k_mask, top_k_mask

__all__ = ["bilevel_routing_attention", "BILEVEL_ROUTING"]


def _check_n_win(value: Any, p: Problem) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "a positive int (regions per side)"
    if len(p.q_shape) == 2 and any(size % value for size in p.q_shape):
        return f"a divisor of both sides of the {p.q_shape[0]}x{p.q_shape[1]} map, got {value} (pad the map, as BiFormer's block does)"
    return None


ROUTING_PARAMS = (
    Param("n_win", None, "required: regions per side (BiFormer's S; 7 in its models); divides both sides", _check_n_win, (None, 0, -7, 1.5, "7"), "int"),
    Param("top_k", None, "required: routed regions per region (<= n_win^2)", positive_int("routed regions per region"), (None, 0, -1, 2.0, "4"), "int"),
    key_padding_param(),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5 (BiFormer's code: (H * head_dim) ** -0.5)"),
    flag("return_lse", False, "also return the log-sum-exp of each query, (B, H, *spatial)"),
)


def _check_params(params: dict, p: Problem) -> Optional[tuple[str, str]]:
    n_win, top_k = params.get("n_win"), params.get("top_k")
    if isinstance(n_win, int) and isinstance(top_k, int) and top_k > n_win * n_win:
        return "top_k", f"at most n_win^2 = {n_win * n_win} regions, got {top_k}"
    return None


# --------------------------------------------------------------------------------------------
# regions
# --------------------------------------------------------------------------------------------
def to_regions(x: Tensor, n_win: int) -> Tensor:
    """(B, H, Hs, Ws, C) -> (B, H, n_win^2, tokens per region, C), regions row-major."""
    b, h, hs, ws, c = x.shape
    x = x.view(b, h, n_win, hs // n_win, n_win, ws // n_win, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, h, n_win * n_win, (hs // n_win) * (ws // n_win), c)


def from_regions(x: Tensor, n_win: int, shape: tuple[int, int]) -> Tensor:
    """Inverse of :func:`to_regions`."""
    b, h, _, _, c = x.shape
    hs, ws = shape
    x = x.view(b, h, n_win, n_win, hs // n_win, ws // n_win, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, h, hs, ws, c)


def _real_tokens(mask: Optional[Tensor], q: Tensor) -> Tensor:
    """(B, Hs, Ws) float64, 1 for a real token."""
    b, _, hs, ws, _ = q.shape
    if mask is None:
        return torch.ones(b, hs, ws, dtype=torch.float64, device=q.device)
    return (~mask.reshape(b, hs, ws)).double()


def routing(q: Tensor, k: Tensor, n_win: int, top_k: int, key_padding_mask: Optional[Tensor]) -> Tensor:
    """(B, R, R) bool: the regions each region routes to (the fast path's routing)."""
    real = to_regions(_real_tokens(key_padding_mask, q)[:, None, ..., None], n_win)[:, 0]  # (B, R, t, 1)
    count = real.sum(2).clamp(min=1)  # (B, R, 1)
    q_r = (to_regions(q.detach().double(), n_win) * real[:, None]).sum(3) / count[:, None]  # (B, H, R, D)
    k_r = (to_regions(k.detach().double(), n_win) * real[:, None]).sum(3) / count[:, None]
    q_r, k_r = (x.permute(0, 2, 1, 3).flatten(2) for x in (q_r, k_r))  # heads' channels together
    adjacency = (q_r @ k_r.transpose(-1, -2)).masked_fill(real.sum(2).view(q.shape[0], 1, -1) == 0, NEG_INF)
    return top_k_mask(adjacency, top_k)


def _reference_routing(q: Tensor, k: Tensor, n_win: int, top_k: int, key_padding_mask: Optional[Tensor]) -> Tensor:
    """Eq. 2-4 region by region: mean of the real tokens, adjacency, stable-sort top-k."""
    b, h, hs, ws, d = q.shape
    rh, rw = hs // n_win, ws // n_win
    real = _real_tokens(key_padding_mask, q)
    regions = [(i * rh, j * rw) for i in range(n_win) for j in range(n_win)]
    q_r = torch.zeros(b, len(regions), h * d, dtype=torch.float64)
    k_r = torch.zeros_like(q_r)
    has_keys = torch.zeros(b, len(regions), dtype=torch.bool)
    for r, (y, x) in enumerate(regions):
        w = real[:, y : y + rh, x : x + rw].cpu()  # (B, rh, rw)
        n = w.sum((1, 2)).clamp(min=1)
        for src, dst in ((q, q_r), (k, k_r)):
            block = src[:, :, y : y + rh, x : x + rw].detach().double().cpu() * w[:, None, :, :, None]
            dst[:, r] = (block.sum((2, 3)) / n[:, None, None]).flatten(1)
        has_keys[:, r] = w.flatten(1).any(1)
    adjacency = (q_r @ k_r.transpose(-1, -2)).masked_fill(~has_keys[:, None, :], NEG_INF)
    return sorted_top_k_mask(adjacency, top_k).to(q.device)


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, *, n_win, top_k, key_padding_mask, scale, return_lse):
    """Routing region by region, then token attention under a dense N x N mask: the spec."""
    b, h, hs, ws, _ = q.shape
    routed = _reference_routing(q, k, n_win, top_k, key_padding_mask)  # (B, R, R)
    rows, cols = torch.arange(hs, device=q.device), torch.arange(ws, device=q.device)
    region = ((rows[:, None] // (hs // n_win)) * n_win + cols[None, :] // (ws // n_win)).flatten()  # (N,)
    allowed = routed[:, region][:, :, region]  # (B, N, N)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.reshape(b, 1, -1)
    out, lse = materialized_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), scale=scale, allowed=allowed[:, None])
    out = out.view(b, h, hs, ws, -1)
    return (out, lse.view(b, h, hs, ws)) if return_lse else out


def _gathered(q, k, v, *, n_win, top_k, key_padding_mask, scale, return_lse):
    """BiFormer's KV gather: each region's queries against the stacked tokens of its routed regions."""
    b, h, hs, ws, _ = q.shape
    routed = routing(q, k, n_win, top_k, key_padding_mask)  # (B, R, R)
    take = min(top_k, n_win * n_win)
    idx = routed.to(torch.int8).topk(take, dim=-1).indices  # (B, R, take): the routed regions first
    used = routed.gather(-1, idx)  # False where a region routes to fewer than top_k (padding)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qr = to_regions(q, n_win).to(cdt)  # (B, H, R, t, D)

    def gather(x: Tensor) -> Tensor:  # (B, H, R, t, C) -> (B, H, R, take * t, C)
        xr = to_regions(x, n_win)
        ix = idx[:, None, :, :, None, None].expand(-1, xr.shape[1], -1, -1, xr.shape[3], xr.shape[4])
        return xr[:, :, None].expand(-1, -1, idx.shape[1], -1, -1, -1).gather(3, ix).flatten(3, 4)

    kg, vg = gather(k).to(cdt), gather(v).to(cdt)
    key_ok = used[:, :, :, None].expand(-1, -1, -1, qr.shape[3])  # (B, R, take, t)
    if key_padding_mask is not None:
        real = to_regions((~key_padding_mask.reshape(b, 1, hs, ws, 1)), n_win)[:, 0, :, :, 0]  # (B, R, t)
        key_ok = key_ok & real[:, None].expand(-1, idx.shape[1], -1, -1).gather(2, idx[..., None].expand(-1, -1, -1, real.shape[-1]))
    s = (qr @ kg.transpose(-1, -2)) * default_scale(q, scale)
    s = s.masked_fill(~key_ok.flatten(2)[:, None, :, None, :], NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == NEG_INF, 0.0)[..., None])
    out = from_regions((p @ vg).to(q.dtype), n_win, (hs, ws))
    return (out, from_regions(lse[..., None], n_win, (hs, ws))[..., 0]) if return_lse else out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    options = _divisors(math.gcd(*p.q_shape)) if len(p.q_shape) == 2 else [1]
    if rng is None:
        n_win = max(d for d in options if d <= 7)
        return {"n_win": n_win, "top_k": min(4, n_win * n_win)}
    n_win = rng.choice(options)
    params: dict[str, Any] = {"n_win": n_win, "top_k": rng.randint(1, n_win * n_win)}
    return sample_options(params, p, rng, spatial=True)


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    """About ``share`` of the regions routed to: up to 8 x 8 regions (BiFormer's 7 x 7 where it divides)."""
    n_win = max(d for d in _divisors(math.gcd(*p.q_shape)) if d <= 8)
    return {"n_win": n_win, "top_k": max(1, round(share * n_win * n_win))}


def _allowed_pairs(problem: Problem, bound: dict) -> int:
    n = math.prod(problem.q_shape)
    per_region = n // bound["n_win"] ** 2
    return problem.batch * problem.q_heads * n * min(bound["top_k"], bound["n_win"] ** 2) * per_region


BILEVEL_ROUTING = register(
    Mechanism(
        name="bilevel_routing",
        family="sparse",
        catalog=("S3",),
        paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023), Sec. 3.2, Eq. 2-5",
        formula="out_x = sum_{y in regions topk_k(Q_r K_r^T)[r(x)]} softmax(scale q_x.k_y) v_y; Q_r, K_r = region means",
        cost="O(N * top_k * N / n_win^2 * D) attention + O(n_win^4 * H * D) routing; O(N * top_k * N / n_win^2) memory",
        summary="BiFormer bi-level routing: regions route to their top-k regions by mean q/k, then token attention inside them",
        patterns=frozenset({"noncausal_self"}),
        params=ROUTING_PARAMS,
        spatial_dims=(2,),
        sample_params=_sample_params,
        check_params=_check_params,
        allowed_pairs=_allowed_pairs,
        sparsity_params=_sparsity_params,
    )
)
BILEVEL_ROUTING.add_backend(
    Backend("reference", _reference, doc="region-by-region routing, stable-sort top-k, dense N x N mask: the spec", priority=-100, materializes_scores=True)
)
BILEVEL_ROUTING.add_backend(Backend("gathered", _gathered, doc="BiFormer's KV gather: routed regions' tokens stacked, one batched softmax", priority=30))


def bilevel_routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_win: int,
    top_k: int,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Bi-level routing attention (BiFormer, catalog S3) on a 2D map.

    Regions of ``(Hs / n_win) x (Ws / n_win)`` tokens route to their ``top_k`` regions by the
    adjacency of their mean queries and keys (all heads' channels); each token attends to every
    token of its region's routed regions.

    Args:
        q, k: (B, H, Hs, Ws, D). v: (B, H, Hs, Ws, Dv). Hs and Ws multiples of ``n_win``.
        n_win: regions per side. top_k: routed regions per region, 1 <= top_k <= n_win^2.
        key_padding_mask: (B, Hs * Ws) or (B, Hs, Ws) bool, True = pad: excluded from the
            region means and from the attention.
        scale: default ``D ** -0.5`` per head (BiFormer's code: ``(H * D) ** -0.5``).
        return_lse: also return the LSE (B, H, Hs, Ws).

    Cost: O(N * top_k * N / n_win^2 * D). Paper: Zhu et al., BiFormer (CVPR 2023), Eq. 2-5.

    Example::

        >>> q = k = v = torch.randn(1, 4, 56, 56, 32)
        >>> out = bilevel_routing_attention(q, k, v, n_win=7, top_k=4)
    """
    return BILEVEL_ROUTING(q, k, v, backend=backend, n_win=n_win, top_k=top_k, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


BILEVEL_ROUTING.function = bilevel_routing_attention
