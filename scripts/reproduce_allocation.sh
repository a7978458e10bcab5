#!/usr/bin/env bash
# Per-layer sensitivity and allocation (`jaxaccel compress sensitivity --target-bytes`) against
# uniform pruning at the same package size, on mnist5k: per seed a dense LeNet-300-100, its
# sensitivity on the validation split, then pruned per the allocation / uniformly / by one global
# threshold to the bytes of uniform 95% and 98% (8-bit codes), fine-tuned and W8A8-quantized;
# 3 seeds. Prints the table (also written to $RUNS/repro_allocation.md).
#   scripts/reproduce_allocation.sh   # RUNS=runs by default; re-running skips finished runs
source "$(dirname "$0")/_repro_common.sh"
EXP=experiments/repro_allocation.py
OUT="$RUNS/repro_allocation"
helper() { "$PY" "$EXP" "$@"; }  # the experiment file's helpers (targets, overrides)
train() {  # train WORKDIR [overrides]: skipped when the run finished
  local workdir="$1"; shift
  [[ -f "$workdir/results.json" ]] && return 0
  "$PY" -m jaxaccel train --config "$EXP" --workdir "$workdir" "$@" || SWEEP_STATUS=$?
}
settings=$(helper settings)
{ read -r SIZES; read -r GRID; read -r BITS; } <<< "$settings"
for seed in 0 1 2; do
  dense="$OUT/dense_seed$seed"
  train "$dense" --config.seed=$seed "--config.stages=()"
  for size in $SIZES; do
    sens="$dense/sensitivity_$size"
    if [[ ! -f "$sens/sensitivity.json" ]]; then
      target=$(helper target "$dense" "$size")
      "$PY" -m jaxaccel compress sensitivity "$dense" --sparsities "$GRID" --bits "$BITS" \
        --target-bytes "$target" --out "$sens" > /dev/null
    fi
    for arm in allocated uniform global; do
      [[ -f "$OUT/${arm}_${size}_seed$seed/results.json" ]] && continue
      case $arm in  # an assignment, so that a failing helper stops the script (set -e)
        allocated) lines=$(helper overrides "$sens/sensitivity.json") ;;
        uniform) lines=$(helper uniform "$size") ;;
        global) lines=$(helper global "$dense" "$size") ;;
      esac
      mapfile -t per_layer <<< "$lines"
      train "$OUT/${arm}_${size}_seed$seed" --config.seed=$seed "--config.init_from=$dense" \
        "${per_layer[@]}"
    done
  done
done
"$PY" scripts/repro_tables.py allocation "$OUT" | tee "$RUNS/repro_allocation.md"
finish "$RUNS/repro_allocation.md"
