"""What a benchmark ran on: CPU model, cores, torch threads and versions, the device."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_model", "machine_info"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _load_average() -> str:
    """The 1-minute load average (other work on the machine makes timings noisy), or '?'."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "?"


def machine_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """Key facts about the machine, as text: cpu, cores, load, torch, threads, versions, device."""
    from .. import __version__

    dev = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count() or "?"),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "attnzoo": __version__,
        "python": platform.python_version(),
        "device": str(dev),
        "load": _load_average(),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info
