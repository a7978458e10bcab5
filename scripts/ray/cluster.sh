#!/usr/bin/env bash
# Start (or stop) a Ray cluster on GPU hosts reached by ssh: the head on the first host, the
# others join it. Every host needs this repository at the same path with `make setup` and
# `pip install -e '.[ray]'` done, and the sweep's workdir on a filesystem all of them mount.
#   scripts/ray/cluster.sh --hosts gpu1,gpu2,gpu3 [--port 6379] [--dir ~/jaxaccel] [--dry-run]
#   scripts/ray/cluster.sh --hosts gpu1,gpu2,gpu3 --stop [--dry-run]
# Then, on any host: jaxaccel sweep --config X.py --workdir /shared/runs/X --engine ray \
#   --address gpu1:6379 --trial-gpus 1
set -euo pipefail
DRY_RUN=0; STOP=0; HOSTS=""; PORT=6379; DIR='~/jaxaccel'
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --stop) STOP=1 ;;
    --hosts) HOSTS="$2"; shift ;;
    --port) PORT="$2"; shift ;;
    --dir) DIR="$2"; shift ;;
    *) echo "cluster.sh: unknown argument '$1'; valid: --hosts, --port, --dir, --stop, --dry-run" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$HOSTS" ]]; then
  echo "usage: cluster.sh --hosts HEAD,WORKER,... [--port P] [--dir D] [--stop] [--dry-run]" >&2
  exit 2
fi
if ! [[ "$PORT" =~ ^[0-9]+$ ]]; then
  echo "cluster.sh: --port '$PORT' is not a port number" >&2; exit 2
fi
IFS=, read -r -a LIST <<< "$HOSTS"
HEAD="${LIST[0]}"

run() {  # print the command; execute it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

if [[ "$STOP" == 1 ]]; then
  for h in "${LIST[@]}"; do run ssh "$h" "cd $DIR && .venv/bin/ray stop"; done
  exit 0
fi
# Ray detects each host's GPUs (--num-gpus defaults to what CUDA sees) and CPUs.
run ssh "$HEAD" "cd $DIR && .venv/bin/ray start --head --port=$PORT --disable-usage-stats"
for h in "${LIST[@]:1}"; do
  run ssh "$h" "cd $DIR && .venv/bin/ray start --address=$HEAD:$PORT --disable-usage-stats"
done
echo "Ray cluster: head $HEAD:$PORT, ${#LIST[@]} nodes; sweep with --engine ray --address $HEAD:$PORT"
