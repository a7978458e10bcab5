#!/usr/bin/env bash
# Polino et al. 2018 on mnist5k: a 4-bit (W4A8 per-tensor) QAT cnn3 student at width 1/8, trained
# with distillation from the cnn3 teacher (T = 4) vs on labels alone; 3 seeds each. Prints the
# table (also written to $RUNS/repro_polino.md).
#   scripts/reproduce_polino.sh      # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
teacher_cnn3
sweep repro_polino "--config.stages.0.distill.teacher=$TEACHER"
"$PY" scripts/repro_tables.py polino "$RUNS/repro_polino" | tee "$RUNS/repro_polino.md"
finish "$RUNS/repro_polino.md"
