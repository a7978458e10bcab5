#!/usr/bin/env bash
# Han et al. 2016 (Deep Compression) on mnist5k: LeNet-300-100 and LeNet-5 pruned to the paper's
# per-layer ratios, retrained, weight-shared (6 / 8+5 bits), fine-tuned, packaged with Huffman
# coding; 3 seeds each. Prints the table (also written to $RUNS/repro_deep_compression.md).
#   scripts/reproduce_deep_compression.sh   # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
sweep repro_deep_compression_lenet300
sweep repro_deep_compression_lenet5
"$PY" scripts/repro_tables.py deep_compression "$RUNS/repro_deep_compression_lenet300" \
  "$RUNS/repro_deep_compression_lenet5" | tee "$RUNS/repro_deep_compression.md"
finish "$RUNS/repro_deep_compression.md"
