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


def fit_polynomial(n: Sequence[float], cost: Sequence[float], degree: int) -> tuple[list[float], float]:
    """Least-squares polynomial ``sum_k coef[k] n^k`` (k = 0..degree) and its R^2.

    Solved on ``n / max(n)`` in float64 and converted back, for conditioning.
    """
    x = torch.tensor(n, dtype=torch.float64)
    y = torch.tensor(cost, dtype=torch.float64)
    scale = float(x.abs().max()) or 1.0
    design = torch.stack([(x / scale) ** k for k in range(degree + 1)], dim=1)
    solution = torch.linalg.lstsq(design, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    coef = [float(c) / scale**k for k, c in enumerate(solution)]
    residual = float(((design @ solution - y) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return coef, r2


def crossing_length(vanilla: tuple[float, float, float], mechanism: tuple[float, float]) -> float:
    """The smallest ``n0 >= 0`` with ``a n^2 + b n + c > d n + e`` for every ``n > n0``.

    ``0.0`` when that holds for every n > 0, ``inf`` when no such n0 exists (see the module doc).
    """
    a, b, c = vanilla
    d, e = mechanism
    slope, offset = b - d, c - e  # vanilla minus mechanism: a n^2 + slope n + offset
    if a < 0:
        return math.inf
    if a == 0:
        if slope > 0:
            return max(-offset / slope, 0.0)
        return 0.0 if slope == 0 and offset > 0 else math.inf
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
    fewer than 3 distinct lengths or the mechanism fewer than 2.
    """
    van, mech = _clean(vanilla), _clean(mechanism)
    for name, points, need in (("vanilla", van, 3), ("mechanism", mech, 2)):
        distinct = len({n for n, _ in points})
        if distinct < need:
            raise ValueError(f"efficiency length: {name} has {distinct} distinct lengths with a cost, needs at least {need}")
    quad, r2_van = fit_polynomial([n for n, _ in van], [c for _, c in van], 2)
    line, r2_mech = fit_polynomial([n for n, _ in mech], [c for _, c in mech], 1)
    a_b_c = (quad[2], quad[1], quad[0])
    d_e = (line[1], line[0])
    return EfficiencyFit(a_b_c, d_e, crossing_length(a_b_c, d_e), r2_van, r2_mech)


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
