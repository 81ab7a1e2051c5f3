"""attnzoo.bench.timing: warm-up, repeat cap and budget, median and IQR; paired timing against a baseline."""

from __future__ import annotations

import time

import pytest

from attnzoo.bench import timing as timing_module
from attnzoo.bench.timing import PairedTiming, Timing, summarize, time_call, time_paired, unstable


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


# --------------------------------------------------------------------------------------------
# paired timing, on a fake clock: no assertion depends on the real wall clock
# --------------------------------------------------------------------------------------------
class FakeClock:
    """``perf_counter`` for the timing module: time moves only when a fake call runs."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def perf_counter(self) -> float:
        return self.now

    def call(self, name: str, durations_ms):
        """A function that records its name and advances the clock by the next duration (ms)."""
        it = iter(durations_ms)

        def fn() -> None:
            self.calls.append(name)
            self.now += next(it) / 1e3

        return fn


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing_module.time, "perf_counter", fake.perf_counter)
    return fake


def test_paired_timing_warms_up_both_then_alternates_calls_in_pairs(clock):
    case = clock.call("A", [1.0] * 100)
    base = clock.call("B", [2.0] * 100)
    paired = time_paired(case, base, budget_s=60.0, max_repeats=6, warmup=2)
    assert clock.calls[:4] == ["A", "B", "A", "B"]  # warm-up of both
    # then pairs whose order alternates: A B | B A | A B ...; each case call next to a baseline call
    assert clock.calls[4:] == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert isinstance(paired, PairedTiming) and paired.pairs == 6
    assert paired.case.median_ms == pytest.approx(1.0) and paired.baseline.median_ms == pytest.approx(2.0)
    assert paired.ratio == pytest.approx(0.5)


def test_paired_ratio_is_the_median_of_the_pairs_not_the_ratio_of_the_medians(clock):
    # the machine slows down 10x after three pairs: the pairs' ratios stay near 0.5
    case_ms = [1.0, 1.1, 0.9, 10.0, 11.0, 9.0, 10.5]
    base_ms = [2.0, 2.0, 2.0, 20.0, 20.0, 20.0, 20.0]
    warm = [5.0]  # one warm-up call each, not timed
    paired = time_paired(clock.call("A", warm + case_ms), clock.call("B", warm + base_ms), budget_s=60.0, max_repeats=7)
    ratios = [a / b for a, b in zip(case_ms, base_ms)]  # 0.5 0.55 0.45 0.5 0.55 0.45 0.525
    expected = summarize(ratios)
    assert paired.ratio == pytest.approx(0.5) == pytest.approx(expected.median_ms)
    assert (paired.ratio_q1, paired.ratio_q3) == (pytest.approx(expected.q1_ms), pytest.approx(expected.q3_ms))
    assert paired.ratio_iqr == pytest.approx(expected.q3_ms - expected.q1_ms)
    # the medians alone (9 ms / 20 ms) would say 0.45, and the case's times spread wider than
    # their median (q1 1.05, q3 10.25): the row is flagged although its paired ratio is steady
    assert paired.case.median_ms / paired.baseline.median_ms == pytest.approx(0.45)
    assert paired.case.iqr_ms == pytest.approx(9.2) and paired.case.median_ms == pytest.approx(9.0)
    assert paired.unstable
    assert not unstable(paired.ratio, paired.ratio_q1, paired.ratio_q3)


def test_paired_budget_counts_both_calls_and_keeps_the_minimum_and_the_cap(clock):
    # 30 ms per pair against a 50 ms budget: the second pair spends it
    paired = time_paired(clock.call("A", [10.0] * 50), clock.call("B", [20.0] * 50), budget_s=0.05, max_repeats=100, min_repeats=1, warmup=0)
    assert paired.pairs == 2 and clock.calls == ["A", "B", "B", "A"]
    clock.calls.clear()
    paired = time_paired(clock.call("A", [10.0] * 50), clock.call("B", [20.0] * 50), budget_s=0.001, max_repeats=100, min_repeats=3, warmup=0)
    assert paired.pairs == 3 and len(clock.calls) == 6
    clock.calls.clear()
    paired = time_paired(clock.call("A", [0.0] * 50), clock.call("B", [1.0] * 50), budget_s=60.0, max_repeats=4, warmup=1)
    assert paired.pairs == 4 and len(clock.calls) == 2 + 8
    with pytest.raises(ValueError, match="time_paired: repeats must be >= 1"):
        time_paired(lambda: None, lambda: None, max_repeats=0)


def test_paired_ratio_is_none_without_a_positive_baseline_time(clock):
    paired = time_paired(clock.call("A", [1.0] * 10), clock.call("B", [0.0] * 10), max_repeats=3, warmup=0)
    assert paired.ratio is None and paired.ratio_q1 is None and paired.ratio_iqr is None and not paired.unstable


def test_unstable_means_iqr_wider_than_the_median():
    assert unstable(0.6, 0.5, 9.5)  # the case: a 0.6 ms median with a 9 ms IQR
    assert not unstable(0.6, 0.5, 0.7)
    assert not unstable(1.0, 0.5, 1.5)  # IQR equal to the median: not flagged
    assert not unstable(None, 0.5, 9.5) and not unstable(0.6, None, 9.5)  # unknown quartiles: no flag
    noisy_ratio = PairedTiming(Timing(1.0, 0.9, 1.1, 5), Timing(2.0, 1.9, 2.1, 5), 0.5, 0.1, 0.9)
    noisy_time = PairedTiming(Timing(1.0, 0.5, 2.0, 5), Timing(2.0, 1.9, 2.1, 5), 0.5, 0.45, 0.55)
    steady = PairedTiming(Timing(1.0, 0.9, 1.1, 5), Timing(2.0, 1.9, 2.1, 5), 0.5, 0.45, 0.55)
    assert noisy_ratio.unstable and noisy_time.unstable and not steady.unstable
