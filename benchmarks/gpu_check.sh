#!/usr/bin/env bash
# The GPU checks of issue 12 in one call, under 8 minutes on one H100:
#
#   benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT when set, else ./gpu_check_out)
#
# 1. the machine: nvidia-smi, torch / CUDA / Triton versions, the device;
# 2. the CUDA conformance cases of the FlexAttention backends (tests/conformance, tests/unit/test_flex.py):
#    forward of every flex backend x pattern at fixed shapes ("compiled"), then their backward with the
#    LSE's gradient, and 2D grids with key padding;
# 3. the CUDA efficiency grid (`python -m attnzoo bench efficiency --device cuda`, bfloat16, forward):
#    1D sequences N = 4096, 16384 (softmax sdpa/flex/tiled vs sliding_window, per_head_patterns; noncausal
#    and causal) and a 128x128 grid (softmax vs neighborhood, window, grid, halo, axial), then a short
#    train (forward + backward) run; figures in summary.md (benchmarks/gpu_check_summary.py): softmax flex
#    against SDPA/flash (target >= 0.9x) and each local mechanism against dense SDPA (target: faster);
# 4. with the time left: the flex bfloat16 cases and the rest of the CUDA conformance suite (every other
#    backend on CUDA, HYPOTHESIS_PROFILE=quick: 3 examples each).
#
# Each phase runs under `timeout` (caps below, and never past GPU_CHECK_BUDGET_S in all); its full
# output is in OUT_DIR/<phase>.log, the last lines are printed. OUT_DIR also gets bench.sqlite (the
# results database: `attnzoo report --db`), summary.md / summary.json and status.txt.
#
# Without CUDA (this CI, a CPU machine) nothing runs: it prints "gpu_check: SKIPPED: no CUDA ..." and
# exits 0.
#
# Exit status: 0 every phase ran and passed (or no CUDA: skipped); 1 a phase failed (a test, a benchmark
# command, or FlexAttention ran uncompiled); 2 nothing failed but a phase was cut short or not started
# for lack of time (its results are partial); 3 python, torch or attnzoo cannot be imported.
#
# Environment: PYTHON (the interpreter; default .venv/bin/python when present, else python3),
# GPU_CHECK_BUDGET_S (seconds for everything, default 450).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python || true)"
fi
if [[ -z "$PY" ]]; then
  echo "gpu_check: no python found (set PYTHON)" | tee "$OUT_DIR/status.txt"
  exit 3
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export COLUMNS="${COLUMNS:-160}"  # rich's tables in the logs, not cut at 80 columns

BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$SECONDS
DB="$OUT_DIR/bench.sqlite"
STATUS="$OUT_DIR/status.txt"
FAILED=0
PARTIAL=0
: > "$STATUS"

note() { echo "$1" | tee -a "$STATUS"; }

# ---- 1. the machine --------------------------------------------------------------------------
echo "=== machine ==="
if command -v nvidia-smi > /dev/null 2>&1; then
  timeout 20 nvidia-smi 2>&1 | tee "$OUT_DIR/nvidia-smi.txt" || true
else
  echo "nvidia-smi: not found"
fi
set +e
"$PY" - > "$OUT_DIR/torch.txt" 2>&1 <<'EOF'
import platform
import sys

try:
    import torch
except Exception as err:  # noqa: BLE001
    print(f"torch cannot be imported: {err!r}")
    sys.exit(3)
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception:  # noqa: BLE001
    print("triton: not importable")
try:
    import attnzoo
    print(f"attnzoo {attnzoo.__version__} from {attnzoo.__file__}")
except Exception as err:  # noqa: BLE001
    print(f"attnzoo cannot be imported: {err!r}")
    sys.exit(3)
if not torch.cuda.is_available():
    print(f"torch.cuda.is_available() is False (torch {torch.__version__})")
    sys.exit(4)
i = torch.cuda.current_device()
p = torch.cuda.get_device_properties(i)
print(f"device {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
print(f"matmul fp32 precision: {torch.backends.cuda.matmul.fp32_precision}")
EOF
rc=$?
set -e
cat "$OUT_DIR/torch.txt"
if [[ $rc -eq 4 ]]; then
  note "gpu_check: SKIPPED: no CUDA device ($(tail -n 1 "$OUT_DIR/torch.txt")); nothing was run (exit 0)"
  exit 0
elif [[ $rc -ne 0 ]]; then
  note "gpu_check: cannot run: $(tail -n 1 "$OUT_DIR/torch.txt") (python: $PY)"
  exit 3
fi

# ---- the phase runner ------------------------------------------------------------------------
# run_phase NAME CAP_S COMMAND...: the command under timeout (its cap, and never past the budget less
# 30 s for the figures), output to NAME.log, the last lines printed, the outcome in status.txt.
run_phase() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 30))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    note "$name: NOT RUN (the ${BUDGET} s budget is spent)"
    PARTIAL=1
    return 0
  fi
  echo
  echo "=== $name (at most ${limit} s) ==="
  local t0=$SECONDS rc
  set +e
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  set -e
  tail -n 12 "$OUT_DIR/$name.log"
  local took=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    note "$name: ok (${took} s)"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    note "$name: CUT at ${limit} s (partial; see $name.log)"
    PARTIAL=1
  else
    note "$name: FAILED (exit $rc, ${took} s; see $name.log)"
    FAILED=1
  fi
}

PYTEST=("$PY" -m pytest -v -p no:cacheprovider -m "gpu or not slow")
BENCH=("$PY" -m attnzoo bench efficiency --device cuda --dtype bfloat16 --include-compiled --budget 0.1 --max-repeats 10 --db "$DB")

# ---- 2. flex conformance on CUDA -------------------------------------------------------------
run_phase flex_forward 90 env HYPOTHESIS_PROFILE=quick "${PYTEST[@]}" tests/conformance/test_conformance.py \
  -k "cuda and test_compiled_backends and not gradients and not all_patterns"
run_phase flex_backward 110 env HYPOTHESIS_PROFILE=quick "${PYTEST[@]}" tests/conformance/test_conformance.py tests/unit/test_flex.py \
  -k "cuda and (test_compiled_backends_gradients or test_flex_on_grids)"

# ---- 3. the efficiency grid on CUDA ----------------------------------------------------------
run_phase bench_sequences 100 "${BENCH[@]}" --lengths 4096 16384 --patterns noncausal_self causal_self \
  --mechanisms softmax sliding_window per_head_patterns
run_phase bench_grid 70 "${BENCH[@]}" --spatial 128x128 --patterns noncausal_self \
  --mechanisms softmax neighborhood window grid halo axial
run_phase bench_train 45 "${BENCH[@]}" --mode train --lengths 4096 --patterns causal_self \
  --mechanisms softmax sliding_window --backends sdpa flex tiled

# ---- 4. with the time left: flex in bfloat16, then the rest of the CUDA suite ----------------
run_phase flex_bfloat16 60 env HYPOTHESIS_PROFILE=quick "${PYTEST[@]}" tests/conformance/test_conformance.py \
  -k "cuda and all_patterns and bfloat16"
run_phase suite_cuda 600 env HYPOTHESIS_PROFILE=quick "${PYTEST[@]}" tests/conformance \
  -k "cuda and not test_compiled_backends"

# ---- figures and verdict ---------------------------------------------------------------------
echo
echo "=== figures ==="
if [[ -f "$DB" ]]; then
  "$PY" benchmarks/gpu_check_summary.py "$DB" "$OUT_DIR" || note "summary: FAILED (benchmarks/gpu_check_summary.py)"
  timeout 15 "$PY" -m attnzoo report --db "$DB" --out "$OUT_DIR/report" --format md > "$OUT_DIR/report.log" 2>&1 \
    || echo "attnzoo report: failed (see report.log); summary.md has the figures"
else
  note "figures: no results database (the bench phases did not run)"
fi
# Past torch's recompile limit, dynamo runs flex_attention uncompiled (it materializes the scores):
# its one warning in any log means some result above is not FlexAttention's kernel.
if grep -l "flex_attention called without torch.compile" "$OUT_DIR"/*.log > /dev/null 2>&1; then
  note "flex: FAILED: FlexAttention ran uncompiled in $(grep -l "flex_attention called without torch.compile" "$OUT_DIR"/*.log | xargs -n1 basename | tr '\n' ' ')"
  FAILED=1
fi

echo
echo "=== status ==="
cat "$STATUS"
verdict="passed"
code=0
if ((FAILED)); then
  verdict="FAILED"
  code=1
elif ((PARTIAL)); then
  verdict="partial (a phase was cut or not run)"
  code=2
fi
echo "gpu_check: $verdict in $((SECONDS - START)) s; results in $OUT_DIR"
exit $code
