#!/usr/bin/env bash
# Run an experiment (or a sweep) on every host of a TPU VM / pod slice. JAX detects the
# hosts itself (JAXACCEL_DISTRIBUTED=auto); data and workdirs live in buckets.
#   scripts/tpu/run.sh --name my-tpu experiments/cifar10_resnet20.py gs://BUCKET/runs/r20 \
#       gs://BUCKET/tfds [--config.key=value ...] [--dry-run]
#   SWEEP=1 scripts/tpu/run.sh ...   # jaxaccel sweep instead of train
source "$(dirname "$0")/common.sh"
if [[ ${#ARGS[@]} -lt 3 ]]; then
  echo "usage: run.sh [--dry-run] [--name N] [--zone Z] CONFIG WORKDIR DATA_DIR [--config.k=v ...]" >&2
  exit 2
fi
CONFIG="${ARGS[0]}"; WORKDIR="${ARGS[1]}"; DATA_DIR="${ARGS[2]}"
EXTRA="${ARGS[*]:3}"
CMD=train
[[ "${SWEEP:-0}" == 1 ]] && CMD=sweep
on_all_workers "cd jaxaccel && JAXACCEL_DISTRIBUTED=auto .venv/bin/jaxaccel $CMD --config $CONFIG --workdir $WORKDIR --config.dataset.data_dir=$DATA_DIR $EXTRA"
