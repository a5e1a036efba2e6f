#!/usr/bin/env bash
# On a GPU machine: install the package, run the GPU tests, then the kernel and network benchmarks.
# Everything (log, JUnit XML, benchmark JSON) goes under $OUT (default bench/results/<date-time>).
# A failing test does not stop the benchmarks; the script exits non-zero if anything failed.
#
#   bench/gpu_check.sh
#   OUT=/tmp/run BENCH_ARGS="--batch 128 --no-compile" PYTHON=python3 bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/$(date +%Y%m%d-%H%M%S)}"
PYTHON="${PYTHON:-python3}"
read -r -a BENCH <<< "${BENCH_ARGS:-}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

failed=()
step() {  # step NAME COMMAND...: run it, remember NAME if it fails
  local name="$1"
  shift
  echo "== $(date +%T) $name: $*"
  if ! "$@"; then
    echo "!! $name failed"
    failed+=("$name")
  fi
}

echo "== $(date) on $(hostname), output in $OUT"
nvidia-smi || true
"$PYTHON" -m pip install -e . --no-deps --no-build-isolation
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

workers=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then workers=(-n 4); fi
# One kernel configuration per variant (no autotuning) keeps the tests' compile time down.
step tests env CURE_FAST_AUTOTUNE=0 "$PYTHON" -m pytest -q -p no:cacheprovider ${workers[@]+"${workers[@]}"} \
  -m gpu tests --junitxml "$OUT/tests.xml"
step bench_kernels "$PYTHON" bench/bench_kernels.py --json "$OUT/bench_kernels.json" ${BENCH[@]+"${BENCH[@]}"}
step bench_network "$PYTHON" bench/bench_network.py --json "$OUT/bench_network.json" ${BENCH[@]+"${BENCH[@]}"}

if ((${#failed[@]})); then
  echo "== FAILED: ${failed[*]}"
  exit 1
fi
echo "== all passed"
