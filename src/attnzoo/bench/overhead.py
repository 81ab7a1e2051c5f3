"""What attnzoo's dispatch costs over calling PyTorch SDPA directly.

A 3% difference is far below the run-to-run noise of a shared CPU, so the two calls are timed
as pairs, interleaved (A B B A ...), and compared pair by pair: the median of the paired
ratios and of the paired differences cancel slow drifts of the machine. The fixed cost of
validation and dispatch alone (``describe``, ``bind``, ``select``, the finite check) is
timed separately on inputs small enough that it dominates.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..registry import get

__all__ = ["Overhead", "dispatch_overhead"]


@dataclass(frozen=True)
class Overhead:
    length: int
    raw_ms: float  # median of the raw SDPA calls
    attnzoo_ms: float  # median of attnzoo.attention(q, k, v) (dispatch picks the backend)
    ratio: float  # median of the paired ratios attnzoo / raw
    ratio_q1: float
    ratio_q3: float
    extra_us: float  # median of the paired differences, microseconds
    dispatch_us: float  # validation + dispatch alone, microseconds
    backend: str  # what dispatch picked
    pairs: int


def _pairs(a: Callable[[], Any], b: Callable[[], Any], n: int) -> tuple[list[float], list[float]]:
    ta, tb = [], []
    for i in range(n):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, store in order:
            start = time.perf_counter()
            fn()
            store.append(time.perf_counter() - start)
    return ta, tb


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0],) * 3
    return q1, q2, q3


def dispatch_overhead(length: int = 1024, *, batch: int = 1, heads: int = 8, head_dim: int = 64, pairs: int = 60) -> Overhead:
    """Pairs of ``F.scaled_dot_product_attention`` and ``attnzoo.attention`` on the same CPU inputs."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))
    softmax = get("softmax")

    def raw() -> Any:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def lib() -> Any:
        return softmax(q, k, v)

    with torch.inference_mode():
        _pairs(raw, lib, 3)  # warm-up
        t_raw, t_lib = _pairs(raw, lib, pairs)
        ratios = [b / a for a, b in zip(t_raw, t_lib)]
        q1, med, q3 = _quartiles(ratios)
        extra = statistics.median(b - a for a, b in zip(t_raw, t_lib))
        tiny = [t[:, :, :16] for t in (q, k, v)]
        fixed = _fixed_cost(softmax, *tiny)
        chosen = softmax.select(*softmax.prepare(q, k, v, {})).name
    return Overhead(length, statistics.median(t_raw) * 1e3, statistics.median(t_lib) * 1e3, med, q1, q3, extra * 1e6, fixed, chosen, pairs)


def _fixed_cost(mech: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int = 2000) -> float:
    """Microseconds of what a call adds around its backend (``prepare``, ``select``, the finite check)."""
    out = mech(q, k, v)
    start = time.perf_counter()
    for _ in range(repeats):
        problem, bound = mech.prepare(q, k, v, {})
        mech.select(problem, bound)
        mech._check_output(out, q, k, v, bound)
    return (time.perf_counter() - start) / repeats * 1e6
