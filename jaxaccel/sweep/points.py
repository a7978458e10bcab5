"""The point-directory protocol: how a sweep's points live on disk.

Every point runs in its own sub-workdir `WORKDIR/<point name>` (e.g.
`model.width=0.5,optimizer.lr=0.001,seed=0`) holding `point.json` (its overrides, written
before it runs, and how it ran), then what `jaxaccel train` writes (`config.json`,
`results.json` when finished, checkpoints, metrics) or `error.txt` if it failed;
`WORKDIR/sweep.json` lists the points and their statuses. State lives only in these files:
any process (the sweep, a worker, `jaxaccel report`) reads a point's status from them.
Imports config, io and `sweep.space`; never the pipeline, the loop, state or the CLI.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any, Sequence

import ml_collections

from jaxaccel import config as config_lib
from jaxaccel import io
from jaxaccel.sweep.space import Point
from jaxaccel.workdir import CONFIG_FILE, RESULTS_FILE  # noqa: F401 - RESULTS_FILE: a point is done when it exists

POINT_FILE = "point.json"      # the point's overrides (and how it ran), written before it runs
ERROR_FILE = "error.txt"       # first line: the error in one line; then the traceback/log tail
SWEEP_FILE = "sweep.json"      # the sweep's points and statuses (top-level workdir)
LOG_FILE = "log.txt"           # worker processes' output

DONE, FAILED, PENDING = "done", "failed", "pending"



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
    path = os.path.join(subdir, CONFIG_FILE)
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


def log_tail(path: str, lines: int = 40) -> str:
    """The last `lines` lines of a point's log (LOG_FILE)."""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def last_error_line(tail: str, returncode: int) -> str:
    """The one-line error of a failed `jaxaccel train` process, from its log's tail."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("jaxaccel: error:"):
            return line[len("jaxaccel: error:"):].strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return f"exit status {returncode}" + (f": {lines[-1]}" if lines else "")


def mark_failed_from_log(run: PointRun, returncode: int, prefix: str = "") -> None:
    """Record a point whose process failed: its error line and its log's tail."""
    tail = log_tail(os.path.join(run.workdir, LOG_FILE))
    mark_failed(run, prefix + last_error_line(tail, returncode), tail)


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
