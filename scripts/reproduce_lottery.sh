#!/usr/bin/env bash
# Frankle & Carbin 2019 on mnist5k: lottery tickets in LeNet-300-100 — 12 rounds of IMP (20% per
# round, 10% of the output layer) with reset to init, and the random-reinit control on the same
# masks; early-stopping iterations from metrics.jsonl; 3 seeds. Prints the table (also written
# to $RUNS/repro_lottery.md).
#   scripts/reproduce_lottery.sh        # RUNS=runs by default; re-running skips finished points
source "$(dirname "$0")/_repro_common.sh"
sweep repro_lottery
"$PY" scripts/repro_tables.py lottery "$RUNS/repro_lottery" | tee "$RUNS/repro_lottery.md"
finish "$RUNS/repro_lottery.md"
