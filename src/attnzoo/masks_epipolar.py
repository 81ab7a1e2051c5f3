"""Epipolar attention masks from camera geometry (catalog X2).

Two pinhole cameras ``i = 1, 2`` with intrinsics ``K_i`` and world-to-camera pose ``(R_i, t_i)``
(``x_cam = R_i X + t_i``, projection ``P_i = K_i [R_i | t_i]``). The relative pose from camera 1
to camera 2 is ``R = R_2 R_1^T``, ``t = t_2 - R t_1``; the essential and fundamental matrices
(Hartley & Zisserman, "Multiple View Geometry", Sec. 9.2 and 9.6, Eq. 9.1 and Result 9.17)::

    E = [t]_x R,        F = K_2^{-T} E K_1^{-1},        x_2^T F x_1 = 0

A pixel ``x_1 = (u, v, 1)`` of view 1 (the query) has the epipolar line ``l = F x_1 = (a, b, c)``
in view 2, and key pixel ``x_2`` of view 2 lies at distance ``|a u_2 + b v_2 + c| / sqrt(a^2 + b^2)``
from it. The mask lets query pixel ``x_1`` attend the key pixels within ``distance`` pixels of its
line; that is the epipolar attention of multi-view generation (ConsisSyn, CamI2V, CCNeXt, Drag
View, AnimateAnywhere: cross-frame attention restricted to the epipolar band, so a point can only
read the pixels that may depict it).

Pixels are flattened row-major (``index = row * width + col``); pixel ``(row, col)`` sits at
``(u, v) = (col + pixel_offset, row + pixel_offset)`` (0: integer coordinates, 0.5: pixel centres).
A query pixel whose line is undefined (it is the epipole of view 1, ``F x_1 = 0``, or the cameras
share their centre, ``t = 0``, ``F = 0``) attends every key (the geometry gives no constraint).

:func:`epipolar_mask` returns a mask mod ``(b, h, q_idx, kv_idx) -> bool`` for
:func:`attnzoo.softmax_attention` (``mask_mod=``): dense, tiled and flex backends take it; the
line of every query pixel is computed once (O(Nq) memory), the predicate costs O(1) per pair, so
the tiled engine plans its tiles from it in O(Nq Nk) time and O(chunk Nk) memory, never holding
the Nq x Nk mask. With a batch of camera pairs (``K_1`` ... of shape (B, 3, 3), (B, 3)) the mask
depends on the batch entry ``b``.

Example::

    >>> mask = epipolar_mask(K1, R1, t1, K2, R2, t2, size=(16, 16), distance=1.5)   # doctest: +SKIP
    >>> out = attnzoo.softmax_attention(q_view1, k_view2, v_view2, mask_mod=mask)     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import ParameterError, ShapeError
from .masks import MaskMod

__all__ = ["fundamental_matrix", "epipolar_lines", "epipolar_mask", "EpipolarMask"]

Size = Union[int, Sequence[int]]


def _camera_tensor(name: str, value: Tensor, tail: tuple[int, ...]) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ParameterError(f"epipolar: {name}: expected a floating tensor of shape {tail} or (B, {', '.join(map(str, tail))})", argument=name)
    if tuple(value.shape[-len(tail):]) != tail or value.dim() not in (len(tail), len(tail) + 1):
        raise ShapeError(f"epipolar: {name}: expected shape {tail} or (B, {', '.join(map(str, tail))}), got {tuple(value.shape)}", argument=name)
    return value.to(torch.float64)


def _skew(t: Tensor) -> Tensor:
    """(..., 3) -> (..., 3, 3): [t]_x, the matrix of the cross product t x ."""
    zero = torch.zeros_like(t[..., 0])
    return torch.stack(
        [
            torch.stack([zero, -t[..., 2], t[..., 1]], -1),
            torch.stack([t[..., 2], zero, -t[..., 0]], -1),
            torch.stack([-t[..., 1], t[..., 0], zero], -1),
        ],
        -2,
    )


def fundamental_matrix(K1: Tensor, R1: Tensor, t1: Tensor, K2: Tensor, R2: Tensor, t2: Tensor) -> Tensor:
    """``F = K_2^{-T} [t]_x R K_1^{-1}`` with ``R = R_2 R_1^T``, ``t = t_2 - R t_1`` (float64).

    Shapes (3, 3) / (3,) for one pair or (B, 3, 3) / (B, 3) for a batch; returns (3, 3) or (B, 3, 3).
    ``x_2^T F x_1 = 0`` for the projections ``x_1``, ``x_2`` of any world point.
    """
    K1, R1, K2, R2 = (_camera_tensor(n, x, (3, 3)) for n, x in (("K1", K1), ("R1", R1), ("K2", K2), ("R2", R2)))
    t1, t2 = _camera_tensor("t1", t1, (3,)), _camera_tensor("t2", t2, (3,))
    R = R2 @ R1.transpose(-1, -2)
    t = t2 - (R @ t1.unsqueeze(-1)).squeeze(-1)
    E = _skew(t) @ R
    return torch.linalg.inv(K2).transpose(-1, -2) @ E @ torch.linalg.inv(K1)


def _size(name: str, size: Size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pair):
        raise ParameterError(f"epipolar: {name}: expected a positive int or (height, width), got {size!r}", argument=name)
    return pair  # type: ignore[return-value]


def _pixels(height: int, width: int, offset: float) -> Tensor:
    """(H * W, 3) homogeneous pixel coordinates (u, v, 1), row-major."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    return torch.stack([cols.reshape(-1) + offset, rows.reshape(-1) + offset, torch.ones(height * width, dtype=torch.float64)], -1)


def epipolar_lines(F: Tensor, size: Size, *, pixel_offset: float = 0.0, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """The lines ``F x_1`` of every view-1 pixel, scaled so ``|l . x_2|`` is the distance in pixels.

    Returns ``(lines, defined)``: (B|1, H1 * W1, 3) float64 and (B|1, H1 * W1) bool (False where
    ``a^2 + b^2 <= eps``: no line).
    """
    h, w = _size("size", size)
    Fb = F.to(torch.float64)
    Fb = Fb.unsqueeze(0) if Fb.dim() == 2 else Fb
    lines = _pixels(h, w, pixel_offset) @ Fb.transpose(-1, -2)  # (B, N1, 3): rows (F x_1)^T
    norm = lines[..., :2].norm(dim=-1)
    defined = norm > eps**0.5
    return lines / torch.where(defined, norm, torch.ones_like(norm)).unsqueeze(-1), defined


@dataclass(frozen=True, eq=False)
class EpipolarMask(MaskMod):
    """The mask mod of :func:`epipolar_mask`: query pixel (view 1) sees key pixel (view 2) within
    ``distance`` of its epipolar line."""

    lines: Tensor  # (B|1, Nq, 3) float64, unit normals
    defined: Tensor  # (B|1, Nq) bool
    key_width: int
    key_count: int
    distance: float
    pixel_offset: float

    @property
    def batch_head_dependent(self) -> bool:  # type: ignore[override]
        return self.lines.shape[0] > 1

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        lines, defined = self.lines.to(q_idx.device), self.defined.to(q_idx.device)
        bi = b if lines.shape[0] > 1 else torch.zeros_like(b)
        nq = lines.shape[1]
        qi = q_idx.clamp(0, nq - 1)  # tiled plans may pad the query range; outside rows are discarded
        line = lines[bi, qi]  # broadcast(b, q_idx) + (3,)
        kk = kv_idx.clamp(0, self.key_count - 1)
        u = (kk % self.key_width).to(torch.float64) + self.pixel_offset
        v = (kk // self.key_width).to(torch.float64) + self.pixel_offset
        dist = (line[..., 0] * u + line[..., 1] * v + line[..., 2]).abs()
        return (dist <= self.distance) | ~defined[bi, qi]


def epipolar_mask(
    K1: Tensor,
    R1: Tensor,
    t1: Tensor,
    K2: Tensor,
    R2: Tensor,
    t2: Tensor,
    *,
    size: Size,
    key_size: Optional[Size] = None,
    distance: float = 1.0,
    pixel_offset: float = 0.0,
) -> EpipolarMask:
    """A mask mod: view-1 pixel (query) attends the view-2 pixels (keys) within ``distance`` of its epipolar line.

    Args:
        K1, R1, t1, K2, R2, t2: intrinsics (3, 3), world-to-camera rotations (3, 3) and translations (3,)
            of the query view (1) and the key view (2); a leading batch dim B for one pair per batch entry.
        size: (height, width) of the query view's pixel grid (Nq = H W, row-major). key_size: of the key view
            (default ``size``); the intrinsics must be those of these grids (scale K for a latent grid).
        distance: the band's half-width in key-view pixels (>= 0).
        pixel_offset: pixel (row, col) sits at (col + offset, row + offset); 0.5 for pixel centres.

    Cost: O(Nq) to build (one line per query pixel); O(1) per (query, key) pair when evaluated.
    """
    if isinstance(distance, bool) or not isinstance(distance, (int, float)) or not distance >= 0 or distance == float("inf"):
        raise ParameterError(f"epipolar_mask: distance: expected a finite number >= 0, got {distance!r}", argument="distance")
    if isinstance(pixel_offset, bool) or not isinstance(pixel_offset, (int, float)):
        raise ParameterError(f"epipolar_mask: pixel_offset: expected a number, got {pixel_offset!r}", argument="pixel_offset")
    F = fundamental_matrix(K1, R1, t1, K2, R2, t2)
    kh, kw = _size("key_size", size if key_size is None else key_size)
    lines, defined = epipolar_lines(F, size, pixel_offset=float(pixel_offset))
    return EpipolarMask(lines, defined, kw, kh * kw, float(distance), float(pixel_offset))
