"""Building and loading the C++ CPU kernels of ``kernels/csrc`` (one extension per source file).

Each kernel is built on first use with :mod:`torch.utils.cpp_extension` (a C++ compiler and
ninja; about a minute once) and cached per machine: the build's name carries the source's hash
and the CPU's flags (the build uses ``-march=native``), so a cache shared between different
CPUs never loads a foreign binary. ``ATTNZOO_NATIVE=0`` disables every native kernel; a failed
build warns once and the caller falls back to its PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

__all__ = ["load_kernel", "native_enabled"]

_log = logging.getLogger("attnzoo")

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-fno-math-errno"]
#: at::parallel_for is a serial loop without OpenMP; a compiler without it (Apple clang) still
#: gets the kernels, on one thread.
OPENMP = ["-fopenmp"]


def native_enabled() -> bool:
    return os.environ.get("ATTNZOO_NATIVE", "1") != "0"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build_name(stem: str, source: Path, flags: list[str]) -> str:
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    digest = hashlib.sha1(source.read_bytes() + headers + " ".join(flags).encode() + _cpu_flags().encode()).hexdigest()[:12]
    return f"attnzoo_{stem}_{digest}"


def _cache_root() -> Path:
    root = os.environ.get("ATTNZOO_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnzoo"


def _build(stem: str, what: str, openmp: bool) -> Any:
    from torch.utils.cpp_extension import load

    source = CSRC / f"{stem}.cpp"
    flags = CFLAGS + (OPENMP if openmp else [])
    name = _build_name(stem, source, flags)
    build_dir = _cache_root() / name
    if not (build_dir / f"{name}.so").exists():
        _log.warning("attnzoo: building the native %s kernel for this CPU in %s (once, about a minute)", what, build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=OPENMP if openmp else [], build_directory=str(build_dir), verbose=False)


@functools.lru_cache(maxsize=None)
def load_kernel(stem: str, what: str) -> Optional[Any]:
    """The compiled module of ``csrc/<stem>.cpp``, or None (disabled, or no toolchain: a warning
    says why). ``what`` names the kernel in the messages."""
    if not native_enabled():
        return None
    try:
        return _build(stem, what, openmp=True)
    except Exception as with_openmp:  # no OpenMP (Apple clang), no compiler, no ninja, a failed build
        try:
            module = _build(stem, what, openmp=False)
        except Exception as exc:
            warnings.warn(f"attnzoo: the native {what} kernel could not be built ({exc}); using the PyTorch path", stacklevel=3)
            return None
        warnings.warn(f"attnzoo: the native {what} kernel was built without OpenMP ({with_openmp}); it runs on one thread", stacklevel=3)
        return module
