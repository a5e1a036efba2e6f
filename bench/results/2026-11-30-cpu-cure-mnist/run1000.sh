#!/bin/bash
# The three models of run.sh certified on the paper's 1000 test images (0–999), one thread each.
# Usage: bash bench/results/2026-11-30-cpu-cure-mnist/run1000.sh   (after run.sh, from the repository root)
set -u
OUT=bench/results/2026-11-30-cpu-cure-mnist
RUNS=${RUNS:-/tmp/cure-cpu-runs}
export OMP_NUM_THREADS=1
for preset in mnist-0.1-cure mnist-0.1-inf mnist-0.1-2; do
  echo "== certify $preset $(date -u +%T)"
  .venv/bin/cure-fast certify $RUNS/$preset --protocol paper --no-curve --pgd-steps 10 --no-progress \
    --out $OUT/certify1000-$preset 2>&1 | tail -12
done
echo "== done $(date -u +%T)"
