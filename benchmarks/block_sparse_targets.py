"""Issue 12's targets for the block-sparse CPU engine, measured in one run against dense SDPA.

Usage: python benchmarks/block_sparse_targets.py [--quick] [--threads T] [--cases a,b,...]

For each case: forward and forward+backward time of the dispatched backend (and of the others
worth comparing), the *ideal* (dense SDPA's time on the same machine x the fraction of
(query, key) pairs the pattern allows), the ratio to it, and the useful GFLOP/s
(4 * B * H * allowed pairs * D forward; x 3.5 for forward+backward, FlashAttention's convention)
next to dense SDPA's own rate. Dense SDPA is timed at N = 16384 (1D) and at each case's own N
up to 16384; above that its time is scaled by (N / 16384)^2 (its FLOPs grow exactly so): a
65536-token dense run takes about a minute per repeat here. Peak extra memory of the fused
forward at N = 65536 (RSS high-water mark, attnzoo.bench.memory) against bytes(q, k, v, out).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import masks
from attnzoo.bench.memory import peak_memory
from attnzoo.kernels import block_sparse
from attnzoo.kernels.block_sparse import SparsePlan, block_sparse_attention

B, H, D = 1, 8, 64


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def train(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> Callable[[], None]:
    leaves = [t.detach().requires_grad_(True) for t in tensors]

    def step() -> None:
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    return step


_dense_cache: dict[int, tuple[float, float]] = {}


def dense_ms(n: int, repeats: int) -> tuple[float, float]:
    """Dense SDPA forward and forward+backward ms at N = n (scaled from 16384 above it)."""
    measured = min(n, 16384)
    if measured not in _dense_cache:
        q, k, v = (torch.randn(B, H, measured, D) for _ in range(3))
        fwd = best_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
        both = best_ms(train(F.scaled_dot_product_attention, q, k, v), max(1, repeats - 1))
        _dense_cache[measured] = (fwd, both)
    fwd, both = _dense_cache[measured]
    scale = (n / measured) ** 2
    return fwd * scale, both * scale


def report(name: str, n_tokens: int, pairs: int, timings: dict[str, tuple[float, float]], repeats: int) -> None:
    dense_fwd, dense_both = dense_ms(n_tokens, repeats)
    fraction = pairs / (B * H * n_tokens * n_tokens)
    flops = 4 * pairs * D
    dense_rate = 4 * B * H * n_tokens**2 * D / dense_fwd / 1e6
    print(f"\n{name}: N={n_tokens}, allowed pairs {fraction:.4%} of dense; dense SDPA {dense_fwd:.0f} / {dense_both:.0f} ms "
          f"(fwd / fwd+bwd, {dense_rate:.0f} GFLOP/s); ideal {dense_fwd * fraction:.1f} / {dense_both * fraction:.1f} ms")
    for backend, (fwd, both) in timings.items():
        print(f"  {backend:>9}: fwd {fwd:8.1f} ms = {fwd / (dense_fwd * fraction):5.2f}x ideal ({flops / fwd / 1e6:5.0f} useful GFLOP/s, "
              f"{flops / fwd / 1e6 / dense_rate:4.0%} of SDPA's rate) | fwd+bwd {both:8.1f} ms = {both / (dense_both * fraction):5.2f}x ideal")


def time_mechanism(mech: str, shape: tuple[int, ...], backends: list[str], repeats: int, **params) -> dict[str, tuple[float, float]]:
    q, k, v = (torch.randn(B, H, *shape, D) for _ in range(3))
    call = attnzoo.get(mech)
    out = {}
    for backend in backends:
        fn = functools.partial(call, backend=backend, **params)
        out[backend] = (best_ms(functools.partial(fn, q, k, v), repeats), best_ms(train(fn, q, k, v), max(1, repeats - 1)))
    return out


def sliding_window(n: int, repeats: int) -> None:
    plan = SparsePlan.from_mask(masks.sliding_window(256, 0), n, n)
    backends = ["fused", "band"] if n > 16384 else ["fused", "band", "tiled"]
    report("causal sliding window 256", n, plan.pairs() * B * H, time_mechanism("sliding_window", (n,), backends, repeats, window=(256, 0), causal=True), repeats)


def random_blocks(n: int, repeats: int) -> None:
    grid = torch.rand(n // 64, n // 64, generator=torch.Generator().manual_seed(0)) < 0.10
    plan = SparsePlan.from_block_mask(grid, n, n)
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    fn = lambda q, k, v: block_sparse_attention(q, k, v, plan)  # noqa: E731
    timings = {"fused": (best_ms(lambda: fn(q, k, v), repeats), best_ms(train(fn, q, k, v), max(1, repeats - 1)))}
    report(f"random block mask, density {plan.density:.3f}, block 64", n, plan.pairs() * B * H, timings, repeats)


def per_head(n: int, repeats: int) -> None:
    heads = [  # S2-Attention / MoA / LongGen style: 8 different heads
        dict(window=(64, 0)), dict(window=(256, 0)), dict(window=(512, 0), sinks=64), dict(window=(1024, 0)),
        dict(stride=(8, 0), window=(64, 0)), dict(stride=(8, 4), window=(64, 0)), dict(block=(512, 0)), dict(block=(512, 256), sinks=16),
    ]
    mask = attnzoo.functional.local.per_head._per_head_mask(torch.empty(1, 1, n, 1), torch.empty(1, 1, n, 1), head_patterns=heads, causal=True, causal_alignment="bottom_right")
    plan = SparsePlan.from_mask(mask, n, n, heads=H)
    report("per_head_patterns, 8 different heads (causal)", n, plan.pairs() * B, time_mechanism("per_head_patterns", (n,), ["sharded", "fused"], repeats, head_patterns=heads, causal=True), repeats)


def neighborhood(shape: tuple[int, ...], kernel: int, repeats: int) -> None:
    n = math.prod(shape)
    timings = time_mechanism("neighborhood", shape, ["gathered", "fused", "tiled"], repeats, kernel_size=kernel)
    report(f"neighborhood {'x'.join(map(str, shape))} kernel {kernel}", n, B * H * n * kernel ** len(shape), timings, repeats)


def dispatch_cases(n: int) -> list[tuple[str, tuple[int, ...], dict]]:
    """Fixed-pattern calls at densities near 10%, 25% and 45% of N x N (N = n tokens; 2D on a square grid)."""
    side = math.isqrt(n)
    cases = []
    for d in (0.10, 0.25, 0.45):
        kernel_2d = int(side * math.sqrt(d)) | 1  # odd
        cases += [
            ("sliding_window", (n,), dict(window=(int(d * n), 0), causal=True)),
            ("sliding_window", (n,), dict(window=int(d * n / 2))),
            ("sliding_window", (n,), dict(window=(int(d * n) - 64, 0), causal=True, sinks=64)),
            ("neighborhood", (n,), dict(kernel_size=int(d * n) | 1)),
            ("per_head_patterns", (n,), dict(head_patterns=[dict(window=(int(d * n * f), 0)) for f in (0.5, 1.0, 1.5, 1.0) * (H // 4)], causal=True)),
            ("neighborhood", (side, side), dict(kernel_size=kernel_2d)),
            ("window", (side, side), dict(window_size=max(2, int(side * math.sqrt(d))))),
            ("halo", (side, side), dict(block_size=max(2, int(side * math.sqrt(d) / 2)), halo_size=max(1, int(side * math.sqrt(d) / 4)))),
        ]
    cases += [("axial", (side, side), dict(axis=0)), ("grid", (side, side), dict(grid_size=max(2, side // 4)))]
    return cases


def dispatch_row(n: int, mech: str, shape: tuple[int, ...], params: dict, budget_s: float) -> tuple[float, float]:
    """Print one case's density, dispatched backend and paired ratios to dense SDPA; return (density, worst ratio)."""
    from attnzoo.bench.efficiency import _tapped
    from attnzoo.bench.timing import time_paired

    q, k, v = (torch.randn(B, H, *shape, D) for _ in range(3))
    call = attnzoo.get(mech)
    problem = call.describe(q, k, v)
    bound = call.bind(problem, params)
    density = _tapped(call, q, k, v, bound, stop=True).pairs / (B * H * n * n)
    backend = call.select(problem, bound).name
    qf, kf, vf = (x.flatten(2, -2) for x in (q, k, v))

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return call(q, k, v, **params)

    fwd = time_paired(lambda: run(q, k, v), lambda: F.scaled_dot_product_attention(qf, kf, vf), budget_s=budget_s)
    both = time_paired(train(run, q, k, v), train(F.scaled_dot_product_attention, qf, kf, vf), budget_s=budget_s)
    worst = max(fwd.ratio, both.ratio)
    flag = "  SLOWER" if density < 0.5 and worst > 1.0 else ""
    shown = ", ".join(f"{key}={val}" for key, val in params.items() if key != "head_patterns")
    print(f"  N={n:6d} {mech:>17} {shown:<42} density {density:6.1%} -> {backend:>8}: fwd {fwd.ratio:5.2f}x  fwd+bwd {both.ratio:5.2f}x{flag}")
    return density, worst


def dispatch(lengths: tuple[int, ...], budget_s: float) -> None:
    """Issue 12's dispatch rule, measured: every fixed pattern of density < 50% (of the N x N pairs)
    at N >= 1024 must run, as ``auto`` dispatches it, no slower than dense SDPA on the same shape
    (forward, and forward+backward). Ratios are paired (each call adjacent to its dense baseline)."""
    print("\ndispatch vs dense SDPA (ratio = auto / dense, paired medians; density = allowed pairs / N^2)")
    rows = [dispatch_row(n, mech, shape, params, budget_s) for n in lengths for mech, shape, params in dispatch_cases(n)]
    worst = max((ratio for density, ratio in rows if density < 0.5), default=0.0)
    print(f"worst ratio below 50% density: {worst:.2f}x dense SDPA")


def memory_65536() -> None:
    n = 65536
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    plan = SparsePlan.from_mask(masks.sliding_window(256, 0), n, n)
    block_sparse_attention(q, k, v, plan)  # built and warm
    extra, method = peak_memory(lambda: block_sparse_attention(q, k, v, plan))
    io = 4 * q.numel() * q.element_size()
    print(f"\npeak extra memory, fused forward, N={n}: {extra / 2**20:.0f} MiB = {extra / io:.2f}x bytes(q, k, v, out) ({io / 2**20:.0f} MiB) [{method}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 4096 and small grids only, 2 repeats")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", default="window,window64k,random,per_head,nbr2d,nbr3d,memory,dispatch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 3
    n = 4096 if args.quick else 16384
    print(f"kernel: {block_sparse.kernel_path()}; torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} H={H} D={D} float32")
    cases = args.cases.split(",")
    if "window" in cases:
        sliding_window(n, repeats)
    if "window64k" in cases and not args.quick:
        sliding_window(65536, 2)
    if "random" in cases:
        random_blocks(n, repeats)
    if "per_head" in cases:
        per_head(n, repeats)
    if "nbr2d" in cases:
        for kernel in (7, 13):
            neighborhood((64, 64) if args.quick else (128, 128), kernel, repeats)
    if "nbr3d" in cases:
        neighborhood((8, 16, 16) if args.quick else (16, 32, 32), 3, repeats)
    if "dispatch" in cases:
        dispatch((1024,) if args.quick else (1024, 4096), 0.3 if args.quick else 1.0)
    if "memory" in cases and not args.quick:
        memory_65536()


if __name__ == "__main__":
    main()
