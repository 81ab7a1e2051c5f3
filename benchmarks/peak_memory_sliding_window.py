"""Peak extra memory and time of sliding_window (causal, left=256) at N=65536, one backend per process.

Usage: python benchmarks/peak_memory_sliding_window.py {band|tiled} {forward|train}
Issue 3's memory target: peak RSS growth <= 2 x the bytes of q, k, v and the output.
"""

import resource
import sys
import time

import torch

import attnzoo

B, H, N, D = 1, 8, 65536, 64


def main(backend: str, mode: str) -> None:
    q, k, v = (torch.randn(B, H, N, D, requires_grad=(mode == "train")) for _ in range(3))
    io_bytes = 4 * q.numel() * q.element_size()  # q, k, v and the output
    sw = attnzoo.get("sliding_window")

    def run():
        out = sw(q, k, v, window=(256, 0), causal=True, backend=backend)
        if mode == "train":
            out.backward(torch.ones_like(out))

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(
        f"{backend} {mode} N={N}: median {sorted(times)[1] * 1e3:.0f} ms (first {first * 1e3:.0f}); "
        f"peak RSS growth {extra / 2**20:.0f} MiB = {extra / io_bytes:.2f} x bytes(q,k,v,out) ({io_bytes / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
