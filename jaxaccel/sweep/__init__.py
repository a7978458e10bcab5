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
in its own sub-workdir: in this process one after the other, in N `jaxaccel train` worker
processes, or all at once as one compiled program. With `--search tpe|random|grid|cmaes`, an
Optuna study samples the experiment's `get_search()` space instead (`sweep.search`, imported
on demand). The package:
  space       building sweeps: grid, seeds, product, zipit, concat, sample, distributions
  points      the point-directory protocol: names, files, statuses
  runners     running the points (in process, workers, vectorized) and the report after
  vectorized  K points as one compiled program on `jaxaccel.stacked`
  ray_engine  the points as Ray tasks on a cluster (`--engine ray`; the `[ray]` extra)
  search      an Optuna study over an experiment's get_search() (`--search`), trial by trial
  report      results.csv / results.md / plots, rebuilt from the point directories

Imports space, points and runners (the API above); the package as a whole imports pipeline,
stacked, loop, state, checkpoint, config and what they stand on; never the CLI or benchmarks.
"""
from jaxaccel.sweep.points import (DONE, ERROR_FILE, FAILED, LOG_FILE, PENDING, POINT_FILE,
                                   RESULTS_FILE, SWEEP_FILE, PointRun, cli_overrides,
                                   format_value, load_sweep, mark_failed, mark_started,
                                   name_value, plan, point_config, point_name, read_error,
                                   status_of, write_point_file, write_sweep_file)
from jaxaccel.sweep.runners import SweepResult, run, run_in_process, run_workers, worker_command
from jaxaccel.sweep.space import (Distribution, Point, choice, concat, grid, intrange,
                                  loguniform, product, sample, seeds, uniform, zipit)

__all__ = [
    "DONE", "ERROR_FILE", "FAILED", "LOG_FILE", "PENDING", "POINT_FILE", "RESULTS_FILE",
    "SWEEP_FILE", "Distribution", "Point", "PointRun", "SweepResult", "choice", "cli_overrides",
    "concat", "format_value", "grid", "intrange", "load_sweep", "loguniform", "mark_failed",
    "mark_started", "name_value", "plan", "point_config", "point_name", "product", "read_error",
    "run", "run_in_process", "run_workers", "sample", "seeds", "status_of", "uniform",
    "worker_command", "write_point_file", "write_sweep_file", "zipit",
]
