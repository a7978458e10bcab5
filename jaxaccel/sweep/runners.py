"""Running a sweep's points: in this process, in `jaxaccel train` worker processes, or as one
vectorized program (`sweep.vectorized`), then the report (`sweep.report`).

`run(experiment, workdir)` plans every point (`points.plan`: bad keys fail before anything
runs), skips finished ones, runs the others and rebuilds the report; a failing point gets
`error.txt` and the others go on.

Imports pipeline (to train a point here), config, preemption and the sweep package's other
modules; never the CLI or benchmarks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Sequence

from jaxaccel import config as config_lib
from jaxaccel.sweep.points import (DONE, FAILED, LOG_FILE, PENDING, Point, PointRun,
                                       cli_overrides, load_sweep, mark_failed,
                                       mark_failed_from_log, mark_started,
                                       plan, read_error, status_of, write_point_file,
                                       write_sweep_file)

log = logging.getLogger("jaxaccel")

PREEMPTED_EXIT = 3  # `jaxaccel train` saved a checkpoint and stopped (cli.EXIT_PREEMPTED)


def run_in_process(run: PointRun, train_fn: Callable | None = None) -> None:
    """Train one point here; any exception (but preemption/Ctrl-C) marks it failed."""
    from jaxaccel.preemption import Preempted
    if train_fn is None:
        from jaxaccel.pipeline import train as train_fn
    mark_started(run)
    t0 = time.perf_counter()
    try:
        train_fn(run.config, run.workdir)
    except Preempted:
        raise
    except Exception as e:  # noqa: BLE001 - a point's failure must not stop the sweep
        mark_failed(run, f"{type(e).__name__}: {e}", traceback.format_exc())
        log.error("sweep point %s failed: %s", run.name, run.error)
    else:
        run.status = DONE
    run.seconds = time.perf_counter() - t0


def worker_command(experiment: str, run: PointRun, base_overrides: Sequence[str]) -> list[str]:
    """The `jaxaccel train` command line that trains one point in its own process."""
    return [sys.executable, "-m", "jaxaccel", "train", "--config", os.path.abspath(experiment),
            "--workdir", os.path.abspath(run.workdir),
            *[f"--config.{o}" for o in base_overrides], *cli_overrides(run.overrides),
            "--config.progress=false"]


def run_workers(experiment: str, runs: Sequence[PointRun], base_overrides: Sequence[str],
                workers: int, on_change: Callable[[], None] = lambda: None,
                poll_seconds: float = 0.2) -> None:
    """Train the points in up to `workers` concurrent `jaxaccel train` processes.

    Each process writes its output to `<sub-workdir>/log.txt`; a non-zero exit marks the
    point failed with the process's last error line (exit 3, preempted: left pending).
    Each point's point.json records `concurrent_workers`: the most worker processes (itself
    included) that ran at once while it trained, since they share the machine's cores and
    its measured throughput is lower than alone.
    Ctrl-C or SIGTERM stops the workers with SIGTERM (they checkpoint) and re-raises as
    KeyboardInterrupt.
    """
    queue, running = list(runs), {}
    peaks: dict[str, int] = {}  # point name -> most processes running at once during it
    stack = contextlib.ExitStack()
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        stack.callback(signal.signal, signal.SIGTERM, previous)
    try:
        while queue or running:
            while queue and len(running) < workers:
                run = queue.pop(0)
                peaks[run.name] = len(running) + 1
                mark_started(run, concurrent_workers=peaks[run.name])
                logf = open(os.path.join(run.workdir, LOG_FILE), "w")
                cmd = worker_command(experiment, run, base_overrides)
                logf.write(" ".join(cmd) + "\n")
                logf.flush()
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
                running[proc] = (run, logf, time.perf_counter())
                for other, _, _ in running.values():  # recorded now: a kill loses nothing
                    if len(running) > peaks[other.name]:
                        peaks[other.name] = len(running)
                        write_point_file(other, concurrent_workers=len(running))
                log.info("sweep: started %s (pid %d)", run.name, proc.pid)
            time.sleep(poll_seconds)
            for proc in [p for p in running if p.poll() is not None]:
                run, logf, t0 = running.pop(proc)
                logf.close()
                run.seconds = time.perf_counter() - t0
                if proc.returncode == 0 and status_of(run.workdir, run.config) == DONE:
                    run.status = DONE
                elif proc.returncode == PREEMPTED_EXIT:
                    run.status = PENDING  # it checkpointed; the next run resumes it
                else:
                    mark_failed_from_log(run, proc.returncode)
                    log.error("sweep point %s failed: %s", run.name, run.error)
                on_change()
    finally:  # Ctrl-C / errors: stop the workers we started (they checkpoint on SIGTERM)
        for proc, (run, logf, _) in running.items():
            proc.terminate()
        for proc, (run, logf, _) in running.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
        stack.close()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@dataclasses.dataclass
class SweepResult:
    """What `run` did: every point with its final status."""
    runs: list[PointRun]
    skipped: list[str]

    @property
    def failed(self) -> list[PointRun]:
        return [r for r in self.runs if r.status == FAILED]


ENGINES = ("local", "ray")


def run(experiment: str, workdir: str, *, overrides: Sequence[str] = (), workers: int = 0,
        vectorize: bool | str = False, points: Sequence[Point] | None = None,
        report: bool = True, engine: str = "local", address: str | None = None,
        trial_cpus: float = 1.0, trial_gpus: float = 0.0) -> SweepResult:
    """Run (or finish) the sweep of `experiment` in `workdir`.

    `overrides` (`key=value` strings) apply to every point. `workers` > 0 runs that many
    `jaxaccel train` processes; `vectorize` (True or a `sweep.vectorized` mode: "auto", "vmap",
    "loop") trains the pending points as one compiled program; `engine="ray"` runs each
    point as a Ray task on the cluster at `address` (or a local Ray), `trial_cpus` /
    `trial_gpus` per point (`sweep.ray_engine`). Finished points are skipped; failed and
    unfinished points run (again).
    """
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r} is not valid; choose one of: {', '.join(ENGINES)}")
    if workers and vectorize:
        raise ValueError("choose either --workers or --vectorize, not both")
    if engine == "ray" and (workers or vectorize):
        raise ValueError(f"--engine ray schedules the points itself (one per --trial-cpus / "
                         f"--trial-gpus slot); {'--workers' if workers else '--vectorize'} is "
                         f"not used with it")
    if address and engine != "ray":
        raise ValueError(f"--address {address!r} names a Ray cluster: add --engine ray")
    if engine == "ray":
        from jaxaccel.sweep import ray_engine
        ray_engine.check_resources(trial_cpus, trial_gpus)
        if address:
            ray_engine.check_address(address)  # before anything is written
    base = config_lib.load_experiment(experiment, list(overrides))
    points = load_sweep(experiment) if points is None else list(points)
    runs = plan(base, points, workdir)
    if workers or engine == "ray":  # each point must survive the trip through the command line
        for r in runs:
            cli_overrides(r.overrides)
    vmode = ("auto" if vectorize is True else vectorize) if vectorize else None
    mode = (f"vectorize={vmode}" if vmode else f"workers={workers}" if workers
            else f"ray={address or 'local'}" if engine == "ray" else "sequential")
    save = lambda: write_sweep_file(workdir, runs, experiment=experiment,  # noqa: E731
                                    overrides=overrides, mode=mode)
    skipped = [r.name for r in runs if r.status == DONE]
    todo = [r for r in runs if r.status != DONE]
    for r in runs:
        if r.status == FAILED:
            r.error = read_error(r.workdir)
    save()
    log.info("sweep: %d points, %d finished already, %d to run (%s)", len(runs), len(skipped),
             len(todo), mode)
    try:
        if vectorize and todo:
            from jaxaccel.sweep import vectorized
            vectorized.run_points(todo, mode=vmode, on_change=save)
        elif workers and todo:
            run_workers(experiment, todo, overrides, workers, on_change=save)
        elif engine == "ray" and todo:
            ray_engine.run_points(todo, lambda r: worker_command(experiment, r, overrides),
                                  address=address,
                                  trial_cpus=trial_cpus, trial_gpus=trial_gpus, on_change=save)
        else:
            for r in todo:
                log.info("sweep: running %s", r.name)
                run_in_process(r)
                save()
    finally:
        for r in runs:  # the files are the truth (a worker may have finished as we stopped)
            r.status = status_of(r.workdir, r.config)
            if r.status == FAILED and not r.error:
                r.error = read_error(r.workdir)
        save()
    if report:
        from jaxaccel.sweep import report as report_lib
        report_lib.build(workdir)
    return SweepResult(runs, skipped)
