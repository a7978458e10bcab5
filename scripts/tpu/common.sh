# Shared by the TPU scripts: argument parsing and a `run` that honours --dry-run.
# Settings come from the environment (or flags): TPU_NAME, ZONE, ACCELERATOR, VERSION, PROJECT.
set -euo pipefail
DRY_RUN=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) TPU_NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --accelerator) ACCELERATOR="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
TPU_NAME="${TPU_NAME:-jaxaccel}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")

run() {
  # Print the command; execute it unless --dry-run.
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

on_all_workers() {
  # Run a shell command on every host of the TPU VM / pod slice.
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}
