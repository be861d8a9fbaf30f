#!/usr/bin/env bash
# GPU checks for the fused flash backend, run on the device machine from the repo root:
#   bash benchmarks/gpu_tests.sh [OUTDIR]
# 1. the kernel tests: tests/test_flash.py and tests/test_flash_documents.py (every shape family and packed
#    documents, output and all gradients vs the naive two-softmax reference in float64), tests/test_flash_decode.py,
#    tests/test_gemv.py, and tests/test_attention_naive.py (eager and sdpa vs the same reference); first launch
#    config of each kernel, DIFFLLAMA_FLASH_AUTOTUNE=0, to keep compile time short (the benchmark checks the tuned
#    configs against sdpa at its shapes); slow tests included (-m ''); verbose, with the per-case errors printed
#    (-rP: each passed test's output; no:logging keeps the compile debug logs out);
# 2. the rest of the suite on the GPU ("auto" resolves to flash there), unless SKIP_SUITE is set.
# JOBS (default 8) pytest-xdist workers share the GPU: the time goes into compiling kernels, on the CPU cores.
# The log goes to OUTDIR/gpu_tests.log (default $OUT, else benchmarks/). COMMIT names the code in the header
# (set it when running a snapshot without its own .git).
set -o pipefail
out="${1:-${OUT:-benchmarks}}"
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
kernel_tests="tests/test_flash.py tests/test_flash_documents.py tests/test_flash_decode.py tests/test_gemv.py
  tests/test_attention_naive.py"
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  DIFFLLAMA_FLASH_AUTOTUNE=0 python3 -m pytest $kernel_tests -m '' -v -rP -n "${JOBS:-8}" -p no:cacheprovider \
    -p no:logging 2>&1
  echo "== kernel tests exit $?"
  if [ -z "$SKIP_SUITE" ]; then
    python3 -m pytest tests -q -n "${JOBS:-8}" -p no:cacheprovider $(printf -- '--ignore %s ' $kernel_tests) 2>&1 \
      | tail -40
    echo "== rest of suite exit $?"
  fi
} 2>&1 | tee "$out/gpu_tests.log"
