"""Kernelized linear attention with pluggable feature maps (catalog F1; chunked form F3).

    out_i = sum_(j visible) (phi(s q_i) . phi(k_j)) v_j  /  (sum_(j visible) phi(s q_i) . phi(k_j) + eps)

(the denominator only with ``normalize``), ``s = scale`` (default D^-0.5, applied to q before
the map, as flash-linear-attention does), visible = every key, or with ``causal`` the keys up
to the query's position (bottom-right aligned when Nq != Nk). Associating the product the
other way, ``phi(q_i) (sum_j phi(k_j)^T v_j)``, gives the linear cost: the sum is a state of
F x Dv numbers per head, updated one key at a time (Katharopoulos et al., 2020, "Transformers
are RNNs", Sec. 3.2, eqs. 4-6 and, causal, Sec. 3.4, eqs. 8-12). The feature maps phi are in
:mod:`~attnzoo.functional.linear.feature_maps`.

Backends, the three forms of :mod:`attnzoo.kernels.linear_scan`, exact against each other:
``reference`` (the scores materialized, O(N^2)), ``chunked`` (Lightning Attention-2, Qin et
al., 2024: O(N (L F + F Dv)) time, the default) and ``recurrent`` (one token at a time).
Decoding keeps the state, F x (Dv + 1) numbers per head, not a cache.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ...kernels.linear_scan import fused_causal_forward, parallel_scores
from ...registry import PATTERNS, Backend, Mechanism, Param, Problem, flag, positive_number, register
from ._shared import (
    Operands,
    ScanDecoder,
    add_form_backends,
    chunk_size_param,
    compute_dtype,
    divide_by_normalizer,
    expand_heads,
    is_int,
    key_padding_param,
    padded_keys,
    sample_padding,
    zero_padded,
)
from .feature_maps import FEATURE_MAPS, MAP_PARAMETERS, SOFTMAX_KERNEL_PARAMS, feature_count, feature_map_for, feature_map_check, projection_conflict, softplus

__all__ = ["linear_attention", "LINEAR", "linear_operands", "linear_finish", "linear_fused", "keys_with_zero_features"]


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _optional_count(upper: Optional[Callable[[Problem], int]] = None, what: str = "a positive int") -> Callable[[Any, Problem], Optional[str]]:
    def check(value: Any, p: Problem) -> Optional[str]:
        if value is None:
            return None
        limit = None if upper is None else upper(p)
        if is_int(value) and value >= 1 and (limit is None or value <= limit):
            return None
        return f"None or {what}" + ("" if limit is None else f" <= {limit}")

    return check


def _tensor_check(shapes: Callable[[Problem], tuple[str, ...]], ranks: tuple[int, ...], leading: Callable[[Problem, int], tuple]) -> Callable[[Any, Problem], Optional[str]]:
    """None, or a floating tensor on the inputs' device whose leading dims are ``leading(p, rank)``."""

    def check(value: Any, p: Problem) -> Optional[str]:
        expected = "None or a floating tensor of shape " + " or ".join(shapes(p)) + f" on {p.device}"
        if value is None:
            return None
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device or value.dim() not in ranks:
            return expected
        want = leading(p, value.dim())
        return None if tuple(value.shape[: len(want)]) == want else expected

    return check


_check_weights = _tensor_check(
    lambda p: (f"(D={p.head_dim}, F)", f"(H={p.q_heads}, D={p.head_dim}, F)"),
    (2, 3),
    lambda p, rank: (p.head_dim,) if rank == 2 else (p.q_heads, p.head_dim),
)
_check_bias = _tensor_check(lambda p: ("(F,)", f"(H={p.q_heads}, F)"), (1, 2), lambda p, rank: () if rank == 1 else (p.q_heads,))


LINEAR_PARAMS = (
    Param(
        "feature_map",
        "elu",
        "phi: " + ", ".join(FEATURE_MAPS) + ", a callable x (B, H, N, D) -> (B, H, N, F), or a pair (phi_q, phi_k)",
        feature_map_check(FEATURE_MAPS),
        ("softmax", 3, ("elu",)),
        "str | callable | (callable, callable)",
    ),
    flag("normalize", True, "divide by phi(q_i) . sum_j phi(k_j) (+ eps); False: the bare sum"),
    flag("causal", False, "each query sees the keys up to its position (bottom-right when Nq != Nk)"),
    dataclasses.replace(
        positive_number("eps", "added to the denominator (normalize=True); positive, so a query that sees no key outputs 0", optional=False),
        default=1e-6,
    ),
    positive_number("scale", "multiplies q before the feature map; default head_dim ** -0.5"),
    *SOFTMAX_KERNEL_PARAMS,
    Param(
        "feature_dim",
        None,
        "taylor: expand the first feature_dim channels of q and k (None: all D); F = 1 + d + d(d+1)/2",
        _optional_count(lambda p: p.head_dim, "an int in [1, D]"),
        (0, 2.5, "16", 10**9),
        "int | None",
    ),
    Param(
        "feature_weights",
        None,
        "hedgehog: the map's weights W, (D, F) or (H, D, F) (attnzoo.nn.HedgehogFeatureMap holds them)",
        _check_weights,
        (torch.zeros(2), "W"),
        "Tensor | None",
    ),
    Param("feature_bias", None, "hedgehog: the map's bias b, (F,) or (H, F)", _check_bias, (torch.zeros(2, 2, 2), 1.0), "Tensor | None"),
    key_padding_param(),
    chunk_size_param(),
)
_DEFAULTS = {p.name: p.default for p in LINEAR_PARAMS}


def _map_name(feature_map: Any) -> str:
    return repr(feature_map) if isinstance(feature_map, str) else "a callable"


def _check_combination(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    """Parameters of one feature map given with another; hedgehog's weights; shapes that must agree."""
    chosen = bound["feature_map"]
    for owner, names in MAP_PARAMETERS.items():
        for name in names:
            if bound[name] is not None and chosen != owner:
                return name, f"only used by feature_map={owner!r}, not {_map_name(chosen)}: leave it None"
    if chosen == "hedgehog" and bound["feature_weights"] is None:
        return "feature_weights", "feature_map='hedgehog' needs its weights W, (D, F) or (H, D, F) (attnzoo.nn.HedgehogFeatureMap holds them)"
    conflict = projection_conflict(bound)
    if conflict is not None:
        return conflict
    bias, weights = bound["feature_bias"], bound["feature_weights"]
    if bias is not None and weights is not None and (bias.shape[-1] != weights.shape[-1] or (bias.dim() == 2 and weights.dim() == 2)):
        return "feature_bias", f"shape {tuple(bias.shape)} does not fit feature_weights of shape {tuple(weights.shape)} (expected (F,) or (H, F))"
    return None


# --------------------------------------------------------------------------------------------
# operands and output, shared by the backends and the decoder
# --------------------------------------------------------------------------------------------
def linear_operands(q: Tensor, k: Tensor, v: Tensor, params: dict) -> Operands:
    """phi(s q), phi(k) and the values (taken as [v, 1] when normalized), in float32 for half inputs."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    heads = q.shape[1]
    q, k, v = q.to(dtype), expand_heads(k, heads).to(dtype), expand_heads(v, heads).to(dtype)
    scale = params["scale"] or q.shape[-1] ** -0.5
    maps = feature_map_for(
        params["feature_map"],
        head_dim=q.shape[-1],
        scale=scale,
        device=q.device,
        **{name: params[name] for names in MAP_PARAMETERS.values() for name in names},
    )
    normalizer, pad = params["normalize"], padded_keys(params)
    if params["feature_map"] == "identity":  # phi(s q) . k = s (q . k): the engine applies s for free
        return Operands(q, zero_padded(k, pad), v, None, out_dtype, scale, normalizer)
    return Operands(maps.query(q), zero_padded(maps.key(k), pad), v, None, out_dtype, normalizer=normalizer)


def linear_finish(out: Tensor, params: dict, nq: int, nk: int) -> Tensor:
    return divide_by_normalizer(out, params["eps"]) if params["normalize"] else out


#: the raw key whose feature is exactly 0 under each map the fused kernel applies: elu + 1 is
#: exp(x) for x <= 0, and the kernel's exp flushes x below -87 to 0 (csrc/linear_scan.cpp); the
#: Taylor map's constant feature 1 has no such key
_ZERO_FEATURE_KEY = {"identity": 0.0, "relu": 0.0, "elu": float("-inf")}


def keys_with_zero_features(k: Tensor, params: dict) -> Optional[Tensor]:
    """The raw keys for the fused kernel with the padded ones replaced by a key whose feature is 0
    (one masked_fill pass; the kernel then runs as without a mask), or None when the map has none."""
    pad = padded_keys(params)
    if pad is None:
        return k
    fill = _ZERO_FEATURE_KEY.get(params["feature_map"]) if isinstance(params["feature_map"], str) else None
    return None if fill is None else k.masked_fill(pad[:, None, :, None], fill)


def linear_fused(q: Tensor, k: Tensor, v: Tensor, params: dict) -> Optional[Tensor]:
    """The maps the C++ kernel knows (identity, elu, relu, taylor) in one call, map and division
    inside; else None (the ``fused`` hook of :func:`add_form_backends`).

    Padding: the kernel maps the raw keys as it loads them, so a padded key is replaced by one
    whose feature is 0 (:func:`keys_with_zero_features`); Taylor has none and returns None (the
    unfused path zeroes phi(k) instead, still on the C++ scan)."""
    k = keys_with_zero_features(k, params)
    if k is None:
        return None
    scale = params["scale"] or q.shape[-1] ** -0.5
    eps = params["eps"] if params["normalize"] else None
    return fused_causal_forward(
        q, k, v, feature_map=params["feature_map"], query_scale=scale, chunk_size=params["chunk_size"], eps=eps, feature_dim=params["feature_dim"]
    )


# --------------------------------------------------------------------------------------------
# reference: the spec
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, **params):
    """The scores phi(s q_i) . phi(k_j) materialized (future masked), their weighted sum of v (and row sum)."""
    ops = linear_operands(q, k, v, {**params, "normalize": False})
    scores = parallel_scores(ops.q, ops.k, causal=params["causal"], scale=ops.scale)
    out = scores @ ops.v
    if params["normalize"]:
        out = out / (scores.sum(-1, keepdim=True) + params["eps"])
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark; state size
# --------------------------------------------------------------------------------------------

def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    """Plain (elu, normalized) without ``rng``; with it, a random feature map and its options."""
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        return params
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device=p.device, dtype=p.dtype)

    choice = rng.choice(FEATURE_MAPS + ("callable", "pair"))
    params["feature_map"] = {"callable": softplus, "pair": (torch.sigmoid, softplus)}.get(choice, choice)
    if choice == "softmax_kernel":
        option = rng.choice(("seed", "projection", "per-head projection"))
        if option == "seed":
            params.update(num_features=rng.choice((None, 8, 33)), seed=rng.randrange(1000))
        else:
            shape = (p.head_dim, rng.choice((8, 40))) if option == "projection" else (p.q_heads, p.head_dim, 16)
            params["projection"] = randn(*shape)
    elif choice == "taylor":  # F grows as d^2 / 2: keep the chunked states small
        params["feature_dim"] = rng.choice((1, 2, min(8, p.head_dim)))
    elif choice == "hedgehog":
        width = rng.choice((4, 16))
        per_head = rng.random() < 0.5
        params["feature_weights"] = randn(*((p.q_heads,) if per_head else ()), p.head_dim, width, std=p.head_dim**-0.5)
        if rng.random() < 0.5:
            params["feature_bias"] = randn(*((p.q_heads,) if per_head else ()), width, std=0.1)
    # identity's denominator phi(q) . sum phi(k) has no sign and can vanish: keep it bare. The
    # positive maps stay normalized here: bare, their sums grow like N * F with mixed-sign terms,
    # beyond the suite's absolute float32 tolerance (test_linear_forms checks them in float64)
    params["normalize"] = {"identity": False, "relu": rng.random() < 0.5}.get(choice, True)
    if rng.random() < 0.3:  # a bare sum's rounding grows with its terms: larger scales only when normalized
        params["scale"] = rng.choice((0.1, 0.5, 1.0) if params["normalize"] else (0.02, 0.1))
    if rng.random() < 0.2:
        params["eps"] = rng.choice((1e-12, 1e-3))
    params["chunk_size"] = rng.choice((1, 2, 3, 7, 16, 64))
    params["key_padding_mask"] = sample_padding(p, rng)
    return params


def _state_size(head_dim: int, value_dim: Optional[int] = None, **params: Any) -> int:
    """F x (Dv + 1) per head with normalize, F x Dv without; F is D (identity, elu, relu), m (softmax_kernel), 1 + d + d(d+1)/2 (taylor), 2F (hedgehog)."""
    bound = {**_DEFAULTS, **params}
    features = feature_count(bound["feature_map"], head_dim, **{n: bound[n] for names in MAP_PARAMETERS.values() for n in names})
    return features * ((head_dim if value_dim is None else value_dim) + (1 if bound["normalize"] else 0))


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
LINEAR = register(
    Mechanism(
        name="linear",
        family="linear",
        catalog=("F1", "F3"),
        paper=(
            "Transformers are RNNs (Katharopoulos et al., 2020); Performer (Choromanski et al., 2021); "
            "Based (Arora et al., 2024); Hedgehog (Zhang et al., 2024); Lightning Attention-2 (Qin et al., 2024)"
        ),
        formula="out_i = sum_(j visible) (phi(s q_i) . phi(k_j)) v_j / (sum_(j visible) phi(s q_i) . phi(k_j) + eps)",
        cost="O(N (L F + F Dv)) time, O(N L + N F Dv / L) memory (chunked, L = chunk_size); O(Nq Nk) (reference)",
        summary="kernelized linear attention: identity, elu+1, relu, Performer random features, Taylor, Hedgehog or your phi; causal or not",
        patterns=frozenset(PATTERNS),
        params=LINEAR_PARAMS,
        gqa=True,
        exact=True,
        decoder=ScanDecoder("linear", linear_operands, linear_finish),
        sample_params=_sample_params,
        check_params=_check_combination,
        state_size=_state_size,
    )
)
LINEAR.add_backend(Backend("reference", _reference, doc="the scores materialized: the parallel form, the spec", priority=-100, materializes_scores=True))
add_form_backends(LINEAR, linear_operands, linear_finish, linear_fused)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: Any = "elu",
    normalize: bool = True,
    causal: bool = False,
    eps: float = 1e-6,
    scale: Optional[float] = None,
    num_features: Optional[int] = None,
    seed: Optional[int] = None,
    projection: Optional[Tensor] = None,
    feature_dim: Optional[int] = None,
    feature_weights: Optional[Tensor] = None,
    feature_bias: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    chunk_size: int = 64,
    backend: Optional[str] = None,
) -> Tensor:
    """Kernelized linear attention (catalog F1), chunked as Lightning Attention-2 (F3).

    ::

        out_i = sum_j (phi(s q_i) . phi(k_j)) v_j / (sum_j phi(s q_i) . phi(k_j) + eps)

    over every key, or with ``causal`` over the keys j <= i + Nk - Nq; the denominator only
    with ``normalize``. Katharopoulos et al. (2020), Sec. 3.2 eqs. 4-6 (causal: Sec. 3.4).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        feature_map: ``"elu"`` (elu + 1, default), ``"identity"``, ``"relu"``,
            ``"softmax_kernel"`` (Performer's FAVOR+ positive orthogonal random features:
            ``num_features`` m and ``seed``, or ``projection`` W (D, m) / (H, D, m)),
            ``"taylor"`` (Based: 1 + q.k + (q.k)^2 / 2 exactly, over the first ``feature_dim``
            channels), ``"hedgehog"`` (learned: ``feature_weights`` (D, F) / (H, D, F) and
            ``feature_bias``, see :class:`attnzoo.nn.HedgehogFeatureMap`), a callable
            ``phi(x)`` or a pair ``(phi_q, phi_k)``. See :mod:`.feature_maps` for each formula.
        normalize: divide by the row sum of the scores (+ ``eps``).
        causal: each query sees the keys up to its position, bottom-right aligned.
        scale: multiplies q before phi, default D^-0.5 (``softmax_kernel`` splits it as
            sqrt(scale) on q and k: the same kernel exp(scale q.k), lower variance).
        key_padding_mask: (B, Nk) bool, **True = ignore that key** (nn.MultiheadAttention's
            convention): the padded keys' features are zeroed (numerator and denominator), so a
            padded batch equals each sequence alone on its real rows, padded on either side;
            a query that sees no real key outputs 0 (0 / eps with ``normalize``).
        chunk_size: tokens per chunk of the ``chunked`` backend (need not divide N).
        backend: force ``chunked`` (default), ``reference`` or ``recurrent``.

    Returns:
        (B, Hq, Nq, Dv), in the dtype of q (computed in float32 for half inputs).

    Cost: O(N (L F + F Dv)) time and O(N L + N F Dv / L) memory on ``chunked`` (L = chunk_size,
    F the feature count); decoding (``init_state``/``step``, causal) keeps F x (Dv + 1) numbers
    per head whatever the context length (``attnzoo.get("linear").state_size(D, ...)``).

    Example::

        >>> q = k = v = torch.randn(1, 8, 16384, 64)
        >>> out = linear_attention(q, k, v, causal=True)                    # elu + 1, normalized
        >>> out = linear_attention(q, k, v, feature_map="softmax_kernel", num_features=256, seed=0)
    """
    return LINEAR(
        q,
        k,
        v,
        backend=backend,
        feature_map=feature_map,
        normalize=normalize,
        causal=causal,
        eps=eps,
        scale=scale,
        num_features=num_features,
        seed=seed,
        projection=projection,
        feature_dim=feature_dim,
        feature_weights=feature_weights,
        feature_bias=feature_bias,
        key_padding_mask=key_padding_mask,
        chunk_size=chunk_size,
    )


LINEAR.function = linear_attention
