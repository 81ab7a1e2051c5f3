"""``benchmarks/gpu_check.sh``, the one-call GPU check, on a machine without CUDA: it parses, says
clearly that it skips and exits 0; its test selections still pick tests; its figures script reads
a results database.

``CUDA_VISIBLE_DEVICES=""`` hides any GPU, so this runs the no-CUDA path on every machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnzoo.bench.results import Result, ResultStore

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SUMMARY = ROOT / "benchmarks" / "gpu_check_summary.py"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update({"CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **extra})
    return env


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, capture_output=True)


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SCRIPT), str(out)], env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu_check: SKIPPED: no CUDA device" in result.stdout
    assert "nothing was run" in result.stdout
    assert "SKIPPED" in (out / "status.txt").read_text()
    assert not (out / "bench.sqlite").exists()  # no phase ran


def test_the_output_folder_defaults_to_OUT(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT)], env=_env(OUT=str(tmp_path / "from_env")), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "from_env" / "status.txt").exists()


def _selections() -> list[tuple[list[str], str]]:
    """(test paths, -k expression) of every pytest phase of the script."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    found = re.findall(r'"\$\{PYTEST\[@\]\}"((?:\s+tests/\S+)+)\s+-k\s+"([^"]+)"', text)
    return [(paths.split(), expr) for paths, expr in found]


def test_every_pytest_phase_selects_tests():
    """A renamed test must not leave a phase selecting nothing (pytest would exit 5 on the GPU)."""
    selections = _selections()
    assert len(selections) >= 4
    for paths, expr in selections:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu or not slow", "-k", expr, *paths],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        ids = [line for line in result.stdout.splitlines() if "::" in line]
        assert ids and all(line.endswith("-cuda]") for line in ids), f"-k {expr!r} on {paths}: {result.stdout[-2000:]}"


def test_figures_from_a_results_database(tmp_path):
    db = tmp_path / "bench.sqlite"
    shapes = dict(kind="efficiency", mode="forward", dtype="bfloat16", device="cuda", batch=1, heads=8, kv_heads=8, q_len=4096, kv_len=4096, head_dim=64)
    paired = {"ratio": 0.2, "baseline_ms": 2.5, "useful_gflops": 123.0}  # timed in pairs with the baseline: its ratio is used
    rows = [("causal_self", "softmax", "sdpa", 2.0, "", {}), ("causal_self", "softmax", "flex", 2.1, "", {}), ("causal_self", "softmax", "auto", 2.0, "", {}),
            ("causal_self", "softmax", "reference", None, "materializes", {}), ("causal_self", "sliding_window", "flex", 0.5, "", {}),
            ("causal_self", "sliding_window", "tiled", 3.0, "", {}), ("causal_self", "per_head_patterns", "flex", None, "error: RuntimeError: boom", {}),
            ("noncausal_self", "softmax", "sdpa", 4.0, "", {}), ("noncausal_self", "sliding_window", "flex", 0.6, "", paired)]
    with ResultStore(db) as store:
        run = store.start_run("efficiency", {}, {})
        for i, (pattern, mech, backend, ms, note, metrics) in enumerate(rows):
            store.add(run, Result(mechanism=mech, backend=backend, case_key=f"case{i}", median_ms=ms, note=note, pattern=pattern, metrics=metrics, **shapes))
        store.finish_run(run)
    result = subprocess.run([sys.executable, str(SUMMARY), str(db), str(tmp_path / "figures")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "figures" / "summary.md").read_text()
    assert "| forward | causal_self | 4096 | bfloat16 | 2.000 | 2.100 | 0.95x | yes |" in md
    assert "| causal_self | 4096 | sliding_window | flex | 0.500 | 0.250 | 0.500 | 0.250 | yes |" in md  # no reference as the fastest
    assert "| noncausal_self | 4096 | sliding_window | flex | 0.600 | 0.200 | 0.600 | 0.200 | yes | 123, 123, - |" in md
    assert "per_head_patterns/flex causal_self forward N=4096: error: RuntimeError: boom" in md
    summary = json.loads((tmp_path / "figures" / "summary.json").read_text())
    assert {d["pattern"] for d in summary["dense"]} == {"causal_self", "noncausal_self"}


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python on a CUDA machine: the device probe succeeds, every phase returns at once
echo "$*" >> "$FAKE_LOG"
if [[ "$1" == "-" ]]; then cat > /dev/null; echo "device 0: a fake GPU"; exit 0; fi
case "$*" in
  *gpu_check_summary.py*) exec "$REAL_PYTHON" "$@" ;;
  *"$FAKE_FAIL"*) echo "boom"; exit 1 ;;
esac
echo "1 passed"
"""


def _fake_run(tmp_path, **env: str) -> tuple[subprocess.CompletedProcess, list[str], str]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    extra = {"PYTHON": str(fake), "FAKE_LOG": str(log), "REAL_PYTHON": sys.executable, "FAKE_FAIL": "no phase has this", **env}
    result = subprocess.run(["bash", str(SCRIPT), str(out)], env=_env(**extra), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return result, log.read_text().splitlines(), (out / "status.txt").read_text()


def test_with_cuda_every_phase_runs_in_order(tmp_path):
    result, calls, status = _fake_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    phases = [line.split(":")[0] for line in status.splitlines() if ": ok" in line]
    assert phases == ["flex_forward", "flex_backward", "bench_sequences", "bench_grid", "bench_train", "flex_bfloat16", "suite_cuda"]
    bench = [c for c in calls if "attnzoo bench efficiency" in c]
    assert len(bench) == 3 and all("--device cuda" in c and "--include-compiled" in c for c in bench)
    assert "gpu_check: passed" in result.stdout


def test_a_failing_phase_fails_the_check_and_the_rest_still_run(tmp_path):
    result, _, status = _fake_run(tmp_path, FAKE_FAIL="--spatial")
    assert result.returncode == 1, result.stdout
    assert "bench_grid: FAILED" in status and "suite_cuda: ok" in status


def test_phases_past_the_budget_are_not_run(tmp_path):
    result, calls, status = _fake_run(tmp_path, GPU_CHECK_BUDGET_S="30")
    assert result.returncode == 2, result.stdout
    assert status.count("NOT RUN") == 7 and not [c for c in calls if "pytest" in c or "bench" in c]
