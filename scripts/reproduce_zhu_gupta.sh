#!/usr/bin/env bash
# Zhu & Gupta 2017 on mnist5k: gradual (cubic) vs one-shot pruning of LeNet-300-100 to 90 / 95 /
# 98% sparsity with the same total steps; 3 seeds each. Prints the table (also written to
# $RUNS/repro_zhu_gupta.md).
#   scripts/reproduce_zhu_gupta.sh      # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
sweep repro_zhu_gupta   # points override `stages`, so they run in this process (no --workers)
"$PY" scripts/repro_tables.py zhu_gupta "$RUNS/repro_zhu_gupta" | tee "$RUNS/repro_zhu_gupta.md"
finish "$RUNS/repro_zhu_gupta.md"
