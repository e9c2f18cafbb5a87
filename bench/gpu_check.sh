#!/usr/bin/env bash
# The GPU check in one call, for a GPU machine (bench/gpu_check.py says what it runs, with each
# stage's time budget): build the native module for sm_90a, the GPU parity tests, one
# compute-sanitizer memcheck pass, the check benchmarks and the backend="auto" table. It writes
# two files to $OUT (default bench/results/gpu-check/): summary.md and gpu_check.tar.gz, which
# holds everything else. Run it with the Python that has PyTorch (the GPU machine's own, or
# $PYTHON); nothing is installed from the network.
#
#   bash bench/gpu_check.sh              # on the GPU machine (its runner sets $OUT)
#   bash bench/gpu_check.sh --dry-run    # any machine: every stage's plumbing, in a minute
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
      py=$candidate
      break
    fi
  done
fi
if [ -z "$py" ]; then
  echo "gpu_check: no Python with PyTorch found (set PYTHON)" >&2
  exit 2
fi
exec "$py" -m bench.gpu_check "$@"
