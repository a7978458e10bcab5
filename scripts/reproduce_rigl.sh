#!/usr/bin/env bash
# Evci et al. 2020 (RigL) on mnist5k: RigL vs SET vs static sparse training at 90 / 95 / 98% with
# equal steps, LeNet-300-100 and cnn3 (width 1/2); 3 seeds each. Prints the table (also written
# to $RUNS/repro_rigl.md).
#   scripts/reproduce_rigl.sh      # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
sweep repro_rigl   # points override `stages`, so they run in this process (no --workers)
"$PY" scripts/repro_tables.py rigl "$RUNS/repro_rigl" | tee "$RUNS/repro_rigl.md"
finish "$RUNS/repro_rigl.md"
