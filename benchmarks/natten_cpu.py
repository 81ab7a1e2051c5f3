"""NATTEN (CPU: its flex backend, eager) against attnzoo's gathered neighborhood, forward.

Usage: python benchmarks/natten_cpu.py "((64, 64), 7)" "((8, 16, 16), 3)"   (grid, kernel size)
Needs `pip install --no-build-isolation natten==0.21.7`. At 128x128 NATTEN ran out of 24 GiB.
B=1, H=8, D=64, fp32; median of 3 after a warm-up call.
"""

import ast
import sys
import time

import natten
import torch

import attnzoo


def median_ms(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def compare(shape, kernel):
    q, k, v = (torch.randn(1, 8, *shape, 64) for _ in range(3))
    heads_last = [x.movedim(1, -2).contiguous() for x in (q, k, v)]  # NATTEN's layout
    na = natten.na2d if len(shape) == 2 else natten.na3d if len(shape) == 3 else natten.na1d
    t_natten = median_ms(lambda: na(*heads_last, kernel_size=kernel))
    t_ours = median_ms(lambda: attnzoo.get("neighborhood")(q, k, v, kernel_size=kernel, backend="gathered"))
    print(f"{shape} kernel {kernel}: natten {t_natten:.1f} ms | attnzoo gathered {t_ours:.1f} ms", flush=True)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        compare(*ast.literal_eval(arg))
