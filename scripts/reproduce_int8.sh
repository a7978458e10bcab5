#!/usr/bin/env bash
# Krishnamoorthi 2018 / Jacob et al. 2018 on mnist5k: W8A8 and W4A8 (and W3A8, W2A8) PTQ,
# per-channel vs per-tensor, and 4-bit per-tensor QAT, on LeNet-300-100, a BatchNorm CNN and a
# depthwise-separable BatchNorm CNN; 3 seeds each. Prints the table (also written to $RUNS/repro_int8.md).
#   scripts/reproduce_int8.sh           # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
sweep repro_int8
"$PY" scripts/repro_tables.py int8 "$RUNS/repro_int8" | tee "$RUNS/repro_int8.md"
finish "$RUNS/repro_int8.md"
