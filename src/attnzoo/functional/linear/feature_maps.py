"""Feature maps phi of kernelized linear attention, shared by the linear family (catalog F).

Linear attention replaces ``exp(q . k)`` by ``phi(q) . phi(k)``; each map here takes tokens
``x`` (B, H, N, D) to features (B, H, N, F), and :func:`feature_map_for` assembles the query and
key maps of one call, with ``scale`` applied to the queries before the map:

========================  ===========================================================  =================
name                      phi(x)                                                       F
========================  ===========================================================  =================
``identity``              x                                                            D
``elu``                   elu(x) + 1  (Katharopoulos et al., 2020, Sec. 3.2.1, eq. 7)   D
``relu``                  max(x, 0)                                                    D
``softmax_kernel``        exp(x W - |x|^2 / 2) / sqrt(m), W orthogonal Gaussian        m = num_features
                          (Performer's FAVOR+: Choromanski et al., 2021, Lemma 1 and
                          Sec. 2.4); E[phi(q) . phi(k)] = exp(q . k)
``taylor``                [1, x, x_i x_j (i < j), x_i^2 / sqrt 2] of the first d' =     1 + d' + d'(d'+1)/2
                          feature_dim channels: phi(q) . phi(k) = 1 + q.k + (q.k)^2/2
                          exactly, the 2nd-order Taylor expansion of exp (Based, Arora
                          et al., 2024); the symmetric square keeps d'(d'+1)/2 of the
                          d'^2 products
``hedgehog``              softmax([x W + b, -(x W + b)]) over the 2F features           2F
                          (Hedgehog, Zhang et al., 2024, Sec. 4: the learned MLP map
                          [exp(xW + b), exp(-xW - b)], normalized per token as fla's
                          implementation does, which keeps it finite)
========================  ===========================================================  =================

A user callable ``phi`` (or a pair ``(phi_q, phi_k)``) may take the place of a name. Maps are
functions of one token each, so a decoder applies them to new tokens only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...registry import Param, Problem

__all__ = [
    "FEATURE_MAPS",
    "FeatureMap",
    "feature_map_for",
    "feature_count",
    "elu_plus_one",
    "taylor_features",
    "taylor_feature_count",
    "positive_random_features",
    "orthogonal_gaussian",
    "default_num_features",
    "hedgehog_features",
]

FEATURE_MAPS = ("identity", "elu", "relu", "softmax_kernel", "taylor", "hedgehog")

# which keyword parameters belong to which named map (the others must be left at None)
MAP_PARAMETERS = {
    "softmax_kernel": ("num_features", "seed", "projection"),
    "taylor": ("feature_dim",),
    "hedgehog": ("feature_weights", "feature_bias"),
}


# --------------------------------------------------------------------------------------------
# parameters the mechanisms that take a feature map share
# --------------------------------------------------------------------------------------------
def feature_map_check(names: tuple[str, ...], *, pairs: bool = True, expected: Optional[str] = None) -> Callable[[Any, Problem], Optional[str]]:
    """The validator of a ``feature_map`` parameter: one of ``names``, a callable, or (with
    ``pairs``) a pair ``(phi_q, phi_k)``; ``expected`` replaces the generated description."""
    if expected is None:
        listed = ", ".join(repr(m) for m in names)
        expected = f"one of {listed}, a callable phi(x) -> features, or a pair (phi_q, phi_k)" if pairs else f"one of {listed}, or a callable phi(x) (B, H, N, D) -> (B, H, N, F)"

    def check(value: Any, p: Problem) -> Optional[str]:
        if isinstance(value, str) and value in names:
            return None
        if callable(value) and not isinstance(value, str):
            return None
        if pairs and isinstance(value, tuple) and len(value) == 2 and all(callable(f) for f in value):
            return None
        return expected

    return check


def _check_count(value: Any, p: Problem) -> Optional[str]:
    return None if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1) else "None or a positive int"


def _check_seed(value: Any, p: Problem) -> Optional[str]:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63)
    return None if ok else "None or a non-negative int"


def _check_projection(value: Any, p: Problem) -> Optional[str]:
    expected = f"None or a floating tensor of shape (D={p.head_dim}, m) or (H={p.q_heads}, D={p.head_dim}, m) on {p.device}"
    if value is None:
        return None
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device:
        return expected
    if (value.dim() == 2 and value.shape[0] == p.head_dim) or (value.dim() == 3 and tuple(value.shape[:2]) == (p.q_heads, p.head_dim)):
        return None
    return expected


#: ``num_features``, ``seed`` and ``projection``: the options of ``softmax_kernel`` (Performer).
SOFTMAX_KERNEL_PARAMS = (
    Param("num_features", None, "softmax_kernel: random features m (default int(D ln D), Performer's)", _check_count, (0, 2.5, "64"), "int | None"),
    Param("seed", None, "softmax_kernel: seed of the orthogonal Gaussian projection (None: 0)", _check_seed, (-1, 1.5, "0"), "int | None"),
    Param(
        "projection",
        None,
        "softmax_kernel: the projection W itself, (D, m) or (H, D, m) (attnzoo.nn.RandomFeatureMap holds and redraws it)",
        _check_projection,
        (torch.zeros(3), "W"),
        "Tensor | None",
    ),
)


def projection_conflict(bound: dict[str, Any]) -> Optional[tuple[str, str]]:
    """A given ``projection`` with a ``seed`` or a different ``num_features``: ``(name, why)``, or None."""
    projection = bound["projection"]
    if projection is None:
        return None
    if bound["seed"] is not None:
        return "seed", "draws a projection, but projection= gives one: pass one of them"
    if bound["num_features"] not in (None, projection.shape[-1]):
        return "num_features", f"{bound['num_features']} differs from the projection's {projection.shape[-1]} features"
    return None


# --------------------------------------------------------------------------------------------
# the maps
# --------------------------------------------------------------------------------------------
def elu_plus_one(x: Tensor) -> Tensor:
    """``elu(x) + 1``: positive, and linear (x + 1) for x > 0 (Katharopoulos et al., 2020, eq. 7)."""
    return F.elu(x).add_(1)  # elu saves its input, not its output, so the in-place add is safe


def _scaled_elu_plus_one(x: Tensor, scale: float) -> Tensor:
    """``elu(scale x) + 1`` with one new tensor when autograd is off (each new 32 MiB tensor
    costs ~10 ms of page faults on the CPU: glibc maps allocations that large afresh)."""
    scaled = x * scale
    if torch.is_grad_enabled() and scaled.requires_grad:
        return elu_plus_one(scaled)
    return F.elu_(scaled).add_(1)


def softplus(x: Tensor) -> Tensor:
    """softplus as a named function: the user-callable map the conformance suite samples (a
    named function, unlike a lambda, has a stable repr in the results store)."""
    return F.softplus(x)


def taylor_feature_count(feature_dim: int) -> int:
    """``1 + d + d (d + 1) / 2``: the size of :func:`taylor_features` of d channels."""
    return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


def _pair_selectors(d: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(d, P) matrices that pick, for each pair i <= j of d channels, x_i and w x_j (w = 1/sqrt 2 on
    the diagonal): ``(x @ first) * (x @ second)`` is the pairs' features, as two small GEMMs."""
    i, j = torch.triu_indices(d, d, device=like.device)
    pairs = torch.arange(i.numel(), device=like.device)
    weights = torch.ones(i.shape, dtype=like.dtype, device=like.device).masked_fill_(i == j, 0.5**0.5)
    first = torch.zeros(d, i.numel(), dtype=like.dtype, device=like.device).index_put_((i, pairs), torch.ones_like(weights))
    second = torch.zeros_like(first).index_put_((j, pairs), weights)
    return first, second


def taylor_features(x: Tensor, feature_dim: Optional[int] = None) -> Tensor:
    """Based's 2nd-order Taylor map of the first ``feature_dim`` channels (None: all).

    ``phi(x) . phi(y) = 1 + x.y + (x.y)^2 / 2``: the square ``(x.y)^2 = sum_ij x_i x_j y_i y_j`` is
    symmetric in (i, j), so the pairs i < j count twice (weight 1 each side) and the diagonal
    once (weight 1/sqrt 2 each side); ``d(d+1)/2`` features instead of fla's flattened ``d^2``.
    The pairs come from two GEMMs with 0/1 selection matrices, not from the d x d outer product:
    no N x d^2 temporary, and autograd's backward is GEMMs too (fwd + bwd of one (8, 16384, 16)
    tensor: 271 ms against 446 ms for the outer product and index_select, on the 2-core CPU).
    """
    if feature_dim is not None:
        x = x[..., :feature_dim]
    first, second = _pair_selectors(x.shape[-1], x)
    return torch.cat([torch.ones_like(x[..., :1]), x, (x @ first) * (x @ second)], dim=-1)


def default_num_features(head_dim: int) -> int:
    """Performer's default feature count, ``int(D ln D)`` (266 for D = 64), at least D."""
    return max(head_dim, int(head_dim * math.log(max(head_dim, 2))))


def orthogonal_gaussian(num_features: int, head_dim: int, *, seed: int = 0, heads: Optional[int] = None) -> Tensor:
    """Performer's orthogonal random features (Sec. 2.4): W of shape (D, m), or (H, D, m) per head.

    Columns come in blocks of D orthonormal vectors (QR of Gaussian matrices, one batched call),
    each rescaled by the norm of an independent Gaussian vector, so every column of W is
    marginally N(0, I) while the columns of a block stay orthogonal (lower variance than i.i.d.
    features). Drawn in float64 on the CPU from ``seed`` alone: the same seed gives the same W
    on every device.
    """
    gen = torch.Generator().manual_seed(seed)
    count = 1 if heads is None else heads
    blocks = -(-num_features // head_dim)
    q, r = torch.linalg.qr(torch.randn(count, blocks, head_dim, head_dim, generator=gen, dtype=torch.float64))
    # Q is uniform (Haar) over rotations only once R's diagonal is made positive; without this
    # the directions are not uniform and the kernel estimate is biased (21% off in the unit test)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    columns = q.transpose(1, 2).reshape(count, head_dim, blocks * head_dim)[..., :num_features]
    norms = torch.randn(count, num_features, head_dim, generator=gen, dtype=torch.float64).norm(dim=-1)
    w = columns * norms.unsqueeze(1)
    return w[0] if heads is None else w


def positive_random_features(x: Tensor, projection: Tensor) -> Tensor:
    """``exp(x W - |x|^2 / 2) / sqrt(m)``: Performer's positive random features (Lemma 1).

    ``projection`` W is (D, m) or (H, D, m). The exponent is at most ``|w|^2 / 2`` (complete the
    square), so it cannot overflow for any x; no data-dependent stabilizer is subtracted, which
    keeps the map a function of one token (decoding) and the unnormalized form exact.
    """
    m = projection.shape[-1]
    w = projection.to(x.dtype)
    logits = x @ w - x.pow(2).sum(-1, keepdim=True) / 2
    return torch.exp(logits - 0.5 * math.log(m))


def hedgehog_features(x: Tensor, weights: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Hedgehog's learned map: ``softmax([x W + b, -(x W + b)])`` over its 2F features.

    ``weights`` (D, F) or (H, D, F), ``bias`` (F,) or (H, F): one single-layer MLP per head.
    """
    proj = x @ weights.to(x.dtype)
    if bias is not None:
        proj = proj + (bias.to(x.dtype) if bias.dim() == 1 else bias.to(x.dtype).unsqueeze(-2))
    return torch.softmax(torch.cat([proj, -proj], dim=-1), dim=-1)


# --------------------------------------------------------------------------------------------
# one call's maps
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureMap:
    """The query and key maps of one call: ``query(q)`` applies the scale, then phi."""

    name: str
    query: Callable[[Tensor], Tensor]
    key: Callable[[Tensor], Tensor]


@functools.lru_cache(maxsize=16)
def _seeded_projection(num_features: int, head_dim: int, seed: int, device: torch.device) -> Tensor:
    """The drawn W of a seed, kept: a decoding step would otherwise redo its QRs for every token."""
    return orthogonal_gaussian(num_features, head_dim, seed=seed).to(device)


def _softmax_projection(head_dim: int, num_features: Optional[int], seed: Optional[int], projection: Optional[Tensor], device: torch.device) -> Tensor:
    if projection is not None:
        return projection
    m = default_num_features(head_dim) if num_features is None else num_features
    return _seeded_projection(m, head_dim, 0 if seed is None else seed, device)


def feature_map_for(
    feature_map: Any,
    *,
    head_dim: int,
    scale: float,
    device: torch.device,
    num_features: Optional[int] = None,
    seed: Optional[int] = None,
    projection: Optional[Tensor] = None,
    feature_dim: Optional[int] = None,
    feature_weights: Optional[Tensor] = None,
    feature_bias: Optional[Tensor] = None,
) -> FeatureMap:
    """The query and key maps of ``feature_map`` (a name of :data:`FEATURE_MAPS`, a callable or a pair).

    The scale multiplies the queries before phi (``phi(scale q) . phi(k)``), as fla does.
    ``softmax_kernel`` is the one exception in form, not in value: it splits the scale as
    ``sqrt(scale)`` on each side, ``phi(sqrt(s) q) . phi(sqrt(s) k)``, which estimates the same
    ``exp(s q . k)`` with Performer's balanced variance (an unbalanced split multiplies the
    estimator's variance by about ``exp(|k|^2)``).
    """
    if isinstance(feature_map, tuple):
        phi_q, phi_k = feature_map
        return FeatureMap("callable pair", lambda q: phi_q(q * scale), phi_k)
    if callable(feature_map):
        return FeatureMap(getattr(feature_map, "__name__", "callable"), lambda q: feature_map(q * scale), feature_map)
    if feature_map == "softmax_kernel":
        w = _softmax_projection(head_dim, num_features, seed, projection, device)
        root = math.sqrt(scale)
        return FeatureMap(feature_map, lambda q: positive_random_features(q * root, w), lambda k: positive_random_features(k * root, w))
    if feature_map == "elu":
        return FeatureMap(feature_map, lambda q: _scaled_elu_plus_one(q, scale), elu_plus_one)
    phi: Callable[[Tensor], Tensor] = {
        "identity": lambda x: x,
        "relu": torch.relu,
        "taylor": lambda x: taylor_features(x, feature_dim),
        "hedgehog": lambda x: hedgehog_features(x, feature_weights, feature_bias),  # type: ignore[arg-type]
    }[feature_map]
    return FeatureMap(feature_map, lambda q: phi(q * scale), phi)


def feature_count(feature_map: Any, head_dim: int, **params: Any) -> int:
    """F, the number of features phi gives for head dim D (a callable is evaluated on one token)."""
    if feature_map in ("identity", "elu", "relu"):
        return head_dim
    if feature_map == "taylor":
        return taylor_feature_count(params.get("feature_dim") or head_dim)
    if feature_map == "softmax_kernel":
        projection = params.get("projection")
        if projection is not None:
            return projection.shape[-1]
        return params.get("num_features") or default_num_features(head_dim)
    if feature_map == "hedgehog":
        return 2 * params["feature_weights"].shape[-1]
    phi = feature_map[1] if isinstance(feature_map, tuple) else feature_map
    with torch.no_grad():
        return phi(torch.zeros(1, 1, 1, head_dim)).shape[-1]
