#!/usr/bin/env bash
# On a GPU machine: build the package (CUDA extension included), run the GPU tests, then the
# benchmarks. bench/README.md describes every step, its budget and the procedure for a GPU run.
#
# Quick check (one command, under 9 minutes on one H100/H200 with 16 cores, build included):
#
#   bench/gpu_check.sh quick                      # build cuda_ops gpu_tests bench_network bench_kernels certify
#   bench/gpu_check.sh quick build cuda_ops       # rerun some of its steps (on a fresh machine: build first)
#   GPU_CHECK_DRY=1 bench/gpu_check.sh quick      # the same script on the CPU (CI rehearsal, < 3 minutes)
#
# Every step runs in its own process under its own time budget (SIGINT 5 or 10 s before it, so
# that pytest still writes its JUnit XML and the benchmarks keep the rows they measured; SIGKILL at
# the budget); a step whose budget exceeds what is left of the total is skipped. After every step,
# bench/gpu_summary.py rewrites $OUT/summary.json (device, versions, build seconds, pass / fail counts
# and first error lines per step, every benchmark figure, skipped steps); $OUT holds at most 8 files.
# GPU_CHECK_TOTAL (seconds, default 540; dry run 178) and GPU_CHECK_BUDGET_<step> override the budgets.
#
# Full run (hours of GPU time: every test, every benchmark at batch 128 and 512):
#
#   bench/gpu_check.sh                       # build tests kernels network propagate train certify
#   bench/gpu_check.sh build tests           # just build and test
#   OUT=/tmp/run BENCH_ARGS="--batch 128 --no-compile" PYTHON=python3 bench/gpu_check.sh kernels
#
# Steps: build (pip install -e ., the extension for TORCH_CUDA_ARCH_LIST, default the GPU's own), tests (the CUDA ops
# first, then every test marked gpu), kernels (bench/bench_kernels.py: per-layer triton / cuda /
# eager / compile / floor), network (bench/bench_network.py: the CNN7 step vs the natural one),
# propagate (bench/bench_propagate.py), train (bench/train_throughput.py), certify
# (bench/certify_time.py: fp64, then sound fp32 up to CROWN). STEP_TIMEOUT (seconds, default 1800) bounds each step.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
if [[ "${1:-}" == quick ]]; then
  shift
  exec bash bench/gpu_quick.sh "$@"
fi
if [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; then
  echo "GPU_CHECK_DRY=1 rehearses the quick check only: bench/gpu_check.sh quick" >&2
  exit 2
fi
OUT="${OUT:-bench/results/$(date +%Y%m%d-%H%M%S)}"
PYTHON="${PYTHON:-python3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-1800}"
read -r -a BENCH <<< "${BENCH_ARGS:-}"
ALL_STEPS=(build tests kernels network propagate train certify)
STEPS=("$@")
((${#STEPS[@]})) || STEPS=("${ALL_STEPS[@]}")
for s in "${STEPS[@]}"; do
  [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "unknown step '$s'; steps: quick, ${ALL_STEPS[*]} (--help)" >&2; exit 2; }
done
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

failed=()
step() {  # step NAME COMMAND...: run it under the step timeout, remember NAME if it fails
  local name="$1"
  shift
  echo "== $(date +%T) $name: $*"
  if ! timeout "$STEP_TIMEOUT" "$@"; then
    echo "!! $name failed"
    failed+=("$name")
  fi
}

wanted() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

echo "== $(date) on $(hostname), steps: ${STEPS[*]}, output in $OUT"
nvidia-smi || true
if wanted build; then
  # The extension for this machine's GPU only (half the build time of the default sm_80 + sm_90).
  arch="${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)}"
  step build env MAX_JOBS="${MAX_JOBS:-$(nproc)}" CURE_FAST_BUILD_CUDA=1 ${arch:+TORCH_CUDA_ARCH_LIST="$arch"} \
    "$PYTHON" -m pip install -e . --no-deps --no-build-isolation -q
fi
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || true
"$PYTHON" -c "from cure_fast import cuda; cuda.load(); print('cure_fast._C loaded')" || true

workers=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then workers=(-n 4); fi
# One kernel configuration per variant (no autotuning) keeps the tests' compile time down.
pytest_gpu=(env CURE_FAST_AUTOTUNE=0 "$PYTHON" -m pytest -q -p no:cacheprovider)
if wanted tests; then
  step cuda_ops "${pytest_gpu[@]}" -x tests/test_cuda_ops.py --junitxml "$OUT/cuda_ops.xml"
  step tests "${pytest_gpu[@]}" ${workers[@]+"${workers[@]}"} -m gpu tests --ignore tests/test_cuda_ops.py \
    --junitxml "$OUT/tests.xml"
fi
if wanted kernels; then
  step bench_kernels "$PYTHON" bench/bench_kernels.py --json "$OUT/bench_kernels.json" ${BENCH[@]+"${BENCH[@]}"}
fi
if wanted network; then
  step bench_network "$PYTHON" bench/bench_network.py --json "$OUT/bench_network.json" ${BENCH[@]+"${BENCH[@]}"}
fi
if wanted propagate; then
  for backend in torch triton cuda auto; do
    step "propagate_$backend" "$PYTHON" bench/bench_propagate.py --device cuda --batch 128 --backend "$backend" \
      --json "$OUT/bench_propagate_$backend.json"
  done
fi
if wanted train; then
  step train_throughput "$PYTHON" bench/train_throughput.py --device cuda --json "$OUT/train_throughput.json"
fi
if wanted certify; then
  step certify_time "$PYTHON" bench/certify_time.py --device cuda --images 8 --json "$OUT/certify_time.json"
  step certify_time_fp32 "$PYTHON" bench/certify_time.py --device cuda --images 8 --sound fp32 \
    --methods ibp,crown-ibp,crown --json "$OUT/certify_time_fp32.json"
fi

if ((${#failed[@]})); then
  echo "== FAILED: ${failed[*]}"
  exit 1
fi
echo "== all passed"
