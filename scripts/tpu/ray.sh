#!/usr/bin/env bash
# Form a Ray cluster over the hosts of a TPU VM / pod slice: the head on worker 0, every other
# host joins it. Then a sweep started on worker 0 spreads its trials over the hosts (one trial
# per host with --trial-cpus set to a host's CPU count; workdirs in a bucket).
#   scripts/tpu/ray.sh --name my-tpu [--zone Z] [--dry-run]
#   PORT=6379 scripts/tpu/ray.sh ...
source "$(dirname "$0")/common.sh"
PORT="${PORT:-6379}"
if [[ "$DRY_RUN" == 1 ]]; then
  HEAD_IP=HEAD_IP
else
  HEAD_IP=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --format='value(networkEndpoints[0].ipAddress)')
fi
printf '+ HEAD_IP=$(gcloud compute tpus tpu-vm describe %q --zone %q --format=value(networkEndpoints[0].ipAddress))\n' "$TPU_NAME" "$ZONE"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=0 \
  --command "cd jaxaccel && .venv/bin/pip install -q -e '.[ray]' && .venv/bin/ray start --head --port=$PORT --disable-usage-stats"
# Every host (worker 0 skips: it is the head) joins the head.
on_all_workers "cd jaxaccel && .venv/bin/pip install -q -e '.[ray]' && if [ \"\$(hostname -I | awk '{print \$1}')\" != $HEAD_IP ]; then .venv/bin/ray start --address=$HEAD_IP:$PORT --disable-usage-stats; fi"
echo "then on worker 0: jaxaccel sweep --config X.py --workdir gs://BUCKET/runs/X --engine ray --address $HEAD_IP:$PORT --trial-cpus \$(nproc)"
