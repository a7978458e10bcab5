# Sourced by scripts/reproduce_*.sh: repo root, python, runs dir, JAX compilation cache.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
RUNS="${RUNS:-runs}"   # relative to the repository root
# Every stage of every point compiles the same few programs: cache them across stages/points.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$RUNS/.jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:--1}"
START_SECONDS=$(date +%s)
SWEEP_STATUS=0

sweep() {  # sweep EXPERIMENT_NAME [more jaxaccel sweep args]; a failed point is reported at the end
  local name="$1"; shift
  "$PY" -m jaxaccel sweep --config "experiments/$name.py" --workdir "$RUNS/$name" "$@" \
    || SWEEP_STATUS=$?
}

finish() {  # finish TABLE_FILE: print the wall time (also appended to the table file)
  local secs=$(( $(date +%s) - START_SECONDS ))
  echo "wall time: ${secs} s ($(( secs / 60 )) min $(( secs % 60 )) s) on $(nproc) cores" | tee -a "$1"
  if (( SWEEP_STATUS != 0 )); then
    echo "some sweep points failed (see error.txt in their sub-workdirs); the table covers the finished ones" >&2
  fi
  return "$SWEEP_STATUS"
}

teacher_cnn3() {  # train the distillation teacher once ($RUNS/teacher_cnn3); later calls reuse it
  if [[ ! -f "$RUNS/teacher_cnn3/results.json" ]]; then
    "$PY" -m jaxaccel train --config experiments/teacher_cnn3.py --workdir "$RUNS/teacher_cnn3"
  fi
  TEACHER="$RUNS/teacher_cnn3"
}
