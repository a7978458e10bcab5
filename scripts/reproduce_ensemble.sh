#!/usr/bin/env bash
# Deep ensembles on mnist5k: 5 LeNet-300-100 members trained as one program, averaged and stacked
# (weights fit on the validation split), vs each member; 3 ensembles (seeds 0, 5, 10). Prints the
# table (also written to $RUNS/repro_ensemble.md).
#   scripts/reproduce_ensemble.sh      # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
sweep repro_ensemble
"$PY" scripts/repro_tables.py ensemble "$RUNS/repro_ensemble" | tee "$RUNS/repro_ensemble.md"
finish "$RUNS/repro_ensemble.md"
