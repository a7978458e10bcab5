#!/usr/bin/env bash
# The combined pipeline on mnist5k: the cnn3 teacher distilled into a 90%-sparse int8 cnn3 student
# at width 1/4 (dense -> gradual pruning -> 8-bit QAT -> int8, every train stage taught) vs the
# same pipeline on labels alone; 3 seeds each. Prints accuracy, bytes and int8 inference speed
# (also written to $RUNS/repro_distill_compressed.md).
#   scripts/reproduce_distill_compressed.sh   # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
teacher_cnn3
sweep repro_distill_compressed "--config.stages.0.distill.teacher=$TEACHER" \
  "--config.stages.1.distill.teacher=$TEACHER" "--config.stages.2.distill.teacher=$TEACHER"
"$PY" scripts/repro_tables.py distill_compressed "$RUNS/repro_distill_compressed" \
  | tee "$RUNS/repro_distill_compressed.md"
finish "$RUNS/repro_distill_compressed.md"
