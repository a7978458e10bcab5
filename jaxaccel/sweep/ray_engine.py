"""Running a sweep's points as Ray tasks (`jaxaccel sweep --engine ray [--address HOST:PORT]`).

Each point is one Ray task that runs the point's `jaxaccel train` command (`worker_command`)
on whichever node Ray schedules it, asking for `trial_cpus` CPUs and `trial_gpus` GPUs, so
one point runs per slot and JAX in it sees only its share (Ray sets CUDA_VISIBLE_DEVICES on
GPU nodes). Workdirs must be on a filesystem every node reaches. The point's results.json
records where it ran (`worker`: host, pid, Ray node id).

Faults: a node that dies takes its task's `jaxaccel train` process with it (it is killed
when the task's worker dies, never left writing beside a retry); Ray retries the task on
another node (`max_retries`), where the point resumes from its last checkpoint. A point that
fails for its own reasons (non-zero exit) is recorded as failed and not retried.

Ray is an optional extra (`pip install -e '.[ray]'`). Imports the sweep's point protocol;
never the runners (they call it), the pipeline (the points train in their own processes).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from typing import Any, Callable, Sequence

from jaxaccel.parallel import RAY_NODE_ENV
from jaxaccel.sweep.points import (DONE, LOG_FILE, PENDING, PointRun, log_tail, mark_failed,
                                   mark_failed_from_log, mark_started, status_of,
                                   write_point_file)

log = logging.getLogger("jaxaccel")

PREEMPTED_EXIT = 3  # `jaxaccel train` saved a checkpoint and stopped (cli.EXIT_PREEMPTED)
PR_SET_PDEATHSIG = 1


def check_address(address: str, timeout: float = 5.0) -> tuple[str, int]:
    """`HOST:PORT` of a running Ray head, reachable from here; one clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--address {address!r} is not HOST:PORT (a Ray head's GCS address, "
                         f"e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"--address {address!r}: no Ray head answers there ({e}); start "
                              f"one with `ray start --head --port={port}`") from None
    return host, int(port)


def check_resources(trial_cpus: float, trial_gpus: float) -> None:
    """Each trial asks Ray for > 0 CPUs and >= 0 GPUs."""
    if not trial_cpus > 0 or not trial_gpus >= 0:
        raise ValueError(f"--trial-cpus={trial_cpus} must be > 0 and --trial-gpus={trial_gpus} "
                         f">= 0")


def _die_with_parent() -> None:
    """In the child: SIGKILL it when the Ray worker that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_command(command: Sequence[str], log_path: str) -> dict[str, Any]:
    """The body of a point's Ray task: run `command` here, its output to `log_path`; returns
    where it ran and its exit status."""
    import ray
    node = ray.get_runtime_context().get_node_id()
    env = {**os.environ, RAY_NODE_ENV: node}
    with open(log_path, "a") as logf:
        logf.write(f"# on {socket.gethostname()} (Ray node {node}): {' '.join(command)}\n")
        logf.flush()
        proc = subprocess.Popen(list(command), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        returncode = proc.wait()
    return {"host": socket.gethostname(), "pid": proc.pid, "ray_node_id": node,
            "returncode": returncode}


@contextlib.contextmanager
def connected(address: str | None):
    """Ray connected to the cluster at `address`, or a local Ray started (and stopped) here."""
    import ray
    if address:
        check_address(address)
    ray.init(address=address or None, logging_level="ERROR", log_to_driver=False,
             include_dashboard=False if not address else None)
    try:
        yield ray
    finally:
        ray.shutdown()


def task_for(ray: Any, trial_cpus: float, trial_gpus: float, max_retries: int = 3) -> Any:
    """The Ray remote function running one command (`run_command`) with these resources;
    retried on another node when its node dies, never for the command's own failure."""
    return ray.remote(run_command).options(num_cpus=trial_cpus, num_gpus=trial_gpus,
                                           max_retries=max_retries, retry_exceptions=False)


def slots(ray: Any, trial_cpus: float, trial_gpus: float) -> int:
    """How many tasks of these resources the connected cluster runs at once (at least 1)."""
    total = ray.cluster_resources()
    n = int(total.get("CPU", 0) // trial_cpus)
    if trial_gpus > 0:
        n = min(n, int(total.get("GPU", 0) // trial_gpus))
    return max(n, 1)


def run_points(runs: Sequence[PointRun], command_of: Callable[[PointRun], list[str]], *,
               address: str | None = None, trial_cpus: float = 1.0, trial_gpus: float = 0.0,
               max_retries: int = 3, on_change: Callable[[], None] = lambda: None,
               poll_seconds: float = 0.5) -> None:
    """Train `runs` as Ray tasks (each running `command_of(run)`, its `jaxaccel train` command)
    on the cluster at `address` (or a local Ray); statuses are updated as tasks finish
    (`on_change` after each)."""
    check_resources(trial_cpus, trial_gpus)
    with connected(address) as ray:
        task = task_for(ray, trial_cpus, trial_gpus, max_retries)
        pending: dict[Any, tuple[PointRun, float]] = {}
        for run in runs:
            mark_started(run, engine="ray", address=address or "local")
            log_path = os.path.join(run.workdir, LOG_FILE)
            open(log_path, "w").close()
            ref = task.remote(command_of(run), log_path)
            pending[ref] = (run, time.perf_counter())
        log.info("sweep: %d points submitted to Ray (%s)", len(pending), address or "local")
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_seconds)
            for ref in ready:
                run, t0 = pending.pop(ref)
                run.seconds = time.perf_counter() - t0
                try:
                    where = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - retries used up: the point failed
                    mark_failed(run, f"Ray task failed: {type(e).__name__}: {e}",
                                log_tail(os.path.join(run.workdir, LOG_FILE)))
                    log.error("sweep point %s failed on Ray: %s", run.name, run.error)
                    on_change()
                    continue
                write_point_file(run, engine="ray", address=address or "local",
                                 worker={k: where[k] for k in ("host", "pid", "ray_node_id")})
                code = where["returncode"]
                if code == 0 and status_of(run.workdir, run.config) == DONE:
                    run.status = DONE
                elif code == PREEMPTED_EXIT:
                    run.status = PENDING  # it checkpointed; the next run resumes it
                else:
                    mark_failed_from_log(run, code)
                    log.error("sweep point %s failed: %s", run.name, run.error)
                on_change()
