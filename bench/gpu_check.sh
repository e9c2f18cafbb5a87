#!/usr/bin/env bash
# On a GPU machine, in one call: build the native module, run the whole test suite (the GPU tests
# included), run the native kernel's GPU tests under compute-sanitizer, then the benchmark suite
# (python -m bench --full, or the arguments given, e.g. --only polar). Logs, a summary and the
# benchmark results go to $OUT (default bench/results/gpu-check/); copy $OUT/bench/* to
# bench/results/<device>/ to commit them. Exits non-zero if any step fails.
#
#   bash bench/gpu_check.sh [bench arguments]     # e.g. through the device runner, which sets $OUT
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  nvcc --version 2>&1 | tail -n 2 | head -n 1 | sed 's/^/nvcc: /'
} | tee "$OUT/env.txt"

if ! source .ci/setup >"$OUT/setup.log" 2>&1; then
  echo "setup failed:"; tail -n 40 "$OUT/setup.log"; exit 1
fi
"$SCION_PY" - <<'PY' | tee -a "$OUT/env.txt"
import torch, scion_kernels as s
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}); triton: {tv}")
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
print(f"native module: {s.native_available()} {s._native.native_import_error() or ''}")
PY

echo "== pytest (all tests; GPU tests must run, not skip)"
"$SCION_PY" -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if command -v compute-sanitizer >/dev/null 2>&1; then
  echo "== compute-sanitizer (memcheck) on the native kernel's GPU tests"
  compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$SCION_PY" -m pytest -q -m gpu tests/test_native.py 2>&1 | tail -n 20 | tee "$OUT/sanitizer.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer ($tool) on the native Newton–Schulz GPU tests"
    compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$SCION_PY" -m pytest -q -k "gpu and not optimizer" tests/test_native_ns.py 2>&1 \
      | tail -n 20 | tee -a "$OUT/sanitizer.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi

echo "== sm_90a compile report (this machine's Triton)"
"$SCION_PY" -m bench.compile_report --out "$OUT/compile_report.json" 2>&1 | tee "$OUT/compile_report.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks"
bench_args=("$@")
[ ${#bench_args[@]} -gt 0 ] || bench_args=(--full)
"$SCION_PY" -m bench "${bench_args[@]}" --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== backend=\"auto\" table from these timings (copy $OUT/_backend_table.py to scion_kernels/)"
if ls "$OUT"/bench/*.json >/dev/null 2>&1; then
  "$SCION_PY" -m bench.choose_backends "$OUT"/bench/*.json 2>&1 | tee "$OUT/choose_backends.log"
  cp scion_kernels/_backend_table.py "$OUT/_backend_table.py"
fi

echo "gpu_check: $([ $status -eq 0 ] && echo ok || echo FAILED)" | tee -a "$OUT/env.txt"
exit $status
