"""What a benchmark ran on: CPU model, cores, torch threads and versions, the device."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

__all__ = ["cpu_model", "git_revision", "machine_info"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@lru_cache(maxsize=1)
def git_revision() -> Optional[str]:
    """The git commit of the attnzoo source being run (``+dirty`` with local changes), or None
    when it is not a git checkout (an installed wheel)."""
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _load_average() -> str:
    """The 1-minute load average (other work on the machine makes timings noisy), or '?'."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "?"


def machine_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """Key facts about the machine, as text: cpu, cores, load, torch, threads, versions, git commit, device."""
    from .. import __version__

    dev = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count() or "?"),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "attnzoo": __version__,
        "python": platform.python_version(),
        "git": git_revision() or "unknown",
        "device": str(dev),
        "load": _load_average(),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info
