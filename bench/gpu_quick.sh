#!/usr/bin/env bash
# The quick GPU check, run as `bench/gpu_check.sh quick [STEP...]` (see bench/README.md): build the
# CUDA extension for this machine's GPU, run the CUDA op tests and a sample of the other GPU tests,
# benchmark the CNN7 step and its layers at batch 128, time certification per image, and write
# $OUT/summary.json. Under 9 minutes on one H100/H200 with 16 cores: every step has a budget, the
# run a total; a step that would overrun the total is skipped and the summary says so.
#
# GPU_CHECK_DRY=1: the same steps on the CPU, for CI (no CUDA build, the Triton interpreter, the
# benchmarks' --smoke shapes, one test per test function), in under 3 minutes on 2 cores.
#
# Environment: OUT (default bench/results/<date-time>-quick), PYTHON (default python3),
# GPU_CHECK_TOTAL (total budget, seconds; default 540, dry run 178), GPU_CHECK_BUDGET_<step> (a step's budget, seconds),
# TORCH_CUDA_ARCH_LIST (default: the GPU's compute capability), MAX_JOBS (default: all cores).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY:-0}"
OUT="${OUT:-bench/results/$(date +%Y%m%d-%H%M%S)-quick}"
PYTHON="${PYTHON:-python3}"
ALL_STEPS=(build cuda_ops gpu_tests bench_network bench_kernels certify)
STEPS=("$@")
((${#STEPS[@]})) || STEPS=("${ALL_STEPS[@]}")
for s in "${STEPS[@]}"; do
  [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "unknown step '$s'; steps: ${ALL_STEPS[*]}" >&2; exit 2; }
done

# Budgets in seconds. GPU: caps, not measurements (no GPU run yet), to be tuned from the first run's
# per-step seconds; the build takes about its longest translation unit on 16 cores (54 s in all on 2).
# Their sum stays under the total (the probes and summaries take the rest), and the total under
# 9 minutes. Dry run: about twice what each step takes on 2 busy cores, the total under 3 minutes.
declare -A BUDGET
if [[ "$DRY" == 1 ]]; then
  TOTAL="${GPU_CHECK_TOTAL:-178}"
  BUDGET=([build]=0 [cuda_ops]=25 [gpu_tests]=40 [bench_network]=35 [bench_kernels]=30 [certify]=30)
else
  TOTAL="${GPU_CHECK_TOTAL:-540}"
  BUDGET=([build]=100 [cuda_ops]=75 [gpu_tests]=150 [bench_network]=90 [bench_kernels]=50 [certify]=60)
fi
for s in "${ALL_STEPS[@]}"; do
  var="GPU_CHECK_BUDGET_$s"
  [[ -n "${!var:-}" ]] && BUDGET[$s]="${!var}"
done
BUDGET[install]=40  # only when the CUDA build failed: the package without the extension

mkdir -p "$OUT"
WORK="$(mktemp -d)"
mkdir -p "$WORK/logs"
START="$(date +%s)"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE=$!
# On exit: remove the scratch folder, and let tee finish the log before the command returns.
trap 'rm -rf "$WORK"; exec 1>&- 2>&-; wait "$TEE" 2>/dev/null' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" CURE_FAST_AUTOTUNE=0
if [[ "$DRY" == 1 ]]; then
  # The CPU only, even on a GPU machine: no device, the Triton kernels in the interpreter.
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
fi

summary() {  # rewrite $OUT/summary.json from what the steps left (stdlib only: works without torch)
  local flags=()
  [[ "$DRY" == 1 ]] && flags+=(--dry)
  flags+=("$@")
  "$PYTHON" bench/gpu_summary.py --out "$OUT" --work "$WORK" --started "$START" --total "$TOTAL" "${flags[@]}" ||
    python3 bench/gpu_summary.py --out "$OUT" --work "$WORK" --started "$START" --total "$TOTAL" "${flags[@]}" ||
    echo "!! could not write $OUT/summary.json"
}

record() {  # record NAME KIND BUDGET RC SECONDS ARTEFACT STATUS REASON COMMAND
  local cmd="${9//\\/\\\\}"
  cmd="${cmd//\"/\\\"}"
  printf '{"name": "%s", "kind": "%s", "budget_seconds": %s, "rc": %s, "seconds": %s, "artefact": "%s", "status": "%s", "reason": "%s", "command": "%s"}\n' \
    "$1" "$2" "$3" "${4:-null}" "${5:-null}" "$6" "$7" "$8" "$cmd" >>"$WORK/steps.jsonl"
  summary
}

wanted() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

step() {  # step NAME KIND ARTEFACT COMMAND...: run it within its budget, or skip it if the total would overrun
  local name="$1" kind="$2" artefact="$3"
  shift 3
  local budget="${BUDGET[$name]}" now elapsed left
  now="$(date +%s)"
  elapsed=$((now - START))
  left=$((TOTAL - elapsed))
  if ((budget > left)); then
    echo "== $(date +%T) $name: skipped, its budget ${budget} s exceeds the ${left} s left of ${TOTAL} s"
    record "$name" "$kind" "$budget" "" "" "" skipped "budget: needs ${budget} s, ${left} s left of ${TOTAL} s" "$*"
    return 0
  fi
  echo "== $(date +%T) $name (budget ${budget} s, ${left} s left): $*"
  local t0 t1 rc
  t0="$(date +%s.%N)"
  local grace=$((budget >= 60 ? 10 : 5))  # between SIGINT and SIGKILL
  timeout -s INT -k "$grace" "$((budget > grace ? budget - grace : 1))" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  rc="${PIPESTATUS[0]}"
  t1="$(date +%s.%N)"
  local seconds
  seconds="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"
  if ((rc == 0)); then echo "== $(date +%T) $name: passed in $seconds s"; else echo "!! $name: exit status $rc after $seconds s"; fi
  record "$name" "$kind" "$budget" "$rc" "$seconds" "$artefact" "" "" "$*"
  return "$rc"
}

skip() {  # skip NAME REASON
  echo "== $1: skipped ($2)"
  record "$1" "${3:-}" "${BUDGET[$1]}" "" "" "" skipped "$2" ""
}

echo "== $(date) on ${HOSTNAME:-?}, quick check$([[ "$DRY" == 1 ]] && echo ' (dry run on the CPU)'), steps: ${STEPS[*]}"
echo "== output in $OUT, total budget ${TOTAL} s"
[[ "$DRY" == 1 ]] || nvidia-smi || true

# --------------------------------------------------------------- build
arch="" jobs=""
if wanted build; then
  if [[ "$DRY" == 1 ]]; then
    skip build "dry run: no CUDA build (the installed package is used)" build
  else
    # The extension for this machine's GPU only, all cores.
    arch="${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)}"
    jobs="${MAX_JOBS:-$(nproc)}"
    if ! step build build "" env MAX_JOBS="$jobs" CURE_FAST_BUILD_CUDA=1 ${arch:+TORCH_CUDA_ARCH_LIST="$arch"} \
      "$PYTHON" -m pip install -e . --no-deps --no-build-isolation --no-cache-dir --disable-pip-version-check -q; then
      # Without the extension the Triton and torch steps still run; the CUDA ones then fail.
      step install build "" env CURE_FAST_BUILD_CUDA=0 \
        "$PYTHON" -m pip install -e . --no-deps --no-build-isolation --no-cache-dir --disable-pip-version-check -q
    fi
  fi
fi
GPU_CHECK_ARCH="$arch" GPU_CHECK_JOBS="$jobs" timeout 60 "$PYTHON" bench/gpu_summary.py --probe "$WORK/env.json" ||
  echo "!! the environment probe failed"
summary

# --------------------------------------------------------------- tests
# One process per step, --maxfail so that a kernel that breaks the CUDA context ends its step early.
xdist() {  # xdist N: pytest-xdist's arguments for N workers, when it is installed (not in the dry run)
  if [[ "$DRY" != 1 ]] && "$PYTHON" -c "import xdist" 2>/dev/null; then echo "-n $1"; fi
}
pytest_args=(-m pytest -q -p no:cacheprovider -p pytest_quick -o addopts= --maxfail=10 -rf)
if wanted cuda_ops; then
  # All of them on a GPU (no runtime compilation: fast); on the CPU they skip, which checks that they collect.
  # shellcheck disable=SC2046
  step cuda_ops pytest cuda_ops.xml "$PYTHON" "${pytest_args[@]}" $(xdist 4) tests/test_cuda_ops.py \
    --junitxml "$OUT/cuda_ops.xml"
fi
if wanted gpu_tests; then
  if [[ "$DRY" == 1 ]]; then
    # Not marked gpu without a GPU: the Triton kernel tests, one parametrization per test function.
    # shellcheck disable=SC2046
    step gpu_tests pytest gpu_tests.xml "$PYTHON" "${pytest_args[@]}" --quick --quick-max 1 \
      tests/test_triton_kernels.py --junitxml "$OUT/gpu_tests.xml"
  else
    # Every test marked gpu but the CUDA op tests, sampled: each test function's parametrizations
    # cover every dtype x precision x method (x backend) combination and every other value once; five
    # networks per hypothesis test (each new shape compiles the Triton kernels anew: the cache starts empty).
    # shellcheck disable=SC2046
    step gpu_tests pytest gpu_tests.xml env CURE_FAST_GPU_EXAMPLES=5 "$PYTHON" "${pytest_args[@]}" --quick $(xdist 8) \
      -m gpu tests \
      --ignore tests/test_cuda_ops.py --junitxml "$OUT/gpu_tests.xml"
  fi
fi

# --------------------------------------------------------------- benchmarks
if [[ "$DRY" == 1 ]]; then
  network=(--smoke) kernels=(--smoke) certify=(--smoke --device cpu)
else
  network=(--batch 128 --settings train:tf32 --warmup-ms 10 --rep-ms 50)
  kernels=(--batch 128 --precisions tf32,ieee --no-compile --warmup-ms 5 --rep-ms 25)
  certify=(--device cuda --images 2)
fi
if wanted bench_network; then
  step bench_network bench bench_network.json "$PYTHON" bench/bench_network.py "${network[@]}" \
    --json "$OUT/bench_network.json"
fi
if wanted bench_kernels; then
  step bench_kernels bench bench_kernels.json "$PYTHON" bench/bench_kernels.py "${kernels[@]}" \
    --json "$OUT/bench_kernels.json"
fi
if wanted certify; then
  step certify bench certify_time.json "$PYTHON" bench/certify_time.py "${certify[@]}" --methods ibp,crown \
    --json "$OUT/certify_time.json"
fi

summary --final
echo "== $(date +%T) done in $(($(date +%s) - START)) s; summary in $OUT/summary.json"
if grep -q '"failed_steps": \[\]' "$OUT/summary.json" 2>/dev/null; then
  echo "== all steps passed"
else
  echo "== FAILED (see failed_steps in $OUT/summary.json)"
  exit 1
fi
