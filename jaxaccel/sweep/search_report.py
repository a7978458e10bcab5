"""Reports of an Optuna search: `jaxaccel report W` on a `jaxaccel sweep --search` workdir.

A workdir is a search when it holds `search.json` or `study.db`. The record is rebuilt from
the study in `W/study.db` when it is there (the truth: trials still running included), with
`sweep.search.record`; otherwise (a study in another `--storage`) it is `search.json`, which
the search rewrites after every trial. Each trial's `metrics.jsonl` gives the evaluations the
pruner saw. Writes, in W:
  * `search.md`    — the sampler, pruner and objective; the best trial (selected on the
                     validation objective; its test accuracy beside, never selecting) as a
                     ready-to-run `jaxaccel train ... --config.k=v` command; the compute used
                     (steps trained by all trials vs as many full runs); the trials table
                     (state, objective value, validation and test accuracy, steps trained,
                     params); parameter importances; the plots;
  * `trials.csv`   — one row per trial;
  * `search_history.png`     — the objective per trial with the best so far, and the
                               validation curve of every trial (pruned ones end early);
  * `search_importances.png` — Optuna's fANOVA importance of each key that varies among the
                               complete trials (only with ≥ 2 complete trials and ≥ 1 such key);
  * `search_vs_<key>.png`    — per searched key that takes more than one value: the objective
                               (validation; pruned trials at their last evaluation) in one panel,
                               test accuracy (reported only) in the other.
Plots that no longer apply are removed when the report is rebuilt.

Owns `is_search`, `load`, `importances` and `build`. Imports optuna, `sweep.search` (the
record and its constants), `sweep.report` (csv and figure helpers), `sweep.points`, config,
metrics and io; never the pipeline, the loop or the CLI.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import sqlite3
import statistics
from typing import Any, Callable, Sequence

from jaxaccel import config as config_lib
from jaxaccel import io
from jaxaccel.sweep import report as sweep_report
from jaxaccel.sweep import search
from jaxaccel.sweep.points import format_value, name_value
from jaxaccel.sweep.space import Distribution, choice

log = logging.getLogger("jaxaccel")

SEARCH_MD = "search.md"
TRIALS_CSV = "trials.csv"
HISTORY_PLOT = "search_history.png"
IMPORTANCES_PLOT = "search_importances.png"
KEY_PLOT_PREFIX = "search_vs_"
METRIC_COLUMNS = ("validation_accuracy", "validation_loss", "test_accuracy", "test_loss")


def is_search(workdir: str) -> bool:
    """Whether `workdir` holds a search (`search.json` or `study.db`)."""
    return any(os.path.isfile(os.path.join(workdir, f))
               for f in (search.SEARCH_FILE, search.STUDY_DB))


# ----------------------------------------------------------------------------------------
# The record: the study in W/study.db, else search.json
# ----------------------------------------------------------------------------------------
def load(workdir: str) -> dict[str, Any]:
    """The search's record (what search.json holds, `sweep.search.record`), rebuilt from
    `W/study.db` when it is there and is the search's storage, else read from
    `W/search.json`. ValueError (one line) when neither can be read."""
    saved_path = os.path.join(workdir, search.SEARCH_FILE)
    saved = None
    if os.path.isfile(saved_path):
        try:
            saved = io.read_json(saved_path, lenient=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{saved_path} cannot be read: {' '.join(str(e).split())}") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("trials"), list):
            raise ValueError(f"{saved_path} is not a search record (no trials list)")
    own_db = saved is None or str(saved.get("storage", "")).endswith("/" + search.STUDY_DB)
    if own_db and os.path.isfile(os.path.join(workdir, search.STUDY_DB)):
        try:
            return _from_study(workdir, saved)
        except ValueError:
            if saved is None:
                raise
        except Exception as e:  # noqa: BLE001 - search.json (written by the search) will do
            if saved is None:
                raise ValueError(f"{os.path.join(workdir, search.STUDY_DB)} cannot be read "
                                 f"back as a search: {' '.join(str(e).split())[:200]}") from None
            log.debug("report: the study could not be read back (%s); using search.json", e)
    if saved is None:
        raise ValueError(f"{workdir!r} holds no search (no search.json or study.db)")
    return saved


def _optuna_tables(path: str) -> list[str]:
    """The table names of an sqlite file, read without writing (ValueError: not sqlite)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return [r[0] for r in db.execute("SELECT name FROM sqlite_master "
                                             "WHERE type='table'")]
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path} is not an Optuna study database ({e})") from None


def _from_study(workdir: str, saved: dict | None) -> dict[str, Any]:
    """`search.record` of the study in W/study.db, with what only search.json knows (sampler,
    pruner, study seed, trials requested, the experiment's path and overrides) from `saved`."""
    import optuna
    path = os.path.join(workdir, search.STUDY_DB)
    tables = _optuna_tables(path)
    if not {"studies", "version_info"} <= set(tables):
        raise ValueError(f"{path} is not an Optuna study database")
    url = search.default_storage(workdir)
    storage = optuna.storages.RDBStorage(url)
    try:
        names = [s.study_name for s in storage.get_all_studies()]
        name = (saved or {}).get("study")
        if name not in names:
            if len(names) != 1:
                raise ValueError(f"{path} holds {len(names)} studies "
                                 f"({', '.join(sorted(names)[:3])}), not one search")
            name = names[0]
        study = optuna.load_study(study_name=name, storage=storage)
        attr = study.user_attrs.get(search.ATTR)
        if not isinstance(attr, dict):
            raise ValueError(f"{path}: study {name!r} is not a jaxaccel search (no "
                             f"{search.ATTR!r} user attr)")
        base = config_lib.from_json(attr["config"])
        space = {k: _distribution(d) for k, d in attr["search_space"].items()}
        saved = saved or {}
        p = search.SearchPlan(
            experiment=saved.get("experiment") or attr.get("experiment") or "?",
            workdir=workdir, base=base, keys=search.search_keys(base, space),
            sampler=saved.get("sampler", "unknown"), pruner=saved.get("pruner", "unknown"),
            objective=attr["objective"],
            trials=int(saved.get("trials_requested") or len(study.trials)), storage=url,
            study_name=name, study_seed=saved.get("study_seed"),
            overrides=list(saved.get("overrides") or []))
        body = search.record(p, study)
        if saved.get("importances") is not None:
            body["importances"] = saved["importances"]
        return body
    finally:
        storage.remove_session()


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _distribution(d: dict) -> Distribution:
    """A `describe()`d search key back as a Distribution."""
    kind = d["kind"]
    if kind == "choice":
        return choice([_tuples(v) for v in d["values"]])
    if kind == "intrange":
        return Distribution("intrange", int(d["low"]), int(d["high"]), step=int(d["step"]),
                            log=bool(d["log"]))
    return Distribution(kind, float(d["low"]), float(d["high"]))


# ----------------------------------------------------------------------------------------
# What the report reads from the record
# ----------------------------------------------------------------------------------------
def _metric(body: dict) -> tuple[str, str]:
    """(split, metric) of the objective, e.g. ("validation", "accuracy")."""
    split, metric, _ = search.OBJECTIVES.get(body.get("objective"), ("validation", "accuracy",
                                                                     "maximize"))
    return split, metric


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curves(workdir: str, body: dict) -> dict[int, list[tuple[int, float]]]:
    """Trial number -> [(step, objective metric)] of its evaluations (metrics.jsonl: what
    the pruner saw); a trial resumed in another's workdir shares its curve."""
    split, metric = _metric(body)
    out = {}
    for t in body["trials"]:
        if t.get("workdir"):
            pts = sweep_report.training_curves(os.path.join(workdir, t["workdir"])).get(
                f"{split}_{metric}")
            if pts:
                out[t["number"]] = pts
    return out


def last_evaluation(t: dict, body: dict, trial_curves: dict[int, list]) -> float | None:
    """A (pruned) trial's objective metric at its last evaluation: recorded, else the last
    point of its curve."""
    split, metric = _metric(body)
    v = t.get(f"{split}_{metric}")
    if _number(v):
        return float(v)
    pts = trial_curves.get(t["number"])
    return float(pts[-1][1]) if pts else None


def steps_of(t: dict, trial_curves: dict[int, list]) -> int | None:
    """Steps a trial trained: recorded, else (still running) its last evaluation's step."""
    if t.get("steps") is not None:
        return int(t["steps"])
    pts = trial_curves.get(t["number"])
    return int(pts[-1][0]) if pts and t.get("state") == "running" else None


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, tuple, dict)) else v


def varying_keys(body: dict, states: Sequence[str] = ("complete",)) -> list[str]:
    """Searched keys that take more than one value among the trials in `states`."""
    trials = [t for t in body["trials"] if t["state"] in states]
    return [k for k in body["search_space"]
            if len({_hashable(t["params"].get(k)) for t in trials if k in t["params"]}) > 1]


def importances(body: dict) -> tuple[dict[str, float] | None, str]:
    """(key -> Optuna's fANOVA importance, seed 0, over the complete trials and the keys that
    vary among them; or None, why not). Computed from the record alone (an in-memory study),
    so it needs no access to the search's storage."""
    complete = [t for t in body["trials"] if t["state"] == "complete" and _number(t["value"])]
    if len(complete) < 2:
        return None, (f"parameter importances need at least 2 complete trials "
                      f"({len(complete)} so far)")
    keys = varying_keys(body)
    if not keys:
        return None, (f"every one of the {len(complete)} complete trials has the same value "
                      f"of every searched key: no importance to measure")
    import optuna
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)
    dists, encode = {}, {}
    for k in keys:
        d = body["search_space"][k]
        if d["kind"] == "choice":
            plain = all(isinstance(v, (type(None), bool, int, float, str)) for v in d["values"])
            encode[k] = (lambda v: v) if plain else _hashable
            dists[k] = CategoricalDistribution([encode[k](v) for v in d["values"]])
        elif d["kind"] == "intrange":
            dists[k] = IntDistribution(int(d["low"]), int(d["high"]), log=bool(d["log"]),
                                       step=int(d["step"]))
        else:
            dists[k] = FloatDistribution(d["low"], d["high"], log=d["kind"] == "loguniform")
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction=body.get("direction") or "maximize")
        for t in complete:
            params = {k: encode.get(k, lambda v: v)(t["params"][k]) for k in keys}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                      value=float(t["value"])))
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        out = optuna.importance.get_param_importances(study, evaluator=evaluator, params=keys)
    except Exception as e:  # noqa: BLE001 - said in the report instead
        return None, f"parameter importances could not be computed: {' '.join(str(e).split())}"
    return {k: float(v) for k, v in out.items()}, ""


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return name_value(tuple(v))
    return str(v)


def _value_text(v: Any) -> str:
    """A searched key's value as the command line spells it (`0.001`, `(64, 32)`)."""
    try:
        return format_value(_tuples(v))
    except ValueError:
        return str(v)


def write_trials_csv(path: str, body: dict, trial_curves: dict[int, list]) -> None:
    keys = list(body["search_space"])
    rows = [["trial", "state", "value", *METRIC_COLUMNS, "steps", "full_steps", "pruned_at",
             "seconds", *keys, "workdir", "resumes", "error"]]
    for t in body["trials"]:
        rows.append([str(t["number"]), t["state"], sweep_report._cell(t.get("value")),
                     *[sweep_report._cell(t.get(c)) for c in METRIC_COLUMNS],
                     sweep_report._cell(steps_of(t, trial_curves)),
                     sweep_report._cell(t.get("full_steps")),
                     sweep_report._cell(t.get("pruned_at")),
                     sweep_report._cell(t.get("seconds")),
                     *[sweep_report._cell(t["params"].get(k)) for k in keys],
                     t.get("workdir") or "", sweep_report._cell(t.get("resumes")),
                     t.get("error", "")])
    sweep_report._write_csv(path, rows)


def best_command(body: dict) -> str:
    """`jaxaccel train --config EXP --workdir runs/best --config.k=v ...` for the best trial
    (the search's own overrides first, then the trial's params)."""
    best = body["best"]
    own = [f"--config.{o}" for o in body.get("overrides") or []
           if not o.startswith("progress=")]
    return shlex.join(["jaxaccel", "train", "--config", str(body.get("experiment", "?")),
                       "--workdir", "runs/best", *own, *best["overrides"]])


def summary(body: dict) -> list[str]:
    """A few lines for the terminal: counts, the best trial and the compute used."""
    c = body["counts"]
    lines = [f"search {body.get('study')}: {len(body['trials'])} trials ({c['complete']} "
             f"complete, {c['pruned']} pruned, {c['failed']} failed"
             + (f", {c['running']} running" if c.get("running") else "") + ")"]
    b = body.get("best")
    if b:
        lines.append(f"best: trial {b['number']} {body['objective']}={_fmt(b['value'])} "
                     f"(validation_accuracy={_fmt(b['validation_accuracy'])}, "
                     f"test_accuracy={_fmt(b['test_accuracy'])}): "
                     f"{shlex.join(b['overrides'])}")
    else:
        lines.append("best: none (no complete trial)")
    lines.append("compute: " + compute_line(body))
    return lines


def compute_line(body: dict) -> str:
    comp = body["compute"]
    ran = [t for t in body["trials"] if t["state"] in ("complete", "pruned", "failed")]
    fulls = {t.get("full_steps") for t in ran if t.get("full_steps")}
    each = f" of {fulls.pop()} steps" if len(fulls) == 1 else ""
    if not comp.get("full_steps"):
        return f"{comp.get('steps_trained', 0):,} steps trained (no finished trial yet)"
    return (f"{comp['steps_trained']:,} steps trained by the trials vs {comp['full_steps']:,} "
            f"for {len(ran)} full runs{each} (the complete, pruned and failed trials each "
            f"trained to the end): {100 * comp['fraction']:.1f}%")


def write_markdown(path: str, workdir: str, body: dict, trial_curves: dict[int, list],
                   imp: dict[str, float] | None, imp_why: str, plots: Sequence[str]) -> None:
    keys = list(body["search_space"])
    c = body["counts"]
    objective, direction = body["objective"], body.get("direction", "maximize")
    trials = body["trials"]
    seed = body.get("study_seed")
    lines = [f"# Search: {body.get('study')} ({os.path.basename(os.path.abspath(workdir))})", "",
             f"Sampler `{body.get('sampler')}`" + (f" (study seed {seed})" if seed is not None
                                                  else "")
             + f", pruner `{body.get('pruner')}`, objective `{objective}` ({direction}d; "
             f"selection reads the validation split only, test metrics are reported beside, "
             f"never select). {len(trials)} trials"
             + (f" of {body['trials_requested']} requested" if body.get("trials_requested")
                else "")
             + f": {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"
             + "".join(f", {c[s]} {s}" for s in ("interrupted", "running", "waiting")
                       if c.get(s)) + ".", ""]
    storage = body.get("storage")
    if storage:
        lines += [f"Study `{body.get('study')}` in `{storage}`; Optuna's dashboard shows it "
                  f"live: `optuna-dashboard {storage}` (`pip install optuna-dashboard`).", ""]
    lines += ["## Best trial", ""]
    b = body.get("best")
    if b is None:
        lines.append("No complete trial yet: no best trial (pruned and failed trials are "
                     "never selected).")
    else:
        t = next((t for t in trials if t["number"] == b["number"]), {})
        n = c["complete"]
        lines += [f"**Trial {b['number']}** (best `{objective}` among the {n} complete "
                  f"trial{'s' if n != 1 else ''}): validation accuracy "
                  f"**{_fmt(b['validation_accuracy'])}**, test accuracy "
                  f"**{_fmt(b['test_accuracy'])}** (reported beside it, never selects); "
                  f"{_fmt(steps_of(t, trial_curves))} steps; workdir `{b.get('workdir')}`.", "",
                  "| key | value |", "|---|---|"]
        lines += [f"| `{k}` | `{_value_text(v)}` |" for k, v in b["params"].items()]
        lines += ["", "Ready to run (the search's own `--config` overrides included):", "",
                  "```bash", best_command(body), "```", "",
                  f"Overrides alone: `{shlex.join(b['overrides'])}`"]
    lines += ["", "## Compute", "", compute_line(body) + "."]
    pruned = [t["pruned_at"] for t in trials if t["state"] == "pruned" and t.get("pruned_at")]
    if pruned:
        lines.append(f"The {len(pruned)} pruned trials stopped at step "
                     f"{min(pruned)}–{max(pruned)} (median {statistics.median(pruned):g}).")
    metrics = [objective] + [m for m in ("validation_accuracy", "test_accuracy")
                             if m != objective]
    lines += ["", "## Trials", "",
              "| trial | state | " + " | ".join(metrics) + " | steps | "
              + " | ".join(f"`{k}`" for k in keys) + " |",
              "|" + "---|" * (3 + len(metrics) + len(keys))]
    best_number = b["number"] if b else None
    for t in trials:
        mark = " ★" if t["number"] == best_number else ""
        steps = steps_of(t, trial_curves)
        steps_text = _fmt(steps) + (" (pruned)" if t.get("pruned_at") is not None else "")
        lines.append("| " + " | ".join([
            f"{t['number']}{mark}", t["state"],
            *[_fmt(t.get("value")) if m == objective and t["state"] == "complete"
              else _fmt(t.get(m)) if t["state"] == "complete" or t.get(m) is None
              else f"_{_fmt(t.get(m))}_" for m in metrics], steps_text,
            *[_value_text(t["params"][k]) if k in t["params"] else "—" for k in keys]]) + " |")
    lines += ["", f"★ the best trial (selected on `{objective}`). _Italics_: a pruned "
              "trial's metrics at its last evaluation, when the pruner stopped it (it never "
              "finished, so it has no objective value and is never selected)."]
    errors = [t for t in trials if t.get("error")]
    if errors:
        lines += ["", "Failed trials:", ""] + [f"- trial {t['number']}: {t['error']}"
                                               for t in errors]
    lines += ["", "## Parameter importances", ""]
    if imp is None:
        lines.append(f"Not computed: {imp_why}.")
    else:
        n = c["complete"]
        lines += [f"Optuna's fANOVA (seed 0) over the {n} complete trials, for the keys that "
                  f"vary among them (importances sum to 1; with few trials they are rough):", "",
                  "| key | importance |", "|---|---|"]
        lines += [f"| `{k}` | {v:.3f} |" for k, v in imp.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    io.write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------
def key_plot_name(key: str) -> str:
    return f"{KEY_PLOT_PREFIX}{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.png"


def _ylabel(body: dict) -> str:
    split, metric = _metric(body)
    return f"{split} {metric}"


def plot_history(path: str, body: dict, trial_curves: dict[int, list]) -> None:
    """Left: the objective of every complete trial (pruned ones at their last evaluation)
    and the best so far; right: each trial's validation curve (what the pruner saw)."""
    fig = sweep_report._figure(11.0, 4.0)
    ax, ax_curves = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    trials = body["trials"]
    best = (body.get("best") or {}).get("number")
    done = [(t["number"], t["value"]) for t in trials
            if t["state"] == "complete" and _number(t.get("value"))]
    if done:
        xs, ys = zip(*done)
        ax.plot(xs, ys, "o", color="C0", label="complete")
    cut = [(t["number"], last_evaluation(t, body, trial_curves)) for t in trials
           if t["state"] == "pruned" and last_evaluation(t, body, trial_curves) is not None]
    if cut:
        xs, ys = zip(*cut)
        ax.plot(xs, ys, "x", color="0.5", label="pruned (last evaluation)")
    history = [(h["number"], h["best"]) for h in body.get("history") or []]
    if history:
        xs, ys = zip(*history)
        last = max(t["number"] for t in trials)
        ax.step(list(xs) + [last], list(ys) + [ys[-1]], where="post", color="C3",
                label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(_ylabel(body))
    ax.set_title(f"{body['objective']} per trial", fontsize=10)
    if not done and not cut:
        ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
    by_number = {t["number"]: t for t in trials}
    for number, pts in trial_curves.items():
        t = by_number[number]
        xs, ys = zip(*pts)
        if number == best:
            ax_curves.plot(xs, ys, "-o", color="C3", linewidth=2, markersize=3,
                           label=f"trial {number} (best)", zorder=3)
        elif t["state"] == "pruned":
            ax_curves.plot(xs, ys, "--.", color="0.6", linewidth=1, markersize=4)
        else:  # markers: a curve of one evaluation is a point
            ax_curves.plot(xs, ys, linestyle="-", marker=".", color="C0", alpha=0.6,
                           linewidth=1, markersize=4)
    if any(by_number[n]["state"] != "pruned" and n != best for n in trial_curves):
        ax_curves.plot([], [], linestyle="-", marker=".", color="C0", alpha=0.6,
                       label="complete (or not finished)")
    if any(by_number[n]["state"] == "pruned" for n in trial_curves):
        ax_curves.plot([], [], "--.", color="0.6", label="pruned")
    if not trial_curves:
        ax_curves.text(0.5, 0.5, "no evaluations", ha="center", va="center",
                       transform=ax_curves.transAxes)
    ax_curves.set_xlabel("step")
    ax_curves.set_ylabel(_ylabel(body))
    ax_curves.set_title(f"{_ylabel(body)} at each evaluation (what the pruner saw)", fontsize=10)
    if ax_curves.get_legend_handles_labels()[0]:
        ax_curves.legend(fontsize=7)
    for a in (ax, ax_curves):
        a.grid(alpha=0.3)
    pruner = body.get("pruner")
    fig.suptitle(f"search {body.get('study')}: {body.get('sampler')} sampler, "
                 + ("no pruning" if pruner == "none" else f"{pruner} pruner"))
    fig.savefig(path)


def plot_importances(path: str, imp: dict[str, float], n: int) -> None:
    fig = sweep_report._figure(6.0, 1.2 + 0.5 * len(imp))
    ax = fig.add_subplot(1, 1, 1)
    keys = list(imp)[::-1]  # the most important on top
    ax.barh(range(len(keys)), [imp[k] for k in keys], color="C0")
    ax.set_yticks(range(len(keys)), keys)
    ax.set_xlabel("importance (fANOVA)")
    ax.set_xlim(0, max(1.0, max(imp.values())))
    ax.set_title(f"parameter importances over {n} complete trials", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path)


def plot_key(path: str, body: dict, key: str, trial_curves: dict[int, list]) -> None:
    """The objective (validation: complete trials, pruned ones at their last evaluation, the
    best starred) and test accuracy (complete trials, reported only) against one key."""
    from matplotlib.ticker import NullFormatter
    spec = body["search_space"][key]
    trials = [t for t in body["trials"] if key in t["params"]]
    values = (list(spec["values"]) if spec["kind"] == "choice"
              else sorted({t["params"][key] for t in trials}))
    numeric = bool(values) and all(_number(v) for v in values)
    position = {_hashable(v): i for i, v in enumerate(values)}

    def x_of(v: Any) -> float:
        return float(v) if numeric else float(position.get(_hashable(v), -1))

    best = (body.get("best") or {}).get("number")
    fig = sweep_report._figure(11.0, 4.0)
    ax_val, ax_test = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    panels = ((ax_val, lambda t: t.get("value"), f"{body['objective']} (selects)"),
              (ax_test, lambda t: t.get("test_accuracy"), "test accuracy (reported only)"))
    for ax, get, title in panels:
        done = [t for t in trials if t["state"] == "complete" and _number(get(t))]
        if done:
            ax.plot([x_of(t["params"][key]) for t in done], [get(t) for t in done], "o",
                    color="C0", alpha=0.7, label="complete")
        b = [t for t in done if t["number"] == best]
        if b:
            ax.plot([x_of(b[0]["params"][key])], [get(b[0])], "*", color="C3", markersize=14,
                    label=f"trial {best} (best on validation)", zorder=3)
        if ax is ax_val:
            cut = [(t, last_evaluation(t, body, trial_curves)) for t in trials
                   if t["state"] == "pruned"]
            cut = [(t, v) for t, v in cut if v is not None]
            if cut:
                ax.plot([x_of(t["params"][key]) for t, _ in cut], [v for _, v in cut], "x",
                        color="0.5", label="pruned (last evaluation)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        if numeric:
            logish = spec.get("kind") == "loguniform" or spec.get("log") or (
                min(values) > 0 and max(values) > 10 * min(values))
            if logish:
                ax.set_xscale("log")
            if spec["kind"] == "choice" and len(values) <= 10:
                ax.set_xticks([float(v) for v in values], [f"{v:g}" for v in values])
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xticks(range(len(values)), [name_value(v) for v in values])
            ax.set_xlim(-0.5, len(values) - 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished trials", ha="center", va="center",
                    transform=ax.transAxes)
    ax_val.set_ylabel(_ylabel(body))
    ax_test.set_ylabel("test accuracy")
    fig.suptitle(f"{body['objective']} vs {key}")
    fig.savefig(path)


def plot_plan(body: dict, trial_curves: dict[int, list], imp: dict[str, float] | None
              ) -> dict[str, Callable[[str], None]]:
    """File name -> how to draw it, for every plot that applies."""
    plan: dict[str, Callable[[str], None]] = {
        HISTORY_PLOT: lambda path: plot_history(path, body, trial_curves)}
    if imp:
        n = body["counts"]["complete"]
        plan[IMPORTANCES_PLOT] = lambda path: plot_importances(path, imp, n)
    for key in varying_keys(body, ("complete", "pruned")):
        plan[key_plot_name(key)] = lambda path, key=key: plot_key(path, body, key, trial_curves)
    return plan


# ----------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------
def build(workdir: str, *, plots: bool = True) -> tuple[dict[str, str], dict[str, Any]]:
    """Write search.md, trials.csv (and the plots) for the search in `workdir`.

    Returns (what it wrote: "md", "csv" and each plot under its file name without `.png`; the
    record). ValueError (one line) when the workdir holds no search or a search with no trials.
    """
    body = load(workdir)
    if not body["trials"]:
        raise ValueError(f"{workdir!r} holds the search {body.get('study')!r} with no trials "
                         f"yet: nothing to report (run `jaxaccel sweep --search ...` first)")
    trial_curves = curves(workdir, body)
    imp, why = importances(body)
    paths = {"md": os.path.join(workdir, SEARCH_MD), "csv": os.path.join(workdir, TRIALS_CSV)}
    write_trials_csv(paths["csv"], body, trial_curves)
    written = sweep_report.write_plots(
        workdir, plot_plan(body, trial_curves, imp),
        lambda name: name.startswith(KEY_PLOT_PREFIX) or name in (HISTORY_PLOT, IMPORTANCES_PLOT),
        plots=plots, paths=paths)
    write_markdown(paths["md"], workdir, body, trial_curves, imp, why, written)
    return paths, body
