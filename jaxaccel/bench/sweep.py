"""`jaxaccel bench sweep`: a vectorized sweep against sequential runs of the same K points.

Needs the sweep issue's `jaxaccel.sweep` to provide

    run_points(base_config, points: list[dict[str, Any]], workdir: str, *, mode: str) -> list[dict]

with `mode` in `SWEEP_MODES` including "vmap" and "sequential" (each point a dict of dotted
config overrides, e.g. {"optimizer.lr": 0.01}; one results dict per point). Until it does,
this benchmark is skipped with a message saying what is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import tempfile
from typing import Any

from jaxaccel.bench import timing

REQUIRED = "run_points(base_config, points, workdir, *, mode) and SWEEP_MODES with 'vmap' and 'sequential'"


def sweep_support() -> tuple[Any, str]:
    """(the jaxaccel.sweep module, "ok") or (None, why the sweep benchmark cannot run)."""
    if importlib.util.find_spec("jaxaccel.sweep") is None:
        return None, "jaxaccel/sweep.py does not exist yet (the sweep issue has not landed)"
    module = importlib.import_module("jaxaccel.sweep")
    modes = getattr(module, "SWEEP_MODES", ())
    if not callable(getattr(module, "run_points", None)) or not {"vmap", "sequential"} <= set(modes):
        return None, f"jaxaccel.sweep does not provide {REQUIRED} yet"
    return module, "ok"


def _skipped(reason: str, points: int) -> dict[str, Any]:
    return {"bench": "sweep", "skipped": True, "reason": reason, "points": points, "notes": [reason],
            "table": {"title": "sweep", "columns": ["status"], "rows": [[f"skipped: {reason}"]]}}


def bench_sweep(points: int = 4, *, model: str = "lenet300_100", dataset: str = "digits",
                steps: int = 50, batch_size: int = 64) -> dict[str, Any]:
    """Wall time of K learning-rate points run vectorized vs one after another."""
    if points < 1:
        raise ValueError(f"sweep points={points} must be >= 1")
    module, status = sweep_support()
    if module is None:
        return _skipped(status, points)
    from jaxaccel import config as config_lib

    base = config_lib.default_config()
    base.model.name, base.dataset.name = model, dataset
    base.num_steps, base.batch_size, base.progress = steps, batch_size, False
    base.log_every = base.checkpoint_every = max(steps, 1)
    grid = [{"optimizer.lr": 10.0 ** (-3 + i / max(points - 1, 1))} for i in range(points)]
    seconds = {}
    for mode in ("sequential", "vmap"):
        with tempfile.TemporaryDirectory(prefix=f"jaxaccel-bench-sweep-{mode}-") as wd:
            seconds[mode] = timing.time_once(lambda: module.run_points(base, grid, wd, mode=mode))
    speedup = timing.ratio(seconds["sequential"], seconds["vmap"])
    out = {"bench": "sweep", "skipped": False, "points": points, "model": model, "dataset": dataset,
           "steps": steps, "batch_size": batch_size, "sequential_s": seconds["sequential"],
           "vmap_s": seconds["vmap"], "vmap_speedup": speedup, "notes": []}
    out["table"] = {"title": f"sweep ({points} points × {steps} steps, {model} on {dataset})",
                    "columns": ["mode", "wall s (incl. compile)", "speed-up"],
                    "rows": [["sequential", f"{seconds['sequential']:.1f}", "1.00×"],
                             ["vmap", f"{seconds['vmap']:.1f}", f"{speedup:.2f}×"]]}
    return out
