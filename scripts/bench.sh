#!/usr/bin/env bash
# The whole benchmark suite (`make bench`): markdown tables on stdout, and
# runs/bench/latest.json + runs/bench/latest.md (copy the tables into BENCHMARKS.md).
# Extra arguments go to `jaxaccel bench all`, e.g. `bash scripts/bench.sh --repeats 10`.
# The PyTorch comparison runs when torch is installed (`pip install -e '.[bench]'`).
#
# On a CPU host the train benchmark (and so its PyTorch comparison) runs data-parallel over
# TRAIN_DEVICES simulated CPU devices (default 8): XLA:CPU runs each device's shard of the
# batch on its own thread, which is jaxaccel's fastest CPU set-up (BENCHMARKS.md, scaling).
# The 1-device step time is in the scaling table of the same run. TRAIN_DEVICES=1 turns it off.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${BENCH_OUT:-runs/bench}"
mkdir -p "$OUT"
DEVICES=()
backend=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)
if [[ "$backend" == "cpu" && "${TRAIN_DEVICES:-8}" != "1" ]]; then
  DEVICES=(--cpu-devices "${TRAIN_DEVICES:-8}" --devices "${TRAIN_DEVICES:-8}")
fi
start=$(date +%s)
"$PY" -m jaxaccel bench all --compare-torch "${DEVICES[@]}" --json "$OUT/latest.json" --markdown "$OUT/latest.md" "$@"
echo "bench.sh: the whole suite took $(( $(date +%s) - start )) s"
