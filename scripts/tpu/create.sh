#!/usr/bin/env bash
# Create a TPU VM (or pod slice) and install jaxaccel on every host.
#   scripts/tpu/create.sh --name my-tpu --zone us-central2-b --accelerator v4-16 [--dry-run]
source "$(dirname "$0")/common.sh"
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
  --accelerator-type "$ACCELERATOR" --version "$VERSION"
REPO_URL="${REPO_URL:-$(git -C "$(dirname "$0")/../.." remote get-url origin 2>/dev/null || echo REPO_URL)}"
on_all_workers "git clone $REPO_URL jaxaccel || git -C jaxaccel pull; cd jaxaccel && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
