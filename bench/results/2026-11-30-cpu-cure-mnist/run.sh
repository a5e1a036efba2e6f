#!/bin/bash
# CPU proof run (2 cores): MNIST l∞ 0.1 / l2 0.75, CNN3 instead of CNN7, a short schedule;
# the paper presets otherwise. Certified with `certify --protocol paper` (α-CROWN cascade).
# Usage: bash bench/results/2026-11-30-cpu-cure-mnist/run.sh   (from the repository root)
set -u
OUT=bench/results/2026-11-30-cpu-cure-mnist
RUNS=${RUNS:-/tmp/cure-cpu-runs}
IMAGES=${IMAGES:-200}
export OMP_NUM_THREADS=2
SHORT="--set model=cnn3 --set train_limit=8000 --set epochs=4 --set eps_start_epoch=1 --set eps_end_epoch=3 \
 --set lr_milestones=[] --set lr=0.002 --set eval_limit=100 --set eval_pgd_steps=5 --set final_certify=ibp \
 --set progress=false --set out_dir=$RUNS"
for preset in mnist-0.1-inf mnist-0.1-2 mnist-0.1-cure; do
  echo "== train $preset $(date -u +%T)"
  timeout 480 .venv/bin/cure-fast train --preset $preset $SHORT 2>&1 | tail -4
done
for preset in mnist-0.1-inf mnist-0.1-2 mnist-0.1-cure; do
  echo "== certify $preset $(date -u +%T)"
  timeout 420 .venv/bin/cure-fast certify $RUNS/$preset --protocol paper --limit $IMAGES --no-curve \
    --pgd-steps 10 --no-progress --out $OUT/certify-$preset 2>&1 | tail -12
done
echo "== done $(date -u +%T)"
