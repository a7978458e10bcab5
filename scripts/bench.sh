#!/usr/bin/env bash
# The whole benchmark suite (`make bench`): markdown tables on stdout, and
# runs/bench/latest.json + runs/bench/latest.md (copy the tables into BENCHMARKS.md).
# Extra arguments go to `jaxaccel bench all`, e.g. `bash scripts/bench.sh --repeats 10`.
# The PyTorch comparison runs when torch is installed (`pip install -e '.[bench]'`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${BENCH_OUT:-runs/bench}"
mkdir -p "$OUT"
start=$(date +%s)
"$PY" -m jaxaccel bench all --compare-torch --json "$OUT/latest.json" --markdown "$OUT/latest.md" "$@"
echo "bench.sh: the whole suite took $(( $(date +%s) - start )) s"
