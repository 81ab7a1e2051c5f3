"""attnzoo.bench.fits: CAB's efficiency length (quadratic fit of vanilla crossing a linear fit)."""

from __future__ import annotations

import math

import pytest

from attnzoo.bench.fits import crossing_length, efficiency_length, fit_efficiency, fit_polynomial

LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def costs(fn, lengths=LENGTHS):
    return [(n, fn(n)) for n in lengths]


def larger_root(a: float, b: float, c: float) -> float:
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def test_exact_quadratic_and_line_recover_the_closed_form_crossing():
    a, b, c = 2e-6, 1e-3, 0.5  # vanilla: a n^2 + b n + c
    d, e = 0.02, 3.0  # mechanism: d n + e
    fit = fit_efficiency(costs(lambda n: a * n * n + b * n + c), costs(lambda n: d * n + e))
    assert fit.vanilla == pytest.approx((a, b, c), rel=1e-6)
    assert fit.mechanism == pytest.approx((d, e), rel=1e-9)
    assert fit.length == pytest.approx(larger_root(a, b - d, c - e), rel=1e-9)
    assert fit.r2_vanilla == pytest.approx(1.0) and fit.r2_mechanism == pytest.approx(1.0)


def test_pure_n_squared_against_linear_crosses_at_slope_over_a():
    # n^2 / 1000 against 8 n: vanilla is dearer beyond n = 8000
    assert efficiency_length(costs(lambda n: n * n / 1000), costs(lambda n: 8 * n)) == pytest.approx(8000, rel=1e-9)


def test_the_larger_root_is_returned_when_both_roots_are_positive():
    # vanilla minus mechanism = (n - 1000)(n - 5000) / 1e4: cheaper below 1000, dearer in between, cheaper beyond 5000
    a, slope, offset = 1e-4, -0.6, 500.0
    vanilla = costs(lambda n: a * n * n + slope * n + offset + 2 * n)
    mech = costs(lambda n: 2 * n)
    assert efficiency_length(vanilla, mech) == pytest.approx(5000, rel=1e-9)


def test_noisy_costs_still_land_near_the_true_crossing():
    wobble = [1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.0]
    vanilla = [(n, (n * n / 1000) * w) for n, w in zip(LENGTHS, wobble)]
    mech = [(n, 8 * n * w) for n, w in zip(LENGTHS, reversed(wobble))]
    assert efficiency_length(vanilla, mech) == pytest.approx(8000, rel=0.1)


def test_cheaper_everywhere_gives_zero():
    # mechanism below vanilla at every n > 0 (no real crossing: negative discriminant)
    assert efficiency_length(costs(lambda n: n * n + 10), costs(lambda n: 1.0 + 0 * n)) == 0.0
    # crossing only at negative n
    assert crossing_length((1.0, 5.0, 1.0), (1.0, 0.5)) == 0.0


def test_no_crossing_for_good_gives_inf():
    # vanilla linear in n (a = 0) and flatter than the mechanism's line
    assert efficiency_length(costs(lambda n: 0.5 * n + 1), costs(lambda n: 2.0 * n)) == math.inf
    # vanilla's fit bends down
    assert crossing_length((-1e-6, 1.0, 0.0), (0.1, 0.0)) == math.inf


# Rounding-level perturbations of both signs, as different BLAS builds leave them in a fit of exactly
# linear costs (an AVX-512 Xeon's MKL left a = +1e-21 where an EPYC's left -7e-21): the answer must
# not depend on which sign the machine produced.
ROUNDING = (1 + 1e-15, 1 - 1e-15, 1 + 2e-15, 1, 1 - 2e-15, 1 + 1e-15, 1 - 1e-15)


@pytest.mark.parametrize("sign", [1, -1])
def test_linear_vanilla_is_a_line_whatever_the_rounding(sign):
    vanilla = [(n, (0.5 * n + 1) * (1 + sign * (r - 1))) for n, r in zip(LENGTHS, ROUNDING)]
    fit = fit_efficiency(vanilla, costs(lambda n: 2.0 * n))
    assert fit.vanilla[0] == 0.0 and fit.vanilla[1:] == pytest.approx((0.5, 1.0), rel=1e-9)
    assert fit.length == math.inf


@pytest.mark.parametrize("curvature", [1e-21, -1e-21, 0.0])
def test_a_curvature_within_tolerance_counts_as_zero(curvature):
    assert crossing_length((curvature, 0.5, 1.0), (2.0, 0.0), zero_curvature=1e-18) == math.inf
    assert crossing_length((curvature, 2.0, 0.0), (1.0, 100.0), zero_curvature=1e-18) == pytest.approx(100.0)
    # without a tolerance a positive curvature is taken at its word: the crossing is astronomically far
    if curvature > 0:
        assert crossing_length((curvature, 0.5, 1.0), (2.0, 0.0)) > 1e20


def test_equal_slopes_compare_their_offsets_whatever_the_rounding():
    for wobble in (1 + 1e-15, 1 - 1e-15):
        line = [(n, (2 * n + 5) * (wobble if i % 2 else 1)) for i, n in enumerate(LENGTHS)]
        # same slope, mechanism 4 cheaper at every length
        assert efficiency_length(line, costs(lambda n: 2 * n + 1)) == 0.0
        # same slope, mechanism 4 dearer at every length
        assert efficiency_length(line, costs(lambda n: 2 * n + 9)) == math.inf


def test_a_small_real_curvature_is_kept():
    # a n^2 adds 2.7e-4 at n = 16384 against costs of ~8000: 3e-8 of the scale, well above rounding
    a = 1e-12
    fit = fit_efficiency(costs(lambda n: a * n * n + 0.5 * n), costs(lambda n: 0.5 * n + 1e-4))
    assert fit.vanilla[0] == pytest.approx(a, rel=1e-3)
    assert fit.length == pytest.approx(math.sqrt(1e-4 / a), rel=1e-3)


def test_curvature_within_the_noise_of_the_costs_counts_as_zero():
    # linear costs with 1% noise: the quadratic term the fit finds is below 3 standard errors
    wobble = [1.01, 0.99, 1.0, 1.01, 0.99, 1.01, 1.0]  # the quadratic term fits at -1.0 standard errors
    vanilla = [(n, (0.5 * n + 100) * w) for n, w in zip(LENGTHS, wobble)]
    fit = fit_efficiency(vanilla, costs(lambda n: 2.0 * n))
    assert fit.vanilla[0] == 0.0
    assert fit.length == math.inf


def test_linear_vanilla_steeper_than_the_mechanism_crosses_where_the_lines_do():
    assert crossing_length((0.0, 2.0, 0.0), (1.0, 100.0)) == pytest.approx(100.0)


def test_too_few_points_is_none_or_a_clear_error():
    two = [(256, 1.0), (512, 4.0)]
    assert efficiency_length(two, costs(lambda n: n)) is None
    assert efficiency_length(costs(lambda n: n * n), [(256, 1.0)]) is None
    with pytest.raises(ValueError, match="vanilla has 2 distinct lengths"):
        fit_efficiency(two, costs(lambda n: n))
    with pytest.raises(ValueError, match="mechanism has 1 distinct lengths"):
        fit_efficiency(costs(lambda n: n * n), [(256, 1.0), (256, 1.1)])


def test_missing_costs_are_dropped_before_counting():
    vanilla = costs(lambda n: n * n / 1000) + [(32768, None), (65536, float("nan"))]
    mech = costs(lambda n: 8 * n) + [(32768, None)]
    assert efficiency_length(vanilla, mech) == pytest.approx(8000, rel=1e-9)
    assert efficiency_length([(256, None), (512, None), (1024, 1.0)], mech) is None


def test_polynomial_fit_is_well_conditioned_at_long_lengths():
    lengths = (4096, 16384, 65536, 131072)
    coef, r2 = fit_polynomial(list(lengths), [3e-7 * n * n + 1e-2 * n + 4.0 for n in lengths], 2)
    assert coef == pytest.approx([4.0, 1e-2, 3e-7], rel=1e-6)
    assert r2 == pytest.approx(1.0)
