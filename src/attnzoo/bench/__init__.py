"""Benchmarks: time every registered mechanism x backend side by side.

* :mod:`attnzoo.bench.timing`: warm-up, repeats under a time budget, median and IQR;
* :mod:`attnzoo.bench.efficiency`: forward time of each mechanism x backend x length against
  ``softmax``/``sdpa`` (``attnzoo bench`` renders it);
* :mod:`attnzoo.bench.machine`: what the numbers were measured on.

The runners return data and never print; only ``attnzoo.cli`` talks to the terminal.
"""

from .efficiency import BASELINE, Case, EfficiencyConfig, Row, plan_cases, run_efficiency
from .machine import machine_info
from .timing import Timing, time_call

__all__ = [
    "BASELINE",
    "Case",
    "EfficiencyConfig",
    "Row",
    "Timing",
    "machine_info",
    "plan_cases",
    "run_efficiency",
    "time_call",
]
