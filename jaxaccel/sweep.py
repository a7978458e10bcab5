r"""Sweeps: many runs of one experiment, each with a few config keys changed.

An experiment file may expose `get_sweep()` next to `get_config()`; it returns a list of
points, each a dict of dotted config keys -> values, usually built with the helpers here
(big_vision's `get_hyper` style):

    from jaxaccel import sweep

    def get_sweep():
        return sweep.product(sweep.grid("optimizer.lr", [1e-3, 3e-3]),
                             sweep.grid("model.width", [0.5, 1.0]),
                             sweep.seeds(2))

`jaxaccel sweep --config X.py --workdir runs/X [--workers N | --vectorize]` runs every point
in its own sub-workdir `runs/X/<point name>` (e.g. `model.width=0.5,optimizer.lr=0.001,seed=0`):
in this process one after the other, in N `jaxaccel train` worker processes, or all at once
as one compiled program (`jaxaccel.vsweep`). State lives only in the files, so a re-run
skips finished points (`results.json` exists) and resumes unfinished ones from their
checkpoints. A failing point gets `error.txt` and the others go on. `runs/X/sweep.json`
lists the points and their statuses; `jaxaccel report runs/X` aggregates them.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Sequence

import ml_collections
import numpy as np

from jaxaccel import config as config_lib
from jaxaccel import io

log = logging.getLogger("jaxaccel")

Point = dict[str, Any]

POINT_FILE = "point.json"      # the point's overrides (and how it ran), written before it runs
ERROR_FILE = "error.txt"       # first line: the error in one line; then the traceback/log tail
RESULTS_FILE = "results.json"  # written by training when a point is finished
SWEEP_FILE = "sweep.json"      # the sweep's points and statuses (top-level workdir)
LOG_FILE = "log.txt"           # worker processes' output

DONE, FAILED, PENDING = "done", "failed", "pending"
PREEMPTED_EXIT = 3  # `jaxaccel train` saved a checkpoint and stopped (cli.EXIT_PREEMPTED)


# ----------------------------------------------------------------------------------------
# Building sweeps
# ----------------------------------------------------------------------------------------
def grid(key: str, values: Iterable[Any]) -> list[Point]:
    """One point per value of `key`."""
    values = list(values)
    if not values:
        raise ValueError(f"grid({key!r}, []): no values")
    return [{key: v} for v in values]


def seeds(n: int, *, start: int = 0, key: str = "seed") -> list[Point]:
    """`n` seed repeats (seed = start .. start+n-1); results group over them (mean ± std)."""
    if n <= 0:
        raise ValueError(f"seeds(n={n}): n must be positive")
    return grid(key, range(start, start + n))


def _merge(points: Sequence[Point]) -> Point:
    out: Point = {}
    for p in points:
        clash = set(out) & set(p)
        if clash:
            raise ValueError(f"sweep key {sorted(clash)[0]!r} is set twice in one point")
        out.update(p)
    return out


def product(*sweeps: Sequence[Point]) -> list[Point]:
    """Every combination of the sweeps' points (the first sweep varies slowest)."""
    return [_merge(combo) for combo in itertools.product(*sweeps)]


def zipit(*sweeps: Sequence[Point]) -> list[Point]:
    """Point i of every sweep merged into one point; the sweeps must have equal lengths."""
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"zipit: sweeps have different lengths {sorted(lengths)}")
    return [_merge(combo) for combo in builtins.zip(*sweeps)]


def concat(*sweeps: Sequence[Point]) -> list[Point]:
    """The points of every sweep, one list after the other."""
    return [dict(p) for s in sweeps for p in s]


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A random value for `sample`: uniform, log-uniform or a choice among values."""
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()
    digits: int = 3

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "uniform":
            x = rng.uniform(self.low, self.high)
        else:
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return float(f"{x:.{self.digits}g}")  # short, readable point names


def uniform(low: float, high: float, *, digits: int = 3) -> Distribution:
    """Uniform in [low, high], rounded to `digits` significant digits."""
    if not low < high:
        raise ValueError(f"uniform({low}, {high}): need low < high")
    return Distribution("uniform", float(low), float(high), digits=digits)


def loguniform(low: float, high: float, *, digits: int = 3) -> Distribution:
    """Log-uniform in [low, high] (both > 0), e.g. learning rates."""
    if not 0 < low < high:
        raise ValueError(f"loguniform({low}, {high}): need 0 < low < high")
    return Distribution("loguniform", float(low), float(high), digits=digits)


def choice(values: Iterable[Any]) -> Distribution:
    """One of `values`, uniformly."""
    values = tuple(values)
    if not values:
        raise ValueError("choice([]): no values")
    return Distribution("choice", values=values)


def sample(space: dict[str, Distribution | Sequence[Any]], n: int, *,
           seed: int = 0) -> list[Point]:
    """`n` random points; each key draws from its Distribution (a list means `choice`).

    Deterministic in `seed`, so a re-run of the sweep finds the same points.
    """
    if n <= 0:
        raise ValueError(f"sample(n={n}): n must be positive")
    dists = {k: d if isinstance(d, Distribution) else choice(d) for k, d in space.items()}
    rng = np.random.default_rng(seed)
    return [{k: d.draw(rng) for k, d in dists.items()} for _ in range(n)]


# ----------------------------------------------------------------------------------------
# Points: names, values on the command line, configs
# ----------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+\-]")
_MAX_NAME = 120


def name_value(v: Any) -> str:
    """A value as it appears in point names and plot labels (`0.001`, `true`, `100-200`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "-".join(name_value(x) for x in v)
    return str(v)


def point_name(point: Point) -> str:
    """Stable, filesystem-safe sub-workdir name: `key=value` pairs sorted by key.

    E.g. `model.width=0.5,optimizer.lr=0.001,seed=0`; `default` for the empty point. Names
    longer than 120 characters are cut and end in a hash of the full point.
    """
    if not point:
        return "default"
    name = ",".join(f"{k}={name_value(point[k])}" for k in sorted(point))
    name = _UNSAFE.sub("_", name)
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()
        name = name[:_MAX_NAME - 9] + "~" + digest[:8]
    return name


def format_value(value: Any) -> str:
    """`value` as text that `config.parse_value` turns back into the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        value = tuple(value)
    text = repr(value)
    if config_lib.parse_value(text) != value:
        raise ValueError(f"sweep value {value!r} cannot be passed on the command line")
    return text


def cli_overrides(point: Point) -> list[str]:
    """`--config.key=value` arguments of a point (what a worker process is given)."""
    return [f"--config.{k}={format_value(v)}" for k, v in point.items()]


def point_config(base: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
    """A copy of `base` with the point's overrides set (unknown keys/bad types: ConfigError).

    A deep copy: `to_dict()` would share the stage ConfigDicts inside `config.stages`, so
    one point's `stages.1.prune.sparsity` would leak into every other point.
    """
    config = copy.deepcopy(base)
    for key, value in point.items():
        config_lib.set_value(config, key, value)
    return config


def load_sweep(path: str) -> list[Point]:
    """The points of an experiment file's `get_sweep()` (checked to be dicts of str keys)."""
    module = config_lib.import_experiment(path)  # the import get_config() came from
    if not callable(getattr(module, "get_sweep", None)):
        raise config_lib.ConfigError(f"{path!r} has no get_sweep() function")
    points = list(config_lib.call_experiment(path, module.get_sweep))
    for i, p in enumerate(points):
        if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
            raise config_lib.ConfigError(f"get_sweep() point {i} is {p!r}, not a dict of "
                                         f"dotted config keys")
    if not points:
        raise config_lib.ConfigError(f"{path!r}: get_sweep() returned no points")
    return points


@dataclasses.dataclass
class PointRun:
    """One point of a sweep: its overrides, name, config and where it runs."""
    overrides: Point
    name: str
    config: ml_collections.ConfigDict
    workdir: str
    status: str = PENDING
    error: str = ""
    seconds: float | None = None

    def summary(self) -> dict:
        out = {"name": self.name, "overrides": self.overrides, "status": self.status}
        if self.error:
            out["error"] = self.error
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 2)
        return out


def plan(base: ml_collections.ConfigDict, points: Sequence[Point], workdir: str) -> list[PointRun]:
    """Configs and sub-workdirs of all points, checked before anything runs.

    A bad key or value in any point raises ConfigError naming the point; so does a point
    whose sub-workdir holds a different experiment (e.g. the sweep was re-run with other
    `--config.*` overrides: `jaxaccel train` would refuse it too). Two points with the
    same name raise ValueError.
    """
    runs, seen = [], {}
    for i, point in enumerate(points):
        name = point_name(point)
        if name in seen:
            raise ValueError(f"sweep points {seen[name]} and {i} are the same point {name!r}")
        seen[name] = i
        try:
            config = point_config(base, point)
            config_lib.validate(config)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"sweep point {name!r}: {e}") from None
        runs.append(PointRun(dict(point), name, config, os.path.join(workdir, name)))
    for run in runs:
        saved = _saved_config(run.workdir)
        diff = config_lib.differences(saved, run.config) if saved is not None else []
        if diff:
            raise config_lib.ConfigError(
                f"sweep point {run.name!r}: its workdir holds a different experiment "
                f"({'; '.join(diff[:3])}{' …' if len(diff) > 3 else ''}); use another "
                f"--workdir")
        run.status = status_of(run.workdir, run.config)
    return runs


# ----------------------------------------------------------------------------------------
# Status files
# ----------------------------------------------------------------------------------------
def status_of(subdir: str, config: ml_collections.ConfigDict | None = None) -> str:
    """done (results.json), failed (error.txt) or pending.

    With `config`, a point is done only if it also ran that config's number of steps
    (`num_steps` may grow between runs: training then continues from the checkpoint).
    """
    if os.path.isfile(os.path.join(subdir, RESULTS_FILE)):
        saved = _saved_config(subdir) if config is not None else None
        if saved is None or saved.num_steps == config.num_steps:
            return DONE
    if os.path.isfile(os.path.join(subdir, ERROR_FILE)):
        return FAILED
    return PENDING


def _saved_config(subdir: str) -> ml_collections.ConfigDict | None:
    path = os.path.join(subdir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return config_lib.from_json(f.read())


def read_error(subdir: str) -> str:
    """The one-line error recorded for a failed point ('' if none)."""
    path = os.path.join(subdir, ERROR_FILE)
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return f.readline().strip()


def write_point_file(run: PointRun, **how: Any) -> None:
    """point.json: the point's name and overrides, and how this attempt runs (`how`, e.g.
    `concurrent_workers`: what the report needs to judge its throughput)."""
    os.makedirs(run.workdir, exist_ok=True)
    io.write_json(os.path.join(run.workdir, POINT_FILE),  # key order kept: the table's order
                  {"name": run.name, "overrides": run.overrides, **how}, sort_keys=False)


def mark_started(run: PointRun, **how: Any) -> None:
    """Write point.json (`how`: see write_point_file; a previous attempt's is dropped);
    clear a previous attempt's error and stale (shorter) results."""
    write_point_file(run, **how)
    for name in (ERROR_FILE, RESULTS_FILE):
        path = os.path.join(run.workdir, name)
        if os.path.exists(path):
            os.remove(path)


def mark_failed(run: PointRun, message: str, details: str = "") -> None:
    """Record a failure: one-line message, then details (traceback or log tail)."""
    run.status, run.error = FAILED, " ".join(message.split()) or "failed"
    os.makedirs(run.workdir, exist_ok=True)
    io.write_text(os.path.join(run.workdir, ERROR_FILE), run.error + "\n\n" + details)


def write_sweep_file(workdir: str, runs: Sequence[PointRun], *, experiment: str = "",
                     overrides: Sequence[str] = (), mode: str = "") -> None:
    """`workdir/sweep.json`: what the sweep is and every point's status."""
    counts = {s: sum(r.status == s for r in runs) for s in (DONE, FAILED, PENDING)}
    body = {"experiment": os.path.abspath(experiment) if experiment else "",
            "overrides": list(overrides), "mode": mode, "counts": counts,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "points": [r.summary() for r in runs]}
    os.makedirs(workdir, exist_ok=True)
    io.write_json(os.path.join(workdir, SWEEP_FILE), body)



# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------
def run_in_process(run: PointRun, train_fn: Callable | None = None) -> None:
    """Train one point here; any exception (but preemption/Ctrl-C) marks it failed."""
    from jaxaccel.preemption import Preempted
    if train_fn is None:
        from jaxaccel.train import train as train_fn
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
                    tail = _log_tail(os.path.join(run.workdir, LOG_FILE))
                    mark_failed(run, _last_error_line(tail, proc.returncode), tail)
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


def _log_tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _last_error_line(tail: str, returncode: int) -> str:
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("jaxaccel: error:"):
            return line[len("jaxaccel: error:"):].strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return f"exit status {returncode}" + (f": {lines[-1]}" if lines else "")


@dataclasses.dataclass
class SweepResult:
    """What `run` did: every point with its final status."""
    runs: list[PointRun]
    skipped: list[str]

    @property
    def failed(self) -> list[PointRun]:
        return [r for r in self.runs if r.status == FAILED]


def run(experiment: str, workdir: str, *, overrides: Sequence[str] = (), workers: int = 0,
        vectorize: bool | str = False, points: Sequence[Point] | None = None,
        report: bool = True) -> SweepResult:
    """Run (or finish) the sweep of `experiment` in `workdir`.

    `overrides` (`key=value` strings) apply to every point. `workers` > 0 runs that many
    `jaxaccel train` processes; `vectorize` (True or a `vsweep` mode: "auto", "vmap",
    "loop") trains the pending points as one compiled program. Finished points are
    skipped; failed and unfinished points run (again).
    """
    if workers and vectorize:
        raise ValueError("choose either --workers or --vectorize, not both")
    base = config_lib.load_experiment(experiment, list(overrides))
    points = load_sweep(experiment) if points is None else list(points)
    runs = plan(base, points, workdir)
    if workers:  # each point must survive the trip through the command line
        for r in runs:
            cli_overrides(r.overrides)
    vmode = ("auto" if vectorize is True else vectorize) if vectorize else None
    mode = (f"vectorize={vmode}" if vmode else f"workers={workers}" if workers
            else "sequential")
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
            from jaxaccel import vsweep
            vsweep.run_points(todo, mode=vmode, on_change=save)
        elif workers and todo:
            run_workers(experiment, todo, overrides, workers, on_change=save)
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
        from jaxaccel import report as report_lib
        report_lib.build(workdir)
    return SweepResult(runs, skipped)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Extra --config.KEY=VALUE arguments apply to every point. Exit status: 0 all "
                "points done, 1 some failed, 2 bad input, 3 preempted.")
    p.add_argument("--config", required=True, help="experiment file with get_config() and "
                   "get_sweep()")
    p.add_argument("--workdir", required=True, help="the sweep's directory; one sub-workdir "
                   "per point")
    p.add_argument("--workers", type=int, default=0,
                   help="run points in N `jaxaccel train` processes (default: in this process)")
    p.add_argument("--vectorize", nargs="?", const="auto", default=None,
                   choices=("auto", "vmap", "loop"),
                   help="train all pending points as one compiled program (only keys that do "
                        "not change shapes may vary); vmap: batched over the points (GPU/TPU), "
                        "loop: one point after another inside the program (CPU); auto picks")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulate N CPU devices (sets parallel.cpu_devices)")
    p.add_argument("--no-report", action="store_true", help="skip results.csv/md and plots")


def run_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxaccel import parallel
    if args.workers < 0:
        raise ValueError(f"--workers={args.workers} must be >= 0")
    overrides = list(overrides)
    if args.cpu_devices is not None:
        overrides.append(f"parallel.cpu_devices={args.cpu_devices}")
        if not args.workers:
            parallel.set_cpu_devices(args.cpu_devices)  # before the backend starts
    result = run(args.config, args.workdir, overrides=overrides, workers=args.workers,
                 vectorize=args.vectorize, report=not args.no_report)
    if not args.no_report:  # the table of results.md, so the results are seen at once
        from jaxaccel import report as report_lib
        print("\n".join(report_lib.results_table(report_lib.collect(args.workdir))) + "\n")
    done = sum(r.status == DONE for r in result.runs)
    print(f"sweep: {done}/{len(result.runs)} points done ({len(result.skipped)} finished "
          f"before), {len(result.failed)} failed; workdir={args.workdir}")
    for r in result.failed:
        print(f"  failed {r.name}: {r.error}")
    return 1 if result.failed else 0
