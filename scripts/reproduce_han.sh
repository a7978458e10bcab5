#!/usr/bin/env bash
# Han et al. 2015 on mnist5k: LeNet-300-100 and LeNet-5 pruned to ~8% of the weights with the
# paper's per-layer ratios: accuracy of the dense weights with the final masks (no retraining),
# then iterated magnitude pruning + retraining at lr/10 (3 rounds); 3 seeds each. Prints the
# table (also written to $RUNS/repro_han.md).
#   scripts/reproduce_han.sh            # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
sweep repro_han_lenet300
sweep repro_han_lenet5
"$PY" scripts/repro_tables.py han "$RUNS/repro_han_lenet300" "$RUNS/repro_han_lenet5" \
  | tee "$RUNS/repro_han.md"
finish "$RUNS/repro_han.md"
