"""Wall-clock timing of one call: warm-up, then repeats until a time budget or a repeat cap.

Each repeat is timed on its own, so the result carries a spread and not only a mean: the
median (robust to the odd slow repeat a busy machine produces) and the inter-quartile range
(IQR = q3 - q1). On CUDA each repeat is bracketed by CUDA events and the device is
synchronized before reading them; on CPU ``time.perf_counter`` is exact enough.

:func:`time_paired` times a call against a baseline on a shared machine: the two are called in
adjacent pairs (case, baseline, baseline, case, ...), and the ratio reported is the median of the
per-pair ratios, which cancels the slow drifts of the machine's load that separate timing runs
(minutes apart) pick up as a speed difference. :func:`unstable` flags a spread wider than its
median.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["PairedTiming", "Timing", "time_call", "time_paired", "summarize", "synchronize", "unstable"]


@dataclass(frozen=True)
class Timing:
    """Summary of the repeats of one timed call, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int

    @property
    def iqr_ms(self) -> float:
        """Inter-quartile range: the spread of the middle half of the repeats."""
        return self.q3_ms - self.q1_ms


def unstable(median: Optional[float], q1: Optional[float], q3: Optional[float]) -> bool:
    """Whether a spread is wider than its median (IQR = q3 - q1 > median): the number is noise.

    False where any of the three is unknown (None), so stored results without quartiles pass.
    """
    if median is None or q1 is None or q3 is None:
        return False
    return (q3 - q1) > median


@dataclass(frozen=True)
class PairedTiming:
    """A call timed in adjacent pairs with a baseline: both timings and the per-pair ratios.

    ``ratio`` is the median of ``case_ms / baseline_ms`` over the pairs (each pair two adjacent
    calls), ``ratio_q1``/``ratio_q3`` its quartiles; all three are None when no pair had a
    positive baseline time.
    """

    case: Timing
    baseline: Timing
    ratio: Optional[float]
    ratio_q1: Optional[float]
    ratio_q3: Optional[float]

    @property
    def pairs(self) -> int:
        return self.case.repeats

    @property
    def ratio_iqr(self) -> Optional[float]:
        return None if self.ratio_q1 is None or self.ratio_q3 is None else self.ratio_q3 - self.ratio_q1

    @property
    def unstable(self) -> bool:
        """The case's times, or the paired ratios, spread wider than their median."""
        t = self.case
        return unstable(t.median_ms, t.q1_ms, t.q3_ms) or unstable(self.ratio, self.ratio_q1, self.ratio_q3)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on CPU and without CUDA)."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median and quartiles of per-repeat times (the 'inclusive' quartile method)."""
    if not samples_ms:
        raise ValueError("summarize: expected at least one sample")
    if len(samples_ms) == 1:
        only = float(samples_ms[0])
        return Timing(only, only, only, 1)
    q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(median, q1, q3, len(samples_ms))


def _time_once_cpu(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _time_once_cuda(fn: Callable[[], Any], device: torch.device) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return float(start.elapsed_time(end))


def time_call(
    fn: Callable[[], Any],
    *,
    budget_s: float = 0.5,
    max_repeats: int = 100,
    min_repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then timed repeats.

    Repeats stop once ``budget_s`` seconds of timed calls have passed (but never before
    ``min_repeats``) or at ``max_repeats``, whichever comes first. ``device`` on CUDA switches
    to CUDA-event timing with synchronization. Returns median and quartiles in milliseconds.
    """
    _check_repeats("time_call", min_repeats, max_repeats)
    dev, once = _timer(device)
    for _ in range(warmup):
        fn()
    synchronize(dev)
    samples: list[float] = []
    spent_s = 0.0
    while len(samples) < max_repeats and (len(samples) < min_repeats or spent_s < budget_s):
        ms = once(fn)
        samples.append(ms)
        spent_s += ms / 1e3
    return summarize(samples)


def time_paired(
    fn: Callable[[], Any],
    baseline: Callable[[], Any],
    *,
    budget_s: float = 0.5,
    max_repeats: int = 100,
    min_repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> PairedTiming:
    """Time ``fn()`` against ``baseline()`` in adjacent pairs; the ratio is the median of the pairs'.

    ``warmup`` untimed calls of each (``fn`` then ``baseline``), then timed pairs whose order
    alternates: ``fn, baseline`` then ``baseline, fn`` (A B B A A B ...), so neither call always
    runs second, in the cache state the other leaves. Each pair gives ``fn_ms / baseline_ms``;
    a slow drift of the machine (other work starting or stopping) slows both calls of a pair alike
    and cancels in that ratio, where it would not between two separately timed runs.

    Repeats count pairs, with :func:`time_call`'s rules: stop once ``budget_s`` seconds of timed
    calls (both of each pair) have passed, never before ``min_repeats`` pairs, at ``max_repeats``
    pairs at most. ``device`` on CUDA times each call with CUDA events and synchronization.
    """
    _check_repeats("time_paired", min_repeats, max_repeats)
    dev, once = _timer(device)
    for _ in range(warmup):
        fn()
        baseline()
    synchronize(dev)
    case_ms: list[float] = []
    base_ms: list[float] = []
    spent_s = 0.0
    while len(case_ms) < max_repeats and (len(case_ms) < min_repeats or spent_s < budget_s):
        if len(case_ms) % 2 == 0:
            a = once(fn)
            b = once(baseline)
        else:
            b = once(baseline)
            a = once(fn)
        case_ms.append(a)
        base_ms.append(b)
        spent_s += (a + b) / 1e3
    ratios = [a / b for a, b in zip(case_ms, base_ms) if b > 0]
    if ratios:
        r = summarize(ratios)
        return PairedTiming(summarize(case_ms), summarize(base_ms), r.median_ms, r.q1_ms, r.q3_ms)
    return PairedTiming(summarize(case_ms), summarize(base_ms), None, None, None)


def _check_repeats(name: str, min_repeats: int, max_repeats: int) -> None:
    if max_repeats < 1 or min_repeats < 1:
        raise ValueError(f"{name}: repeats must be >= 1, got min {min_repeats}, max {max_repeats}")


def _timer(device: torch.device | str | None) -> tuple[Optional[torch.device], Callable[[Callable[[], Any]], float]]:
    """The device and how one call is timed on it (CUDA events, else ``perf_counter``)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return dev, lambda fn: _time_once_cuda(fn, dev)
    return dev, _time_once_cpu
