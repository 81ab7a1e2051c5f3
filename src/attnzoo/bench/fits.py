"""Efficiency length: from which sequence length a mechanism is cheaper than vanilla attention.

CAB (Zhang et al. 2023, "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling",
section on efficiency length) summarizes a cost curve by one number: fit vanilla attention's cost
(time or peak memory) as a quadratic in the sequence length n, ``a n^2 + b n + c``, fit the
efficient mechanism's cost as a line ``d n + e`` (both by least squares, with an intercept), and
report where the two fits cross. CAB's script takes the root ``(-(b-d) + sqrt(disc)) / 2a``
of ``a n^2 + (b-d) n + (c-e) = 0``: with ``a > 0`` the larger root, the length beyond which the
mechanism's fit stays below vanilla's. This module reports the same quantity and says what happens
where CAB's formula has no real answer:

* ``0.0``: the line is below the parabola at every n > 0 (the mechanism is cheaper everywhere,
  e.g. the discriminant is negative, or both roots are negative);
* ``math.inf``: the line never stays below the parabola for large n (vanilla's fit bends down,
  ``a < 0``, or is no steeper than the mechanism's line): no efficiency length;
* ``None`` (from :func:`efficiency_length` only): too few points to fit (fewer than 3 distinct
  lengths for vanilla, fewer than 2 for the mechanism); :func:`fit_efficiency` raises instead.

CAB also drops the shortest length from the mechanism's time fit (launch overhead dominates it);
here the caller chooses the points. The fits are solved in float64 on lengths scaled to
``[0, 1]`` (``n / max n``), so ``n^2`` up to 131072^2 does not spoil the conditioning.

**Zero is a range, not a float.** A least-squares fit of costs that are exactly linear returns a
curvature of about ``1e-21``, with a sign that depends on the machine's BLAS (seen: ``-7e-21`` on
an AMD EPYC, ``+`` on an Intel Xeon, where it put the crossing at ``3e20`` instead of "never").
So :func:`fit_efficiency` treats a coefficient as zero when the data cannot tell it from zero:
the curvature when ``|a| n_max^2`` (its contribution at the longest length) is within
``RESOLUTION`` of the costs' scale or within ``SIGNIFICANCE`` standard errors of zero (the
standard error from the fit's residual, where there are more points than coefficients); then
vanilla is refitted as a line. Likewise the two slopes are equal when ``|b - d| n_max`` is within
those bounds. :func:`crossing_length` takes these tolerances as arguments and applies no
tolerance of its own (its inputs are exact coefficients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["EfficiencyFit", "crossing_length", "efficiency_length", "fit_efficiency", "fit_polynomial"]

Points = Iterable[tuple[float, Optional[float]]]


@dataclass(frozen=True)
class EfficiencyFit:
    """Both least-squares fits (coefficients in the caller's units of n and cost) and their crossing.

    ``vanilla = (a, b, c)`` for ``a n^2 + b n + c``; ``mechanism = (d, e)`` for ``d n + e``;
    ``length`` is the efficiency length (``0.0`` cheaper everywhere, ``inf`` never); ``r2_*`` are
    the coefficients of determination of the two fits (how well each model explains its costs).
    """

    vanilla: tuple[float, float, float]
    mechanism: tuple[float, float]
    length: float
    r2_vanilla: float
    r2_mechanism: float


def _clean(points: Points) -> list[tuple[float, float]]:
    """The points with a finite cost, as floats (a case that did not run has cost None)."""
    return [(float(n), float(c)) for n, c in points if c is not None and math.isfinite(float(c))]


# A coefficient is indistinguishable from zero when its contribution over the data's range is
# below RESOLUTION x the costs' scale (float64 rounding in a well-conditioned solve is ~1e-13 of
# it) or below SIGNIFICANCE standard errors (the data's own noise).
RESOLUTION = 1e-9
SIGNIFICANCE = 3.0


@dataclass(frozen=True)
class _LeastSquares:
    """A polynomial fit on ``x = n / scale``: coefficients and standard errors in those units."""

    solution: list[float]  # coef[k] * scale**k: each term's size at the longest length
    stderr: list[float]  # 0.0 where the points leave no degrees of freedom for the residual
    scale: float
    residual: float
    total: float

    def coef(self) -> list[float]:
        return [c / self.scale**k for k, c in enumerate(self.solution)]

    def r2(self) -> float:
        return 1.0 - self.residual / self.total if self.total > 0 else 1.0


def _least_squares(n: Sequence[float], cost: Sequence[float], degree: int) -> _LeastSquares:
    x = torch.tensor(n, dtype=torch.float64)
    y = torch.tensor(cost, dtype=torch.float64)
    scale = float(x.abs().max()) or 1.0
    design = torch.stack([(x / scale) ** k for k in range(degree + 1)], dim=1)
    solution = torch.linalg.lstsq(design, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residual = float(((design @ solution - y) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    dof = len(n) - (degree + 1)
    if dof > 0:  # the usual OLS covariance sigma^2 (X^T X)^-1, sigma^2 from the residual
        covariance = torch.linalg.pinv(design.T @ design) * (residual / dof)
        stderr = covariance.diagonal().clamp_min(0).sqrt().tolist()
    else:
        stderr = [0.0] * (degree + 1)
    return _LeastSquares(solution.tolist(), stderr, scale, residual, total)


def fit_polynomial(n: Sequence[float], cost: Sequence[float], degree: int) -> tuple[list[float], float]:
    """Least-squares polynomial ``sum_k coef[k] n^k`` (k = 0..degree) and its R^2.

    Solved on ``n / max(n)`` in float64 and converted back, for conditioning.
    """
    fit = _least_squares(n, cost, degree)
    return fit.coef(), fit.r2()


def _negligible(stderr: float, cost_scale: float) -> float:
    """The largest contribution at the longest length (``|coef| n_max^k``) that counts as zero."""
    return max(RESOLUTION * cost_scale, SIGNIFICANCE * stderr)


def crossing_length(
    vanilla: tuple[float, float, float],
    mechanism: tuple[float, float],
    *,
    zero_curvature: float = 0.0,
    zero_slope: float = 0.0,
) -> float:
    """The smallest ``n0 >= 0`` with ``a n^2 + b n + c > d n + e`` for every ``n > n0``.

    ``0.0`` when that holds for every n > 0, ``inf`` when no such n0 exists (see the module doc).
    ``|a| <= zero_curvature`` counts as ``a == 0`` and ``|b - d| <= zero_slope`` as equal slopes
    (:func:`fit_efficiency` derives both from the data; the defaults compare exactly).
    """
    a, b, c = vanilla
    d, e = mechanism
    slope, offset = b - d, c - e  # vanilla minus mechanism: a n^2 + slope n + offset
    if abs(slope) <= zero_slope:
        slope = 0.0
    if abs(a) <= zero_curvature:
        if slope > 0:
            return max(-offset / slope, 0.0)
        return 0.0 if slope == 0 and offset > 0 else math.inf
    if a < 0:
        return math.inf
    disc = slope * slope - 4 * a * offset
    if disc < 0:
        return 0.0
    # the numerically stable pair of roots (no cancellation between slope and sqrt(disc))
    q = -0.5 * (slope + math.copysign(math.sqrt(disc), slope))
    roots = [q / a] + ([offset / q] if q != 0 else [])
    return max(max(roots), 0.0)


def fit_efficiency(vanilla: Points, mechanism: Points) -> EfficiencyFit:
    """CAB's fits: vanilla's ``(n, cost)`` as a quadratic, the mechanism's as a line; their crossing.

    Points whose cost is None or not finite are dropped. Raises ``ValueError`` when vanilla has
    fewer than 3 distinct lengths or the mechanism fewer than 2. A curvature the data cannot tell
    from zero (module doc) is reported as ``a = 0.0``, with vanilla refitted as a line.
    """
    van, mech = _clean(vanilla), _clean(mechanism)
    for name, points, need in (("vanilla", van, 3), ("mechanism", mech, 2)):
        distinct = len({n for n, _ in points})
        if distinct < need:
            raise ValueError(f"efficiency length: {name} has {distinct} distinct lengths with a cost, needs at least {need}")
    cost_scale = max(abs(c) for _, c in van + mech) or 1.0
    n_max = max(abs(n) for n, _ in van + mech) or 1.0
    quad = _least_squares([n for n, _ in van], [c for _, c in van], 2)
    line = _least_squares([n for n, _ in mech], [c for _, c in mech], 1)
    vanilla_fit = quad
    if abs(quad.solution[2]) <= _negligible(quad.stderr[2], cost_scale):
        vanilla_fit = _least_squares([n for n, _ in van], [c for _, c in van], 1)
    van_coef, line_coef = vanilla_fit.coef(), line.coef()
    a_b_c = (van_coef[2] if len(van_coef) == 3 else 0.0, van_coef[1], van_coef[0])
    d_e = (line_coef[1], line_coef[0])
    # the slopes' difference at the longest length, against both fits' noise
    slope_stderr = math.hypot(vanilla_fit.stderr[1] / vanilla_fit.scale, line.stderr[1] / line.scale) * n_max
    zero_slope = _negligible(slope_stderr, cost_scale) / n_max
    length = crossing_length(a_b_c, d_e, zero_slope=zero_slope)
    return EfficiencyFit(a_b_c, d_e, length, vanilla_fit.r2(), line.r2())


def efficiency_length(vanilla: Points, mechanism: Points) -> Optional[float]:
    """CAB's efficiency length of ``mechanism`` against ``vanilla``, both lists of ``(n, cost)``.

    A float (``0.0``: cheaper at every length; ``math.inf``: the fits never cross for good), or
    None when there are too few points to fit (see :func:`fit_efficiency` for the reason).

    >>> round(efficiency_length([(1, 1), (2, 4), (3, 9)], [(1, 4), (2, 8)]), 9)  # n^2 against 4n
    4.0
    """
    try:
        return fit_efficiency(vanilla, mechanism).length
    except ValueError:
        return None
