#!/usr/bin/env bash
# One GPU, under 8 minutes, one table: install the CUDA build of jax, then the demo
# experiment, the train-step benchmark (vs PyTorch), bfloat16, PyTorch on CUDA, native int8
# inference and an ONNX Runtime session asking for CUDA. Usage:
#
#   bash scripts/gpu_check.sh [--out DIR] [--no-install] [--dry-run]
#
#   --out DIR      where logs, JSON and the demo run go (default runs/gpu_check); the table is
#                  printed at the end and written as strict JSON to DIR/gpu_check.json
#   --no-install   use the environment as it is (e.g. a machine that cannot reach the registry)
#   --dry-run      print every command it would run, run nothing, exit 0
#
# Environment: PY (default .venv/bin/python, created with python3 -m venv when missing),
# GPU_CHECK_BUDGET_S (default 480), DEMO_STEPS (default: the experiment's 400),
# JAX_PLATFORMS=cpu (a CPU run/dry-run: the CUDA installs are skipped).
#
# How it is bounded: every step runs under `timeout` for the smaller of its own cap and what
# is left of the budget (GPU_CHECK_BUDGET_S, 8 minutes, counted from the start, the installs
# included); a step that would start with under MIN_STEP_S seconds left is skipped. So the run
# ends within the budget plus one kill grace (10 s) and the table. A failing step is recorded
# (failed, with its log) and the next one runs.
#
# What each step measures (key figure → the table):
#   install      pip install -e '.[bench,onnx]'; jax[cuda12] pinned to the installed jax
#                version; onnxruntime-gpu in place of onnxruntime (best effort, undone on failure)
#   devices      nvidia-smi's GPU name and memory; jax.devices()
#   demo         jaxaccel train on experiments/mnist5k_cnn3.py (test accuracy, img/s)
#   train        jaxaccel bench train --compare-torch (ms/step, MFU; PyTorch's step from
#                jaxaccel/bench/torch_cnn3.py runs on the CPU: the table says so)
#   train-bf16   the same cnn3 step in float32 vs bfloat16 (model.dtype), interleaved
#   torch-cuda   the same step vs bench.torch_cnn3's PyTorch step created on CUDA (float32 and
#                bfloat16 autocast), interleaved
#   infer        jaxaccel bench infer (float32, fake-quant, native int8, pruned, clustered)
#   onnx-export  jaxaccel compress export DEMO --format onnx (when the CLI has --format onnx)
#   onnx-session ONNX Runtime with providers [CUDA, CPU]: which ran, forward time, vs predict
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: scripts/gpu_check.sh [--out DIR] [--no-install] [--dry-run]"
DRY_RUN=0
INSTALL=1
OUT=runs/gpu_check
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-install) INSTALL=0 ;;
    --out)
      [[ $# -ge 2 && -n "$2" ]] || { echo "$usage (--out needs a directory)" >&2; exit 2; }
      OUT="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "$usage (unknown argument: $1)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PY:-.venv/bin/python}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
MIN_STEP_S=15
HELPER=scripts/gpu_check.py
CPU_ONLY=0
[[ "${JAX_PLATFORMS:-}" == "cpu" ]] && CPU_ONLY=1
START=$SECONDS
ROWS="$OUT/steps.tsv"

run() {
  # Print the command; execute it unless --dry-run.
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

note() { echo "gpu_check: $*"; }

left() { echo $(( BUDGET_S - (SECONDS - START) )); }

record() {
  # record STEP STATUS SECONDS FIGURE COMMAND LOG: one row of the table (tabs stripped).
  [[ "$DRY_RUN" == 1 ]] && return 0
  local fields=() f
  for f in "$@"; do fields+=("${f//$'\t'/ }"); done
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "${fields[@]}" >>"$ROWS"
}

FIGURE=""
step() {
  # step NAME CAP_S COMMAND...: run COMMAND under timeout (min(CAP_S, budget left)), its
  # output to $OUT/NAME.log (and the terminal); record ok / failed / skipped (exit 77) with
  # the helper's `FIGURE:` line when it prints one.
  local name="$1" cap="$2"; shift 2
  local log="$OUT/$name.log" rem t0 rc secs
  rem=$(left)
  (( cap > rem )) && cap=$rem
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ timeout %s' "$cap"; printf ' %q' "$@"; printf '\n'
    return 0
  fi
  if (( cap < MIN_STEP_S )); then
    record "$name" skipped 0 "budget spent (${rem} s left of ${BUDGET_S} s)" "$*" ""
    return 1
  fi
  printf '+ timeout %s' "$cap"; printf ' %q' "$@"; printf '\n'
  t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  secs=$(( SECONDS - t0 ))
  FIGURE=$(sed -n 's/^FIGURE: //p' "$log" | tail -n 1)
  if [[ $rc == 0 ]]; then
    record "$name" ok "$secs" "${FIGURE:-done}" "$*" "$log"
  elif [[ $rc == 77 ]]; then
    record "$name" skipped "$secs" "${FIGURE:-not available}" "$*" "$log"
  elif [[ $rc == 124 || $rc == 137 ]]; then
    record "$name" failed "$secs" "timed out after ${cap} s (see $log)" "$*" "$log"
  else
    record "$name" failed "$secs" "exit $rc: $(grep -v '^FIGURE: ' "$log" | grep . | tail -n 1 | cut -c1-200)" "$*" "$log"
  fi
  return "$rc"
}

figure_into_row() {
  # Replace the last row's figure with the helper's figure of a JSON / workdir (ok rows only).
  [[ "$DRY_RUN" == 1 ]] && return 0
  local fig
  fig=$("$PY" "$HELPER" figure "$@" | sed -n 's/^FIGURE: //p' | tail -n 1)
  [[ -n "$fig" ]] || return 0
  "$PY" - "$ROWS" "$fig" <<'EOF'
import sys
path, fig = sys.argv[1], sys.argv[2].replace("\t", " ")
lines = open(path).read().splitlines()
parts = lines[-1].split("\t")
if parts[1] == "ok":
    parts[3] = fig
    lines[-1] = "\t".join(parts)
open(path, "w").write("\n".join(lines) + "\n")
EOF
}

if [[ "$DRY_RUN" == 1 ]]; then
  note "dry run: printing the commands, running none (budget ${BUDGET_S} s, out $OUT)"
else
  mkdir -p "$OUT"
  : >"$ROWS"
fi

# --- 1. install --------------------------------------------------------------------------
do_install() {
  if [[ ! -x "$PY" ]]; then
    run python3 -m venv .venv || return 1
    PY=.venv/bin/python
  fi
  run "$PY" -m pip install -q -e '.[bench,onnx]' || return 1
  if [[ "$CPU_ONLY" == 1 ]]; then
    note "JAX_PLATFORMS=cpu: would skip the CUDA install (jax[cuda12], onnxruntime-gpu)"
    return 0
  fi
  local v
  if [[ "$DRY_RUN" == 1 ]]; then
    v=$("$PY" -c 'import importlib.metadata as m; print(m.version("jax"))' 2>/dev/null)
    [[ -n "$v" ]] || v=JAX_VERSION
  else
    v=$("$PY" -c 'import jax; print(jax.__version__)') || return 1
  fi
  run "$PY" -m pip install -q -U "jax[cuda12]==$v" || return 1
  # onnxruntime and onnxruntime-gpu are one module: swap them, and swap back if the GPU
  # build is not to be had (best effort: this never fails the step).
  if run "$PY" -m pip uninstall -q -y onnxruntime; then
    run "$PY" -m pip install -q 'onnxruntime-gpu>=1.19,<2' \
      || run "$PY" -m pip install -q 'onnxruntime>=1.19,<2' || true
  fi
  return 0
}

if [[ "$INSTALL" == 0 ]]; then
  note "--no-install: using $PY as it is"
  record install skipped 0 "--no-install: the environment as it is" "" ""
elif [[ "$DRY_RUN" == 1 ]]; then
  do_install
else
  t0=$SECONDS
  cap=$(left); (( cap > 240 )) && cap=240
  ( export -f run note do_install; export DRY_RUN CPU_ONLY PY
    timeout --kill-after=10 "$cap" bash -c do_install ) 2>&1 | tee "$OUT/install.log"
  rc=${PIPESTATUS[0]}
  [[ -x "$PY" ]] || PY=.venv/bin/python
  jv=$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "not importable")
  if [[ $rc == 0 ]]; then
    what="jax $jv"; [[ "$CPU_ONLY" == 1 ]] && what="$what (JAX_PLATFORMS=cpu: CUDA install skipped)"
    ort=$("$PY" -c 'import importlib.metadata as m
for d in ("onnxruntime-gpu", "onnxruntime"):
    try: print(d, m.version(d)); break
    except m.PackageNotFoundError: pass' 2>/dev/null)
    record install ok $(( SECONDS - t0 )) "$what; ${ort:-no onnxruntime}" "pip install (see log)" "$OUT/install.log"
  else
    record install failed $(( SECONDS - t0 )) "exit $rc (continuing with jax $jv; see $OUT/install.log)" "pip install" "$OUT/install.log"
  fi
fi

# --- 2. the GPU and what jax sees --------------------------------------------------------
GPU=""
JAX_DEVICES=""
if [[ "$DRY_RUN" == 1 ]]; then
  run nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  run "$PY" -c 'import jax; print(jax.devices())'
else
  GPU=$(timeout 30 nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';' -)
  JAX_DEVICES=$(timeout 120 "$PY" -c 'import jax; print(jax.devices())' 2>"$OUT/devices.log" | tail -n 1)
  note "GPU: ${GPU:-none (nvidia-smi found no GPU)}; jax.devices(): ${JAX_DEVICES:-failed (see $OUT/devices.log)}"
  if [[ -n "$JAX_DEVICES" && "$CPU_ONLY" == 0 ]] && ! grep -qiE 'cuda|gpu' <<<"$JAX_DEVICES"; then
    record devices failed 0 "jax sees no GPU: jax.devices() = $JAX_DEVICES; GPU ${GPU:-none found}" "jax.devices()" "$OUT/devices.log"
  elif [[ -n "$JAX_DEVICES" ]]; then
    record devices ok 0 "GPU ${GPU:-none found}; jax.devices() = $JAX_DEVICES" "nvidia-smi; jax.devices()" ""
  else
    record devices failed 0 "GPU ${GPU:-none found}; jax.devices() failed: $(tail -n 1 "$OUT/devices.log")" "jax.devices()" "$OUT/devices.log"
  fi
fi

# --- 3. the demo experiment ----------------------------------------------------------------
DEMO="$OUT/demo"
demo_args=(--config experiments/mnist5k_cnn3.py --workdir "$DEMO")
if [[ -n "${DEMO_STEPS:-}" ]]; then  # fewer steps: the warm-up (50) must stay below them
  demo_args+=("--config.num_steps=$DEMO_STEPS" "--config.optimizer.warmup_steps=$(( DEMO_STEPS / 8 ))")
fi
run rm -rf -- "$DEMO"   # a fresh run, not a resumed one
step demo 150 "$PY" -m jaxaccel train "${demo_args[@]}" && figure_into_row demo "$DEMO"

# --- 4. train step vs PyTorch; bfloat16; PyTorch on CUDA ----------------------------------
step train 120 "$PY" -m jaxaccel bench train --compare-torch --warmup 5 --repeats 30 \
  --json "$OUT/bench_train.json" && figure_into_row train "$OUT/bench_train.json"
step train-bf16 90 "$PY" "$HELPER" train-bf16 --json "$OUT/train_bf16.json"
step torch-cuda 90 "$PY" "$HELPER" train-torch-cuda --json "$OUT/train_torch_cuda.json"

# --- 5. native int8 inference ---------------------------------------------------------------
step infer 120 "$PY" -m jaxaccel bench infer --warmup 5 --repeats 30 \
  --json "$OUT/bench_infer.json" && figure_into_row infer "$OUT/bench_infer.json"

# --- 6. ONNX Runtime (CUDA provider where it loads) ----------------------------------------
ONNX="$OUT/demo.onnx"
if [[ "$DRY_RUN" == 0 ]] && ! "$PY" -m jaxaccel compress export --help 2>/dev/null | grep -q -- '--format'; then
  record onnx-export skipped 0 "not available: this jaxaccel has no compress export --format onnx" "" ""
  record onnx-session skipped 0 "not available: nothing exported" "" ""
elif [[ "$DRY_RUN" == 0 && ! -f "$DEMO/results.json" ]]; then
  record onnx-export skipped 0 "not available: the demo run did not finish" "" ""
  record onnx-session skipped 0 "not available: nothing exported" "" ""
else
  if step onnx-export 60 "$PY" -m jaxaccel compress export "$DEMO" --format onnx --out "$ONNX"; then
    step onnx-session 90 "$PY" "$HELPER" onnx-session "$ONNX" --workdir "$DEMO" \
      --json "$OUT/onnx_session.json"
  else
    record onnx-session skipped 0 "not available: the export failed" "" ""
  fi
fi

# --- the table -----------------------------------------------------------------------------
if [[ "$DRY_RUN" == 1 ]]; then
  note "would print the table and write $OUT/gpu_check.json"
  exit 0
fi
echo
TABLE_PY="$PY"
"$TABLE_PY" -c '' 2>/dev/null || TABLE_PY=python3
"$TABLE_PY" "$HELPER" table "$ROWS" --json "$OUT/gpu_check.json" --gpu "$GPU" \
  --jax-devices "$JAX_DEVICES" --budget-s "$BUDGET_S" --elapsed-s "$(( SECONDS - START ))"
echo
note "wrote $OUT/gpu_check.json"
# exit 1 when a step failed (the table says which), 0 when every step ran or was skipped
! cut -f2 "$ROWS" | grep -qx failed
