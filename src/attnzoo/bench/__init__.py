"""Benchmarks: every registered mechanism measured the same way, results in SQLite, a report.

* :mod:`.efficiency` (catalog B1): time and peak memory of each mechanism x backend x CAB
  pattern x length against ``softmax``/``sdpa``; :mod:`.timing` (warm-up, repeats under a
  budget, median and IQR, CUDA events; calls paired with the baseline's for the ratios) and :mod:`.memory` (allocator statistics on CUDA, the RSS
  high-water mark on CPU) measure one case;
* :mod:`.mqar` (B2): Zoology's multi-query associative recall, a 2-layer model per mechanism;
* :mod:`.error` (B6): error of each mechanism against exact softmax, on random inputs and on
  q, k, v captured from all-MiniLM-L6-v2 (:mod:`.minilm`, the model rebuilt on attnzoo);
* :mod:`.results`: the SQLite store every runner writes, one transaction per case;
* :mod:`.report` and :mod:`.fits`: Markdown, PNG plots and HTML from the store, CAB's
  efficiency lengths;
* :mod:`.machine`: what the numbers were measured on.

The runners return data and never print; only ``attnzoo.cli`` talks to the terminal.
"""

from .efficiency import BASELINE, Case, EfficiencyConfig, Row, plan_cases, quick_config, run_efficiency
from .error import ErrorConfig, ErrorRow, run_error
from .fits import efficiency_length
from .machine import machine_info
from .memory import peak_memory
from .mqar import MQARConfig, multiquery_ar, run_mqar
from .report import readme_section, write_report
from .results import Result, ResultStore
from .timing import PairedTiming, Timing, time_call, time_paired

__all__ = [
    "BASELINE",
    "Case",
    "EfficiencyConfig",
    "ErrorConfig",
    "ErrorRow",
    "MQARConfig",
    "PairedTiming",
    "Result",
    "ResultStore",
    "Row",
    "Timing",
    "efficiency_length",
    "machine_info",
    "multiquery_ar",
    "peak_memory",
    "plan_cases",
    "quick_config",
    "readme_section",
    "run_efficiency",
    "run_error",
    "run_mqar",
    "time_call",
    "time_paired",
    "write_report",
]
