"""Shape, dtype and device checks shared by every entry point.

Every mechanism's inputs pass through :func:`describe` once per call; it raises the library's
errors with the argument named and returns a :class:`Problem`, the small record dispatch and
the backends' predicates read. Per-axis arguments (kernel sizes, dilations) are normalised by
:func:`per_axis` here too, so no mechanism re-implements these checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .errors import DeviceError, DTypeError, NonFiniteError, ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """What dispatch knows about one call, read off q, k and v.

    Token layout is ``(B, H, N, D)``; spatial layout ``(B, H, *spatial, D)`` where
    ``q_len``/``kv_len`` are the products of the spatial sizes.
    """

    batch: int
    q_heads: int
    kv_heads: int
    q_shape: tuple[int, ...]  # spatial sizes of q (one entry for token layout)
    kv_shape: tuple[int, ...]
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    @property
    def q_len(self) -> int:
        return math.prod(self.q_shape)

    @property
    def kv_len(self) -> int:
        return math.prod(self.kv_shape)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for MHA, >1 for GQA, q_heads for MQA)."""
        return self.q_heads // self.kv_heads

    @property
    def device_type(self) -> str:
        return self.device.type


def _shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _layout(n_spatial: int) -> str:
    axes = "N" if n_spatial == 1 else ", ".join(f"S{i}" for i in range(n_spatial))
    return f"(B, H, {axes}, D)"


def describe(
    q: Any,
    k: Any,
    v: Any,
    *,
    mechanism: str,
    spatial_dims: Sequence[int] = (1,),
    allow_gqa: bool = True,
    allow_cross: bool = True,
) -> Problem:
    """Check q, k, v against each other and return the :class:`Problem` they pose.

    Raises :class:`ShapeError`, :class:`DTypeError` or :class:`DeviceError` naming the argument.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{mechanism}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    ranks = sorted(3 + s for s in spatial_dims)
    layout = " or ".join(_layout(s) for s in sorted(spatial_dims))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() not in ranks:
            raise ShapeError(
                f"{mechanism}: {name}: expected a tensor of rank {' or '.join(map(str, ranks))} "
                f"laid out {layout}, got shape {_shape_str(t)}",
                argument=name,
            )
    if not (q.dim() == k.dim() == v.dim()):
        raise ShapeError(
            f"{mechanism}: q, k, v must have the same rank, got q{_shape_str(q)}, k{_shape_str(k)}, "
            f"v{_shape_str(v)}",
            argument="k" if k.dim() != q.dim() else "v",
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ShapeError(
            f"{mechanism}: batch sizes differ: q{_shape_str(q)}, k{_shape_str(k)}, v{_shape_str(v)}",
            argument="k" if k.shape[0] != q.shape[0] else "v",
        )
    if k.shape[1] != v.shape[1]:
        raise ShapeError(
            f"{mechanism}: v: expected {k.shape[1]} heads like k, got shape {_shape_str(v)}",
            argument="v",
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0 or (not allow_gqa and hq != hkv):
        expected = f"{hq} heads like q" if not allow_gqa else f"a number of heads dividing q's {hq} (GQA/MQA)"
        raise ShapeError(f"{mechanism}: k: expected {expected}, got shape {_shape_str(k)}", argument="k")
    if k.shape[-1] != q.shape[-1]:
        raise ShapeError(
            f"{mechanism}: k: expected head dim {q.shape[-1]} like q, got shape {_shape_str(k)}",
            argument="k",
        )
    if k.shape[2:-1] != v.shape[2:-1]:
        raise ShapeError(
            f"{mechanism}: v: expected the key length/spatial sizes {tuple(k.shape[2:-1])} of k, "
            f"got shape {_shape_str(v)}",
            argument="v",
        )
    if not allow_cross and q.shape[2:-1] != k.shape[2:-1]:
        raise ShapeError(
            f"{mechanism}: k: expected the spatial sizes {tuple(q.shape[2:-1])} of q (self-attention "
            f"only), got shape {_shape_str(k)}",
            argument="k",
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(
                f"{mechanism}: {name}: expected a floating dtype (float16, bfloat16, float32, float64), "
                f"got {t.dtype}",
                argument=name,
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise DTypeError(f"{mechanism}: {name}: expected dtype {q.dtype} like q, got {t.dtype}", argument=name)
        if t.device != q.device:
            raise DeviceError(
                f"{mechanism}: {name}: expected device {q.device} like q, got {t.device}", argument=name
            )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if 0 in t.shape[:2] or t.shape[-1] == 0:
            raise ShapeError(
                f"{mechanism}: {name}: batch, heads and head dim must be non-empty, got {_shape_str(t)}",
                argument=name,
            )
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return Problem(
        batch=q.shape[0],
        q_heads=hq,
        kv_heads=hkv,
        q_shape=tuple(q.shape[2:-1]),
        kv_shape=tuple(k.shape[2:-1]),
        head_dim=q.shape[-1],
        value_dim=v.shape[-1],
        dtype=q.dtype,
        device=q.device,
        requires_grad=grad,
    )


def check_finite_inputs(mechanism: str, tensors: dict[str, Any], consequence: str = "they reach the output") -> None:
    """Raise :class:`NonFiniteError` naming the first tensor holding NaN or infinity."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise NonFiniteError(
                f"{mechanism}: {name}: holds {n_nan} NaN and {n_inf} infinite values, and {consequence}; "
                f"clean the input (or call attnzoo.set_checks(finite=False) to skip this check)",
                argument=name,
            )


def per_axis(value: Any, ndim: int, kind: type = int) -> Optional[tuple]:
    """An int (or bool)-or-per-axis argument as a tuple of ``ndim`` entries, or None when invalid.

    NATTEN style: one value for every spatial axis, or one per axis. Parameter checks call it
    and word the error; mechanisms call it to normalise what the checks accepted.
    """
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        return None
    for x in values:
        if kind is bool and not isinstance(x, bool):
            return None
        if kind is int and (isinstance(x, bool) or not isinstance(x, int)):
            return None
    return values
