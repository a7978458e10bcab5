#!/usr/bin/env bash
# ResNet-20 on CIFAR-10 (He et al. 2016: 91.25%): dense, int8, 50% inner-channel pruning + int8;
# 3 seeds. For a GPU/TPU machine with CIFAR-10 prepared as TFDS array_record in DATA_DIR (or the
# default data dir); NOT run in CI or on the 2-core dev machine (one seed = 80K steps).
#   DATA_DIR=/path/to/tfds scripts/reproduce_resnet20_cifar10.sh [--dry-run]
# --dry-run validates the config, prints its stages and the commands, and trains nothing.
source "$(dirname "$0")/_repro_common.sh"
NAME=repro_resnet20_cifar10
DATA_ARGS=()
[[ -n "${DATA_DIR:-}" ]] && DATA_ARGS=(--config.dataset.data_dir="$DATA_DIR")
SWEEP_CMD=("$PY" -m jaxaccel sweep --config "experiments/$NAME.py" --workdir "$RUNS/$NAME" "${DATA_ARGS[@]}")
TABLE_CMD=("$PY" scripts/repro_tables.py resnet20 "$RUNS/$NAME")

if [[ "${1:-}" == "--dry-run" ]]; then
  "$PY" - "experiments/$NAME.py" <<'PYEOF'
import sys
from jaxaccel import config as config_lib, stages, sweep
config = config_lib.load_experiment(sys.argv[1])
config_lib.validate(config)
for s in stages.expand(config):
    print(f"  stage {s.name:12s} {s.kind:9s} steps={s.steps}")
print(f"  sweep: {len(sweep.load_sweep(sys.argv[1]))} points "
      f"({', '.join(sweep.point_name(p) for p in sweep.load_sweep(sys.argv[1]))})")
PYEOF
  echo "would run: ${SWEEP_CMD[*]}"
  echo "then:      ${TABLE_CMD[*]}"
  exit 0
fi

if ! "$PY" -m jaxaccel datasets ${DATA_DIR:+--data-dir "$DATA_DIR"} | grep -Eq '^cifar10 +prepared'; then
  echo "reproduce_resnet20_cifar10: needs CIFAR-10 prepared as TFDS array_record in the data dir" \
       "(set DATA_DIR); not run here. Use --dry-run to check the config." >&2
  exit 2
fi
"${SWEEP_CMD[@]}"
"${TABLE_CMD[@]}" | tee "$RUNS/$NAME.md"
finish "$RUNS/$NAME.md"
