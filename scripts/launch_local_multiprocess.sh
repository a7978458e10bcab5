#!/usr/bin/env bash
# Run one experiment as a multi-process (multi-host) JAX job on this machine.
#
#   scripts/launch_local_multiprocess.sh CONFIG WORKDIR [jaxaccel train args ...]
#   e.g. scripts/launch_local_multiprocess.sh experiments/mnist5k_cnn3.py runs/mp \
#            --config.num_steps=200 --config.parallel.strategy=fsdp
#
# Starts NUM_PROCESSES copies of `jaxaccel train`, each simulating DEVICES_PER_PROCESS CPU
# devices, joined by jax.distributed on 127.0.0.1 (gloo CPU collectives): one job of
# NUM_PROCESSES x DEVICES_PER_PROCESS devices, exactly as on a multi-host TPU slice. Each
# process reads only its slice of every global batch; process 0 writes metrics and
# results; checkpoints are written collectively into WORKDIR/checkpoints.
#
# Process 0's output is shown here and kept in LOG_DIR/process_0.log; the others' in
# LOG_DIR/process_<i>.log. SIGTERM/SIGINT to this script go to every process (they save a
# checkpoint together and stop with status 3). If a process dies, the others notice (a
# broken collective, or JAX's heartbeat timeout); whatever is still running GRACE_SECONDS
# later is killed, and this script exits with the first failing status. Running the same
# command again resumes the whole job from the last complete checkpoint.
#
# Environment: NUM_PROCESSES (2), DEVICES_PER_PROCESS (2), PORT (a free one), PYTHON
# (.venv/bin/python if present, else python3), LOG_DIR (WORKDIR/logs), GRACE_SECONDS (30),
# JAXACCEL_HEARTBEAT_TIMEOUT / JAXACCEL_INIT_TIMEOUT (seconds; JAX's defaults 100 / 300).
set -u

if [ $# -lt 2 ]; then
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
config=$1
workdir=$2
shift 2

here=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$here/.venv/bin/python" ]; then PYTHON=$here/.venv/bin/python; else PYTHON=python3; fi
fi
num=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-2}
grace=${GRACE_SECONDS:-30}
log_dir=${LOG_DIR:-$workdir/logs}
if [ -z "${PORT:-}" ]; then
    PORT=$("$PYTHON" -c 'import portpicker; print(portpicker.pick_unused_port())' 2>/dev/null ||
           "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
mkdir -p "$log_dir" || exit 2

say() { echo "launch_local_multiprocess: $*" >&2; }

pids=()
for ((i = 0; i < num; i++)); do
    cmd=("$PYTHON" -m jaxaccel train --config "$config" --workdir "$workdir"
         --coordinator-address "127.0.0.1:$PORT" --num-processes "$num" --process-id "$i"
         --cpu-devices "$devices" "$@")
    if [ "$i" -eq 0 ]; then
        "${cmd[@]}" > >(tee "$log_dir/process_0.log") 2>&1 &
    else
        "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
    fi
    pids+=($!)
done
say "started $num processes x $devices CPU devices (pids ${pids[*]}, coordinator 127.0.0.1:$PORT, logs in $log_dir)"

forward() {  # preemption of the job = preemption of every process
    say "received $1; passing it to every process"
    kill -s "$1" "${pids[@]}" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT

declare -A status=()
first_failure=""
watchdog=""
while [ ${#status[@]} -lt "$num" ]; do
    running=()
    for pid in "${pids[@]}"; do [ -z "${status[$pid]:-}" ] && running+=("$pid"); done
    who=""
    wait -n -p who "${running[@]}"
    rc=$?
    [ -z "$who" ] && continue  # interrupted by a trapped signal: wait again
    status[$who]=$rc
    for ((i = 0; i < num; i++)); do [ "${pids[$i]}" = "$who" ] && id=$i; done
    if [ "$rc" -ne 0 ] && [ -z "$first_failure" ]; then
        first_failure=$rc
        if [ "$rc" -gt 128 ]; then how="was killed by signal $((rc - 128))"; else how="exited with status $rc"; fi
        if [ "$rc" -ne 3 ]; then
            say "process $id $how; the others should stop too (killed in ${grace}s if not)"
            last=$(grep -v '^\s*$' "$log_dir/process_$id.log" 2>/dev/null | tail -n 1)
            [ -n "$last" ] && say "process $id: $last"
            ( sleep "$grace"; kill -9 "${pids[@]}" 2>/dev/null ) &
            watchdog=$!
        fi
    fi
done
[ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
wait 2>/dev/null  # the tee of process 0

if [ -z "$first_failure" ]; then
    say "all $num processes finished"
    exit 0
fi
if [ "$first_failure" -eq 3 ]; then
    say "preempted: checkpoint saved; run the same command again to resume"
    exit 3
fi
say "the job failed; run the same command again to resume from the last complete checkpoint"
exit "$first_failure"
