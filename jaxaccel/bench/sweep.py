"""`jaxaccel bench sweep`: a vectorized sweep against sequential runs of the same K points;
`jaxaccel bench sweep --search`: TPE + ASHA against the full grid of the same space.

Runs `jaxaccel.sweep.run(experiment, workdir, points=..., vectorize=...)` twice on the same
K learning-rate points of one experiment (default: experiments/digits_lenet5.py, shortened
with overrides), each in a fresh temporary workdir: one point after another in this process,
then all K as one vmapped program. Wall times include everything a user waits for
(compiles, data, evaluation, checkpoints). Skipped with a clear message when the sweep
module or the experiment file is not there.

`bench_search` runs `jaxaccel.sweep.search.run` on an all-choice space
(experiments/search_lenet300_grid.py): the grid once (`--search grid`, no pruning), then TPE +
ASHA with a trial budget over several study seeds, each study in its own workdir; it reports
the best validation accuracy each reached (that trial's test accuracy beside it), the steps it
trained, the median over the seeds and whether the goal was met.

Owns `bench_sweep` and `bench_search`. Imports `bench.timing`, and `jaxaccel.sweep` (and
`jaxaccel.sweep.search`) only at run time; never the CLI.
"""
from __future__ import annotations

import contextlib
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


# ----------------------------------------------------------------------------------------
# `jaxaccel bench sweep --search`: TPE + ASHA against the full grid of the same space
# ----------------------------------------------------------------------------------------
SEARCH_GAP = 0.003      # the goal: within 0.3 points of the grid's best validation accuracy
SEARCH_STEPS = 1 / 3    # ... with at most a third of the grid's steps


def default_search_experiment() -> str:
    """experiments/search_lenet300_grid.py of this checkout (an all-choice space)."""
    return os.path.join(os.path.dirname(default_experiment()), "search_lenet300_grid.py")


def _arm(record: dict, seconds: float) -> dict[str, Any]:
    """What one study reached: its best trial (chosen on validation), steps, trials, time."""
    best = record["best"] or {}
    c = record["counts"]
    return {"best_trial": best.get("number"), "best_params": best.get("params"),
            "best_validation_accuracy": best.get("validation_accuracy"),
            "best_test_accuracy": best.get("test_accuracy"),
            "steps_trained": record["compute"]["steps_trained"],
            "full_steps": record["compute"]["full_steps"],
            "complete": c["complete"], "pruned": c["pruned"], "failed": c["failed"],
            "wall_s": seconds}


def _median_arm(arms: list[dict[str, Any]]) -> dict[str, Any]:
    """The median study by best validation accuracy (the lower middle one for an even count;
    its test accuracy beside it), and the median of the steps each study spent."""
    import statistics
    ranked = sorted(arms, key=lambda a: (a["best_validation_accuracy"] or 0.0,
                                         -a["steps_trained"]))
    mid = ranked[(len(ranked) - 1) // 2]
    return {"best_validation_accuracy": mid["best_validation_accuracy"],
            "best_test_accuracy": mid["best_test_accuracy"], "study_seed": mid["study_seed"],
            "steps_trained": statistics.median(a["steps_trained"] for a in arms),
            "wall_s": statistics.median(a["wall_s"] for a in arms)}


def bench_search(*, experiment: str | None = None, trials: int = 15, seeds: int = 3,
                 steps: int | None = None, workdir: str | None = None,
                 sampler: str = "tpe", pruner: str = "asha") -> dict[str, Any]:
    """TPE + ASHA (`sampler` + `pruner`) with a budget of `trials` trials, over `seeds` study
    seeds, against the full grid of the same all-choice space (`--search grid`, no pruning,
    run once: the training seed is the config's for every trial, so the grid's results do not
    depend on the study seed). Both through `jaxaccel.sweep.search.run`, each study in its own
    workdir under `workdir` (default: a temporary directory, removed after). `steps`: the
    trials' num_steps (default: the experiment's), evaluated every steps // 8.
    Reports each study's best validation accuracy (that trial's test accuracy beside it) and
    the steps it trained, the median over the seeds, and whether the goal was met: within
    0.3 points of the grid's best with at most a third of its steps."""
    if trials < 1 or seeds < 1:
        raise ValueError(f"bench sweep --search: --search-trials {trials} and --search-seeds "
                         f"{seeds} must be >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"bench sweep --search: --search-steps {steps} must be >= 1")
    from jaxaccel.sweep import search
    experiment = experiment or default_search_experiment()
    if not os.path.isfile(experiment):
        raise FileNotFoundError(f"experiment file {experiment!r} not found")
    overrides = ["progress=False"]
    if steps is not None:
        every = max(1, steps // 8)
        overrides += [f"num_steps={steps}", f"eval_every={every}", f"log_every={every}",
                      f"checkpoint_every={steps}"]
    with contextlib.ExitStack() as stack:
        root = workdir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="jaxaccel-bench-search-"))
        grid_wd = os.path.join(root, "grid")
        names = ["grid"] + [f"{sampler}-{pruner}-seed{s}" for s in range(seeds)]
        held = [n for n in names if os.path.exists(os.path.join(root, n))]
        if held:  # a resumed study would time (and count) only what is left of it
            raise ValueError(f"--search-workdir {root} already holds {held[0]}: the benchmark "
                             f"starts its studies afresh, give it an empty or new directory")
        size = search.grid_size(search.plan(experiment, grid_wd, sampler="grid", trials=1,
                                            overrides=overrides))
        studies: dict[str, dict] = {}
        seconds: dict[str, float] = {}
        runs = [("grid", grid_wd, "grid", "none", size, 0)] + [
            (f"{sampler}-{pruner}-seed{s}", os.path.join(root, f"{sampler}-{pruner}-seed{s}"),
             sampler, pruner, trials, s) for s in range(seeds)]
        for name, wd, smp, prn, n, seed in runs:
            out: list[Any] = []
            seconds[name] = timing.time_once(lambda: out.append(search.run(
                experiment, wd, sampler=smp, trials=n, pruner=prn, study_seed=seed,
                overrides=overrides)))
            studies[name] = out[0].record
        grid_record = studies.pop("grid")
    grid = _arm(grid_record, seconds["grid"])
    arms = []
    for s in range(seeds):
        name = f"{sampler}-{pruner}-seed{s}"
        arms.append({"study_seed": s, **_arm(studies[name], seconds[name])})
    if grid["best_validation_accuracy"] is None or any(
            a["best_validation_accuracy"] is None for a in arms):
        raise RuntimeError("a study of the search benchmark ended without a complete trial")
    med = _median_arm(arms)
    grid_vals = sorted((t["validation_accuracy"] for t in grid_record["trials"]
                        if t["state"] == "complete"), reverse=True)
    gap = grid["best_validation_accuracy"] - med["best_validation_accuracy"]
    fraction = med["steps_trained"] / grid["steps_trained"]
    met = gap <= SEARCH_GAP + 1e-9 and fraction <= SEARCH_STEPS + 1e-9
    within = sum(v >= grid["best_validation_accuracy"] - SEARCH_GAP - 1e-9 for v in grid_vals)
    name = os.path.basename(experiment)
    label = f"{sampler.upper() if sampler == 'tpe' else sampler} + {pruner.upper()}"
    out = {"bench": "sweep_search", "skipped": False, "experiment": name,
           "space": grid_record["search_space"], "grid_points": size, "trials": trials,
           "seeds": seeds, "sampler": sampler, "pruner": pruner, "overrides": overrides,
           "grid": grid, "search": arms, "median": med,
           "gap_points": 100 * gap, "steps_fraction": fraction, "goal_met": met,
           "goal": f"median best validation accuracy within {100 * SEARCH_GAP:.1f} points of "
                   f"the grid's best, with at most {SEARCH_STEPS:.0%} of its steps",
           "grid_validation_accuracies": grid_vals,
           "grid_points_within_gap": within,
           "notes": [
               "training seed fixed (the config's) for every trial; the study seed changes "
               "only the sampler's draws (and so which trials the pruner compares); the grid "
               "(no pruning) is run once, its results do not depend on the study seed",
               "steps trained count every trial's steps (a pruned trial's up to where it "
               "stopped); wall s is each study end to end in this process (the grid's "
               "includes the process's one-time start-up: data, first compiles)",
               f"{within} of the grid's {len(grid_vals)} points are within "
               f"{100 * SEARCH_GAP:.1f} points of its best validation accuracy "
               f"(validation accuracies from {100 * grid_vals[-1]:.2f}% to "
               f"{100 * grid_vals[0]:.2f}%)",
               f"goal ({'met' if met else 'not met'}): median best validation accuracy "
               f"{100 * med['best_validation_accuracy']:.2f}% vs the grid's "
               f"{100 * grid['best_validation_accuracy']:.2f}% (gap {100 * gap:.2f} points, "
               f"≤ {100 * SEARCH_GAP:.1f} wanted) with {fraction:.1%} of the grid's steps "
               f"(≤ {SEARCH_STEPS:.1%} wanted)"]}

    def row(study: str, a: dict[str, Any], trials_text: str) -> list[str]:
        return [study, trials_text, f"{100 * a['best_validation_accuracy']:.2f}",
                f"{100 * a['best_test_accuracy']:.2f}", f"{a['steps_trained']:,.0f}",
                f"{a['steps_trained'] / grid['steps_trained']:.1%}", f"{a['wall_s']:.0f}"]

    rows = [row(f"grid ({size} points, no pruning)", grid,
                f"{grid['complete']} complete")]
    rows += [row(f"{label}, study seed {a['study_seed']}", a,
                 f"{a['complete']} complete, {a['pruned']} pruned") for a in arms]
    rows.append(row(f"{label}, median of {seeds}", med, "—"))
    out["table"] = {"title": f"search ({label}, {trials} trials, vs the grid of {name})",
                    "columns": ["study", "trials", "best validation acc %",
                                "its test acc %", "steps trained", "steps vs grid", "wall s"],
                    "rows": rows}
    return out


# ----------------------------------------------------------------------------------------
# `jaxaccel bench sweep --search --vectorize`: K suggestions as one program vs one by one
# ----------------------------------------------------------------------------------------
_SHAPE_KEEPING_SEARCH = '''
import importlib.util
from jaxaccel import sweep

_spec = importlib.util.spec_from_file_location("base_experiment", {path!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
get_config = _base.get_config


def get_search():  # the base experiment's space, less the keys that change shapes
    return {{"optimizer.lr": sweep.loguniform(1e-4, 1e-2),
            "optimizer.weight_decay": sweep.loguniform(1e-6, 1e-2)}}
'''


def bench_vectorized_search(*, experiment: str | None = None, trials: int = 4,
                            steps: int = 300, mode: str = "auto") -> dict[str, Any]:
    """Wall time of a random search of `trials` suggestions trained one by one vs asked at
    once and trained as one program (`--vectorize`), over learning rate and weight decay of
    `experiment`'s config (default experiments/search_lenet300.py); random sampling with one
    study seed asks the same suggestions in both, so their objective values are compared too
    (equal up to float rounding in "vmap" mode, exactly in "loop" mode on one device)."""
    if trials < 2 or steps < 1:
        raise ValueError(f"bench sweep --search --vectorize: --search-trials {trials} must be "
                         f">= 2 and --search-steps {steps} >= 1")
    from jaxaccel.sweep import search
    base = experiment or os.path.join(os.path.dirname(default_experiment()),
                                      "search_lenet300.py")
    if not os.path.isfile(base):
        raise FileNotFoundError(f"experiment file {base!r} not found")
    overrides = ["progress=False", f"num_steps={steps}", f"eval_every={steps}",
                 f"log_every={steps}", f"checkpoint_every={steps}"]
    seconds, values = {}, {}
    with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-vsearch-") as root:
        exp = os.path.join(root, "search_lr_wd.py")
        with open(exp, "w") as f:
            f.write(_SHAPE_KEEPING_SEARCH.format(path=os.path.abspath(base)))
        for arm, how in (("sequential", {}), ("vectorized", {"vectorize": mode,
                                                             "per_program": trials})):
            out: list[Any] = []
            seconds[arm] = timing.time_once(lambda: out.append(search.run(
                exp, os.path.join(root, arm), sampler="random", trials=trials,
                overrides=overrides, **how)))
            values[arm] = {str(sorted(t["params"].items())): t["value"]
                           for t in out[0].record["trials"]}
    diff = max(abs(values["sequential"][k] - values["vectorized"].get(k, float("nan")))
               for k in values["sequential"])
    speedup = timing.ratio(seconds["sequential"], seconds["vectorized"])
    name = os.path.basename(base)
    result = {"bench": "sweep", "search": "vectorized", "skipped": False, "trials": trials,
              "steps": steps, "mode": mode, "experiment": name,
              "sequential_s": seconds["sequential"], "vectorized_s": seconds["vectorized"],
              "vectorized_speedup": speedup, "max_objective_difference": diff,
              "notes": ["wall time of `jaxaccel sweep --search random` without and with "
                        "--vectorize, each a fresh study: compiles, data, evaluation and "
                        "checkpoints included; the same suggestions in both"]}
    result["table"] = {
        "title": f"vectorized search ({trials} suggestions × {steps} steps of {name}, lr and "
                 f"weight decay)",
        "columns": ["mode", "wall s", "per trial s", "speed-up"],
        "rows": [["one by one", f"{seconds['sequential']:.1f}",
                  f"{seconds['sequential'] / trials:.1f}", "1.00×"],
                 [f"one program ({mode})", f"{seconds['vectorized']:.1f}",
                  f"{seconds['vectorized'] / trials:.1f}", f"{speedup:.2f}×"],
                 ["max |objective difference|", f"{diff:.2g}", "", ""]]}
    return result
