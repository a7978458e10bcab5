#!/usr/bin/env bash
# The whole benchmark suite (`make bench`): markdown tables on stdout, and
# runs/bench/latest.json + runs/bench/latest.md (copy the tables into BENCHMARKS.md).
# Extra arguments go to `jaxaccel bench all`, e.g. `bash scripts/bench.sh --repeats 10`.
# The PyTorch comparison runs when torch is installed (`pip install -e '.[bench]'`), the ONNX
# Runtime one (inference) when onnxruntime is (`pip install -e '.[onnx]'`, in the test extra).
#
# On a CPU host the process simulates 8 CPU devices (so the scaling table runs in-process) and
# the train benchmark (and so its PyTorch comparison) runs data-parallel over TRAIN_DEVICES of
# them (default 4): XLA:CPU runs each device's shard of the batch on its own thread, and on
# the 2-core dev machine 4 devices was the fastest count with XLA's convs (7-16% faster than 8);
# with cnn3's Winograd kernel 2 devices measure 4-8% faster than 4 (BENCHMARKS.md, 2026-12-02
# 06:13), kept at 4 so entries stay comparable. The 1-device step time is in the scaling table
# of the same run.
# TRAIN_DEVICES=1 times one device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${BENCH_OUT:-runs/bench}"
mkdir -p "$OUT"
DEVICES=()
backend=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)
if [[ "$backend" == "cpu" ]]; then
  train_devices=${TRAIN_DEVICES:-4}
  DEVICES=(--cpu-devices "$(( train_devices > 8 ? train_devices : 8 ))" --devices "$train_devices")
fi
start=$(date +%s)
"$PY" -m jaxaccel bench all --compare-torch --compare-onnxruntime "${DEVICES[@]}" --json "$OUT/latest.json" --markdown "$OUT/latest.md" "$@"
echo "bench.sh: the whole suite took $(( $(date +%s) - start )) s"
