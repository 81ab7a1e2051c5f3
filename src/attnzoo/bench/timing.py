"""Wall-clock timing of one call: warm-up, then repeats until a time budget or a repeat cap.

Each repeat is timed on its own, so the result carries a spread and not only a mean: the
median (robust to the odd slow repeat a busy machine produces) and the inter-quartile range
(IQR = q3 - q1). On CUDA each repeat is bracketed by CUDA events and the device is
synchronized before reading them; on CPU ``time.perf_counter`` is exact enough.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["Timing", "time_call", "summarize", "synchronize"]


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
    if max_repeats < 1 or min_repeats < 1:
        raise ValueError(f"time_call: repeats must be >= 1, got min {min_repeats}, max {max_repeats}")
    dev = torch.device(device) if device is not None else None
    on_cuda = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    synchronize(dev)
    samples: list[float] = []
    spent_s = 0.0
    while len(samples) < max_repeats and (len(samples) < min_repeats or spent_s < budget_s):
        ms = _time_once_cuda(fn, dev) if on_cuda else _time_once_cpu(fn)
        samples.append(ms)
        spent_s += ms / 1e3
    return summarize(samples)
