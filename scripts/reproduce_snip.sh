#!/usr/bin/env bash
# Lee et al. 2019 (SNIP) on mnist5k: LeNet-300-100 pruned at initialization to 90 / 95 / 98% by
# SNIP vs at random vs by magnitude after training (same total steps); 3 seeds each. Prints the
# table (also written to $RUNS/repro_snip.md).
#   scripts/reproduce_snip.sh      # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
sweep repro_snip   # points override `stages`, so they run in this process (no --workers)
"$PY" scripts/repro_tables.py snip "$RUNS/repro_snip" | tee "$RUNS/repro_snip.md"
finish "$RUNS/repro_snip.md"
