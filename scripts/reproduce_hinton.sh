#!/usr/bin/env bash
# Hinton et al. 2015 on mnist5k: a cnn3 teacher distilled (T = 4 or 20, chosen on validation) into
# a 16x narrower cnn3 vs the same student on labels alone; 5 seeds each. Prints the table (also
# written to $RUNS/repro_hinton.md).
#   scripts/reproduce_hinton.sh      # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
teacher_cnn3
sweep repro_hinton "--config.distill.teacher=$TEACHER"
"$PY" scripts/repro_tables.py hinton "$RUNS/repro_hinton" | tee "$RUNS/repro_hinton.md"
finish "$RUNS/repro_hinton.md"
