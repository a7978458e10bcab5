"""`jaxaccel bench sweep`: a vectorized sweep against sequential runs of the same K points.

Runs `jaxaccel.sweep.run(experiment, workdir, points=..., vectorize=...)` twice on the same
K learning-rate points of one experiment (default: experiments/digits_lenet5.py, shortened
with overrides), each in a fresh temporary workdir: one point after another in this process,
then all K as one vmapped program. Wall times include everything a user waits for
(compiles, data, evaluation, checkpoints). Skipped with a clear message when the sweep
module or the experiment file is not there.

Owns `bench_sweep`. Imports `bench.timing`, and `jaxaccel.sweep` only at run time (by
importlib); never the CLI.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import tempfile
from typing import Any

from jaxaccel.bench import timing

REQUIRED = ("points", "vectorize", "overrides", "report")


def default_experiment() -> str:
    """experiments/digits_lenet5.py of this checkout (next to the jaxaccel package)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "experiments", "digits_lenet5.py")


def sweep_support() -> tuple[Any, str]:
    """(the jaxaccel.sweep module, "ok") or (None, why the sweep benchmark cannot run)."""
    if importlib.util.find_spec("jaxaccel.sweep") is None:
        return None, "jaxaccel/sweep.py does not exist yet (the sweep issue has not landed)"
    module = importlib.import_module("jaxaccel.sweep")
    run = getattr(module, "run", None)
    params = set(inspect.signature(run).parameters) if callable(run) else set()
    missing = [p for p in REQUIRED if p not in params]
    if missing:
        return None, (f"jaxaccel.sweep.run(experiment, workdir, ...) does not take "
                      f"{', '.join(missing)} yet: no vectorized sweep to compare")
    return module, "ok"


def _skipped(reason: str, points: int) -> dict[str, Any]:
    return {"bench": "sweep", "skipped": True, "reason": reason, "points": points, "notes": [],
            "table": {"title": "sweep", "columns": ["status"], "rows": [[f"skipped: {reason}"]]}}


def bench_sweep(points: int = 4, *, experiment: str | None = None, steps: int = 100) -> dict[str, Any]:
    """Wall time of K learning-rate points run sequentially vs vectorized (`--vectorize`)."""
    if points < 1:
        raise ValueError(f"sweep points={points} must be >= 1")
    if steps < 1:
        raise ValueError(f"sweep steps={steps} must be >= 1")
    module, status = sweep_support()
    if module is None:
        return _skipped(status, points)
    experiment = experiment or default_experiment()
    if not os.path.isfile(experiment):
        return _skipped(f"experiment file {experiment!r} not found", points)
    grid = module.grid("optimizer.lr", [round(10.0 ** (-3.5 + i / max(points - 1, 1)), 6)
                                        for i in range(points)])
    overrides = [f"num_steps={steps}", f"log_every={steps}", f"checkpoint_every={steps}",
                 "progress=False"]
    seconds, failed = {}, {}
    for mode, vectorize in (("sequential", False), ("vectorized", True)):
        with tempfile.TemporaryDirectory(prefix=f"jaxaccel-bench-sweep-{mode}-") as wd:
            result: list[Any] = []
            seconds[mode] = timing.time_once(lambda: result.append(module.run(
                experiment, wd, overrides=overrides, vectorize=vectorize, points=grid, report=False)))
            failed[mode] = [r.name for r in result[0].failed]
    if failed["sequential"] or failed["vectorized"]:
        raise RuntimeError(f"sweep points failed: {failed}")
    speedup = timing.ratio(seconds["sequential"], seconds["vectorized"])
    name = os.path.basename(experiment)
    out = {"bench": "sweep", "skipped": False, "points": points, "experiment": name, "steps": steps,
           "sequential_s": seconds["sequential"], "vectorized_s": seconds["vectorized"],
           "vectorized_speedup": speedup,
           "notes": ["wall time of `jaxaccel sweep` without and with --vectorize, each in a fresh "
                     "workdir: compiles, data, evaluation and checkpoints included"]}
    out["table"] = {"title": f"sweep ({points} learning rates × {steps} steps of {name})",
                    "columns": ["mode", "wall s", "per point s", "speed-up"],
                    "rows": [["sequential", f"{seconds['sequential']:.1f}",
                              f"{seconds['sequential'] / points:.1f}", "1.00×"],
                             ["vectorized (vmap)", f"{seconds['vectorized']:.1f}",
                              f"{seconds['vectorized'] / points:.1f}", f"{speedup:.2f}×"]]}
    return out
