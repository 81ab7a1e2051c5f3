"""attnzoo.bench.timing: warm-up, repeat cap and budget, median and IQR."""

from __future__ import annotations

import time

import pytest

from attnzoo.bench.timing import Timing, summarize, time_call


class CountingSleeper:
    """A callable that sleeps a fixed time and counts its calls."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        time.sleep(self.seconds)


def test_median_and_iqr_are_positive_and_ordered():
    timing = time_call(CountingSleeper(0.001), budget_s=0.05, max_repeats=20)
    assert isinstance(timing, Timing)
    assert 0 < timing.q1_ms <= timing.median_ms <= timing.q3_ms
    assert timing.iqr_ms == pytest.approx(timing.q3_ms - timing.q1_ms)
    assert timing.iqr_ms >= 0
    assert timing.median_ms >= 1.0  # slept 1 ms per call


def test_repeat_cap_bounds_the_calls_even_with_a_large_budget():
    fn = CountingSleeper(0.0)
    timing = time_call(fn, budget_s=60.0, max_repeats=7, warmup=2)
    assert timing.repeats == 7
    assert fn.calls == 7 + 2  # the warm-up calls are not timed


def test_budget_stops_repeats_but_never_below_the_minimum():
    fn = CountingSleeper(0.02)
    timing = time_call(fn, budget_s=0.001, max_repeats=100, min_repeats=3, warmup=0)
    assert timing.repeats == 3
    assert fn.calls == 3


def test_budget_ends_a_run_before_the_cap():
    fn = CountingSleeper(0.005)
    timing = time_call(fn, budget_s=0.03, max_repeats=1000, min_repeats=1, warmup=0)
    # each call takes >= 5 ms, so 30 ms of budget is spent after at most 6 repeats
    assert 1 <= timing.repeats <= 6
    assert fn.calls == timing.repeats


def test_summarize_known_samples():
    timing = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (timing.q1_ms, timing.median_ms, timing.q3_ms, timing.repeats) == (2.0, 3.0, 4.0, 5)
    one = summarize([2.5])
    assert (one.q1_ms, one.median_ms, one.q3_ms, one.iqr_ms) == (2.5, 2.5, 2.5, 0.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([])
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_call(lambda: None, max_repeats=0)
