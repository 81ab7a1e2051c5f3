"""Peak memory of one call, measured where the allocations really happen.

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what
  was allocated before the call (method ``cuda-max-allocated``): PyTorch's caching allocator
  counts every tensor the call creates.
* **CPU (Linux)**: the process's resident-set high-water mark (``VmHWM``), reset before the
  call by writing ``5`` to ``/proc/self/clear_refs``, minus the resident set before it (method
  ``rss-hwm``). The operating system sees every page the call touches, whatever allocated it
  (PyTorch, oneDNN scratch, a C++ extension). For that to hold, freed memory must go back to the
  OS and new tensors must come from fresh pages, not from glibc's free lists: during the
  measured call the mmap threshold is set to 64 KiB, so every tensor above that is its own
  mapping, counted while alive and returned when freed. Small allocations below it may be
  served from memory the process already holds and go uncounted; they are at most a few MiB.
  Afterwards the thresholds are set to glibc's steady state (32 MiB / 64 MiB), so timings taken
  later see the allocator as a long-running process does.
* Elsewhere: not measured (``None``, method ``unavailable``).

The figure is the extra memory of the call: its output, the temporaries alive at its peak and,
in training, the gradients, over the inputs that existed before it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path
from typing import Any, Callable, Optional

import torch

__all__ = ["peak_memory", "cpu_method_available"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MEASURE_MMAP = 64 << 10
_STEADY_MMAP, _STEADY_TRIM = 32 << 20, 64 << 20  # glibc's dynamic thresholds reach these
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{key} not in {_STATUS}")


def _reset_high_water_mark() -> None:
    _CLEAR_REFS.write_text("5")


def cpu_method_available() -> bool:
    """Whether this process can reset and read its RSS high-water mark (Linux >= 4.0, glibc)."""
    if _LIBC is None or not _STATUS.is_file():
        return False
    try:
        _reset_high_water_mark()
        _status_bytes("VmHWM:")
        return True
    except OSError:
        return False


def _cpu_peak(fn: Callable[[], Any]) -> int:
    assert _LIBC is not None
    _LIBC.mallopt(_M_MMAP_THRESHOLD, _MEASURE_MMAP)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, _MEASURE_MMAP)
    try:
        gc.collect()
        _LIBC.malloc_trim(0)
        _reset_high_water_mark()
        before = _status_bytes("VmRSS:")
        result = fn()
        peak = _status_bytes("VmHWM:")
        del result
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _STEADY_TRIM)
    return max(0, peak - before)


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - before)


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Optional[int], str]:
    """``(extra bytes at the peak of fn(), method)``; ``(None, "unavailable")`` where it cannot be seen.

    Example::

        >>> x = torch.randn(1, 8, 2048, 64)
        >>> extra, how = peak_memory(lambda: (x @ x.transpose(-1, -2)).softmax(-1) @ x)
        >>> how, extra >= 2 * 8 * 2048 * 2048 * 4          # the scores and their softmax
        ('rss-hwm', True)
    """
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return _cuda_peak(fn, dev), "cuda-max-allocated"
    if dev.type == "cpu" and cpu_method_available():
        return _cpu_peak(fn), "rss-hwm"
    return None, "unavailable"
