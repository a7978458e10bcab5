"""Searching an experiment's hyperparameters with an Optuna study (`jaxaccel sweep --search`).

An experiment file may expose `get_search()` next to `get_config()`: a dict of dotted config
keys -> distributions (`sweep.uniform`, `loguniform`, `intrange`, `choice`; a list means
`choice`). `run` opens (or resumes) an Optuna study over that space and trains its trials one
after another in this process, each with `pipeline.train` in its own sub-workdir
`WORKDIR/trials/trial-<number>`:
  * the objective is a *validation* metric (`OBJECTIVES`): selection never reads the test
    split, which every trial still records beside it;
  * a pruner (`PRUNERS`) is fed by the training loop's own evaluations every `eval_every`
    steps (`train(on_evaluation=...)`: one `trial.report` per evaluation); a pruned trial
    checkpoints the step it stopped at, keeps its workdir and is recorded PRUNED;
  * the study lives in an Optuna storage, `sqlite:///WORKDIR/study.db` by default; a rerun
    resumes it: finished trials are kept, `trials` counts them all (complete, pruned and
    failed), and a trial that a stopped sweep left running is marked FAIL with the user attr
    `interrupted` and trained again (same params, same workdir: it resumes from its
    checkpoint) as a new trial with the user attr `resumes`;
  * `WORKDIR/search.json` (`record`) holds the trials, the best one (validation and test
    accuracy side by side, its params as `--config.k=v` overrides) and the compute used.

Imports optuna, config, io, loop (`StoppedEarly`), stages, preemption and, to train, the
pipeline; the sweep package's space and points; never the CLI or benchmarks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import socket
import sqlite3
import time
import traceback
from typing import Any, Callable, Sequence

import ml_collections
import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution,
                                  FloatDistribution, IntDistribution)
from optuna.trial import FrozenTrial, TrialState

from jaxaccel import config as config_lib
from jaxaccel import io
from jaxaccel import stages as stages_lib
from jaxaccel.preemption import Preempted
from jaxaccel.sweep.points import (ERROR_FILE, LOG_FILE, cli_overrides, format_value,
                                   point_config)
from jaxaccel.sweep.space import Distribution, choice

log = logging.getLogger("jaxaccel")

SEARCH_FILE = "search.json"   # the search's trials, best trial and compute (WORKDIR)
STUDY_DB = "study.db"         # the default storage: sqlite:///WORKDIR/study.db
TRIALS_DIR = "trials"         # WORKDIR/trials/trial-<number>: one run per trial
ATTR = "jaxaccel"             # the study's user attr saying what it searches

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("asha", "hyperband", "median", "none")
# objective -> (split, metric, direction)
OBJECTIVES = {"validation_accuracy": ("validation", "accuracy", "maximize"),
              "validation_loss": ("validation", "loss", "minimize")}
_PRIMITIVE = (type(None), bool, int, float, str)  # what Optuna's categorical values may be


# ----------------------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SearchKey:
    """One searched config key: its distribution, Optuna's, and how Optuna's values map back
    (a choice among tuples or other non-primitive values is searched as their text)."""
    key: str
    dist: Distribution
    optuna: BaseDistribution
    decode: dict | None = None  # Optuna's categorical value -> the config value

    def value(self, optuna_value: Any) -> Any:
        return self.decode[optuna_value] if self.decode is not None else optuna_value

    def describe(self) -> dict[str, Any]:
        d = self.dist
        if d.kind == "choice":
            return {"kind": "choice", "values": list(d.values)}
        out = {"kind": d.kind, "low": d.low, "high": d.high}
        return {**out, "step": d.step, "log": d.log} if d.kind == "intrange" else out


def load_search(path: str) -> dict[str, Distribution]:
    """The space of an experiment file's `get_search()` (keys -> Distributions; a list or
    tuple of values means `choice`)."""
    module = config_lib.import_experiment(path)  # the import get_config() came from
    if not callable(getattr(module, "get_search", None)):
        raise config_lib.ConfigError(f"{path!r} has no get_search() function (a dict of config "
                                     f"keys -> sweep.uniform/loguniform/intrange/choice)")
    space = config_lib.call_experiment(path, module.get_search)
    if not isinstance(space, dict) or not space:
        raise config_lib.ConfigError(f"{path}: get_search() returned {space!r}, not a non-empty "
                                     f"dict of config keys -> distributions")
    out = {}
    for key, d in space.items():
        if isinstance(d, (list, tuple)):
            d = choice(d)
        if not isinstance(key, str) or not isinstance(d, Distribution):
            raise config_lib.ConfigError(
                f"{path}: get_search() key {key!r} -> {d!r}: need a dotted config key and a "
                f"sweep.uniform, loguniform, intrange or choice (or a list of values)")
        out[key] = d
    return out


def search_keys(base: ml_collections.ConfigDict, space: dict[str, Distribution]
                ) -> list[SearchKey]:
    """The space checked against the config: every key exists and every value the
    distribution can take (its bounds, each choice) fits the key's type and passes
    `config.validate`; ConfigError (one line naming the key) otherwise."""
    out = []
    for key, d in space.items():
        candidates = list(d.values) if d.kind == "choice" else [d.low, d.high]
        for v in candidates:
            try:
                config_lib.validate(point_config(base, {key: v}))
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"get_search() key {key!r} ({_short(d)}) does not "
                                             f"fit the config: {e}") from None
        decode = None
        if d.kind == "uniform":
            dist: BaseDistribution = FloatDistribution(d.low, d.high)
        elif d.kind == "loguniform":
            dist = FloatDistribution(d.low, d.high, log=True)
        elif d.kind == "intrange":
            dist = IntDistribution(int(d.low), int(d.high), log=d.log, step=d.step)
        else:
            choices = list(d.values)
            if not all(isinstance(v, _PRIMITIVE) for v in choices):
                decode = {format_value(v): v for v in choices}
                choices = list(decode)
            if len(set(map(repr, choices))) != len(choices):
                raise config_lib.ConfigError(f"get_search() key {key!r}: choice {list(d.values)!r}"
                                             f" repeats a value")
            dist = CategoricalDistribution(choices)
        out.append(SearchKey(key, d, dist, decode))
    return out


def _short(d: Distribution) -> str:
    if d.kind == "choice":
        return f"choice({list(d.values)!r})"
    return f"{d.kind}({d.low!r}, {d.high!r})"


def full_steps(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps a run of `config` trains to the end (all stages)."""
    return int(sum(s.steps for s in stages_lib.expand(config)))


# ----------------------------------------------------------------------------------------
# Plan: everything checked before anything is written
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class SearchPlan:
    """What `run` searches and how: checked input, nothing written yet."""
    experiment: str
    workdir: str
    base: ml_collections.ConfigDict
    keys: list[SearchKey]
    sampler: str
    pruner: str
    objective: str
    trials: int
    storage: str
    study_name: str
    study_seed: int
    overrides: list[str]
    vectorize: str | None = None  # a `sweep.vectorized` mode: K trials as one program
    per_program: int = 1          # K: trials asked at once and trained as one program

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective][2]

    def identity(self) -> dict[str, Any]:
        """What a study of this search holds as its `jaxaccel` user attr: the experiment file
        (for information), its resolved config, the search space and the objective (a rerun
        must match these three: `mismatch`)."""
        return io.to_jsonable({
            "experiment": os.path.abspath(self.experiment),
            "config": config_lib.to_json(self.base),
            "search_space": {k.key: k.describe() for k in self.keys},
            "objective": self.objective})

    def mismatch(self, saved: dict) -> str:
        """How a study's `jaxaccel` attr differs from this search ('' when it is this one)."""
        mine = self.identity()
        if saved.get("search_space") != mine["search_space"]:
            return "another search space"
        if saved.get("objective") != mine["objective"]:
            return f"the objective {saved.get('objective')!r}"
        try:
            diff = config_lib.differences(config_lib.from_json(saved["config"]), self.base)
        except (KeyError, TypeError, ValueError):
            return "another config"
        if diff:
            return f"another config ({'; '.join(diff[:3])}{' …' if len(diff) > 3 else ''})"
        return ""


def plan(experiment: str, workdir: str, *, sampler: str = "tpe", trials: int,
         objective: str = "validation_accuracy", pruner: str = "none",
         storage: str | None = None, study_seed: int = 0,
         overrides: Sequence[str] = (), vectorize: str | None = None,
         per_program: int = 4) -> SearchPlan:
    """Check the search's input (one-line ConfigError/ValueError each; nothing written).
    With `vectorize` (a `sweep.vectorized` mode), `per_program` trials are asked at once and
    trained as one compiled program (searched keys must keep shapes; no pruner)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--search {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise ValueError(f"--pruner {pruner!r}: choose one of {', '.join(PRUNERS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials <= 0:
        raise ValueError(f"--trials={trials!r} must be a positive number of trials")
    base = config_lib.load_experiment(experiment, list(overrides))
    config_lib.validate(base)
    keys = search_keys(base, load_search(experiment))
    if not base.dataset.validation_split:
        raise config_lib.ConfigError(
            f"a search selects on the validation split, and {experiment} holds none "
            f"(dataset.validation_split=0): set dataset.validation_split > 0 (the test split "
            f"never selects anything)")
    if base.ensemble.members > 1:
        raise config_lib.ConfigError(f"a search trains single models, not ensembles "
                                     f"(ensemble.members={base.ensemble.members})")
    if pruner != "none" and not base.eval_every:
        raise config_lib.ConfigError(f"--pruner {pruner} is fed by the evaluations every "
                                     f"eval_every steps: set eval_every > 0 (it is 0)")
    if sampler == "grid":
        bad = [k.key for k in keys if k.dist.kind != "choice"]
        if bad:
            raise config_lib.ConfigError(f"--search grid needs every get_search() key to be a "
                                         f"choice; {bad[0]!r} is {_short(keys[0].dist)}")
    if sampler == "cmaes":
        bad = [k for k in keys if k.dist.kind == "choice"]
        if bad:
            raise config_lib.ConfigError(f"--search cmaes samples numbers only; get_search() key "
                                         f"{bad[0].key!r} is a choice: use tpe, random or grid")
    if vectorize:
        from jaxaccel.sweep import vectorized
        from jaxaccel import stacked
        stacked.choose_plan(2, 1, vectorize)  # a bad mode fails here
        if isinstance(per_program, bool) or not isinstance(per_program, int) or per_program < 2:
            raise ValueError(f"--vectorize-trials={per_program!r} must be an integer >= 2 "
                             f"(trials trained as one program)")
        bad = [k.key for k in keys if k.key not in vectorized.VECTORIZABLE]
        if bad:
            raise config_lib.ConfigError(
                f"--vectorize trains trials as one program of one shape; get_search() key "
                f"{bad[0]!r} may change shapes or the program: only "
                f"{', '.join(vectorized.VECTORIZABLE)} may be searched with it")
        if pruner != "none":
            raise config_lib.ConfigError(f"--pruner {pruner} stops single trials; with "
                                         f"--vectorize every trial trains to the end (use "
                                         f"--pruner none)")
        vectorized.check_vectorizable([base])
    name = os.path.splitext(os.path.basename(experiment))[0]
    return SearchPlan(experiment=experiment, workdir=workdir, base=base, keys=keys,
                      sampler=sampler, pruner=pruner, objective=objective, trials=trials,
                      storage=storage or default_storage(workdir), study_name=name,
                      study_seed=int(study_seed), overrides=list(overrides),
                      vectorize=vectorize or None,
                      per_program=int(per_program) if vectorize else 1)


def default_storage(workdir: str) -> str:
    """`sqlite:///WORKDIR/study.db` (an absolute path)."""
    return "sqlite:///" + os.path.abspath(os.path.join(workdir, STUDY_DB))


def shown_storage(url: str) -> str:
    """The storage URL without its password (what files and messages show)."""
    try:
        import sqlalchemy
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy parses: shown as given
        return url


def make_sampler(p: SearchPlan, seed: int) -> optuna.samplers.BaseSampler:
    if p.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if p.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if p.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return _GridSampler({k.key: list(k.optuna.choices) for k in p.keys}, seed=seed)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, without `Study.stop()` once the grid is covered (it works only inside
    `Study.optimize`; `run` asks and tells, and stops at the grid's size itself)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(p: SearchPlan) -> optuna.pruners.BasePruner:
    """asha: successive halving from the first evaluation (rungs at eval_every × 4^k);
    hyperband: from eval_every to the full run; median: Optuna's defaults."""
    if p.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.base.eval_every)
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.base.eval_every,
                                              max_resource=full_steps(p.base))
    if p.pruner == "median":
        return optuna.pruners.MedianPruner()
    return optuna.pruners.NopPruner()


def grid_size(p: SearchPlan) -> int:
    return math.prod(len(k.dist.values) for k in p.keys)


# ----------------------------------------------------------------------------------------
# The study: opened only if it is this search's (or new)
# ----------------------------------------------------------------------------------------
def check_storage(p: SearchPlan) -> None:
    """Refuse (ValueError, nothing written) a storage that is not an Optuna database or that
    holds this study for another experiment or search space; in the default storage, also
    another study; and a workdir whose search.json is another study's."""
    shown = shown_storage(p.storage)
    tables = _tables(p.storage)
    if tables and not {"studies", "version_info"} <= set(tables):
        raise ValueError(f"--storage {shown} is not an Optuna study database (its tables: "
                         f"{', '.join(sorted(tables)[:5])}); refusing to write into it")
    previous = os.path.join(p.workdir, SEARCH_FILE)
    if os.path.isfile(previous):
        saved = io.read_json(previous)
        moved = (p.storage == default_storage(p.workdir)  # the workdir's own db, moved with it
                 and str(saved.get("storage", "")).endswith("/" + STUDY_DB))
        if saved.get("study") != p.study_name or not (saved.get("storage") == shown or moved):
            raise ValueError(f"{p.workdir} holds the search of study {saved.get('study')!r} in "
                             f"{saved.get('storage')}; use another --workdir")
    if not tables:
        if p.storage != default_storage(p.workdir):  # reachable, before the workdir exists
            _open_storage(p.storage).remove_session()
        return
    storage = _open_storage(p.storage)
    try:
        names = [s.study_name for s in storage.get_all_studies()]
        if p.storage == default_storage(p.workdir) and set(names) - {p.study_name}:
            raise ValueError(f"{shown} holds the study {sorted(set(names))[0]!r} of another "
                             f"experiment; use another --workdir")
        if p.study_name in names:
            study_id = storage.get_study_id_from_name(p.study_name)
            saved = storage.get_study_user_attrs(study_id).get(ATTR)
            if not isinstance(saved, dict):
                raise ValueError(f"{shown}: study {p.study_name!r} is not a jaxaccel search; "
                                 f"use another --storage or --workdir")
            what = p.mismatch(saved)
            if what:
                raise ValueError(f"{shown}: study {p.study_name!r} belongs to {what} "
                                 f"(experiment {saved.get('experiment')}); use another "
                                 f"--workdir or --storage")
    finally:
        storage.remove_session()


def _tables(url: str) -> list[str]:
    """The database's table names ([] for a new or empty one), read without writing."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not os.path.exists(path):
            return []
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                return [r[0] for r in db.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type='table'")]
        except sqlite3.DatabaseError as e:
            raise ValueError(f"--storage {url} is not an Optuna study database ({e}); refusing "
                             f"to write into it") from None
    try:
        import sqlalchemy
        engine = sqlalchemy.create_engine(url)
        try:
            return list(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URL, missing driver
        raise ValueError(f"--storage {shown_storage(url)} cannot be opened: "
                         f"{' '.join(str(e).split())[:200]}") from None


def _open_storage(url: str) -> optuna.storages.RDBStorage:
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URL, missing driver
        raise ValueError(f"--storage {shown_storage(url)} cannot be opened: "
                         f"{' '.join(str(e).split())[:200]}") from None


def open_study(p: SearchPlan) -> optuna.Study:
    """Create the study or load this search's (check_storage first)."""
    study = optuna.create_study(storage=_open_storage(p.storage), study_name=p.study_name,
                                direction=p.direction, load_if_exists=True,
                                pruner=make_pruner(p))
    if ATTR not in study.user_attrs:
        study.set_user_attr(ATTR, p.identity())
    # Reseeded by the trials so far: a resumed study does not draw its first trials' params
    # again.
    study.sampler = make_sampler(p, p.study_seed + len(study.trials))
    return study


# ----------------------------------------------------------------------------------------
# Trials
# ----------------------------------------------------------------------------------------
def trial_workdir(p: SearchPlan, trial: FrozenTrial | optuna.Trial) -> str:
    name = trial.user_attrs.get("workdir") or f"trial-{trial.number:04d}"
    return os.path.join(p.workdir, TRIALS_DIR, name)


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that count toward `trials`: complete, pruned, and failed for their own reasons
    (not those interrupted and trained again as another trial)."""
    resumed = {t.user_attrs.get("resumes") for t in trials}
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in resumed
                and "interrupted" not in t.user_attrs)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _elsewhere(t: FrozenTrial) -> bool:
    """A RUNNING trial that a sweep on another host runs (or ran: only it can tell)."""
    return (t.state == TrialState.RUNNING
            and (t.user_attrs.get("worker") or {}).get("host") not in (None, socket.gethostname()))


def requeue_stale(study: optuna.Study) -> None:
    """Trials left RUNNING by a sweep process of this host that is gone: enqueued again (same
    params and workdir) and marked FAIL. One running in a live process of this host is
    refused first (another sweep of this study is under way); another host's are left to it."""
    trials = study.get_trials(deepcopy=False)
    stale = [t for t in trials if t.state == TrialState.RUNNING and not _elsewhere(t)]
    for t in stale:
        pid = (t.user_attrs.get("worker") or {}).get("pid")
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise ValueError(f"trial {t.number} of study {study.study_name!r} is running in "
                             f"process {pid} on this host: another sweep of this study is "
                             f"under way")
    for t in stale:
        _requeue(study, t, trials)


def _requeue(study: optuna.Study, t: FrozenTrial, trials: Sequence[FrozenTrial],
             trial: optuna.Trial | None = None, why: str = "its sweep process stopped") -> None:
    """Enqueue `t` again (same params, same workdir: it resumes from its checkpoint), then mark
    it FAIL (in this order: a kill in between leaves it RUNNING, found again next time)."""
    if not any(o.user_attrs.get("resumes") == t.number for o in trials):
        study.enqueue_trial(dict(t.params), user_attrs={
            "workdir": t.user_attrs.get("workdir") or f"trial-{t.number:04d}",
            "resumes": t.number})
    if trial is not None:
        trial.set_user_attr("interrupted", why)
    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    log.info("search: trial %d interrupted (%s); it resumes as a new trial", t.number, why)


@dataclasses.dataclass
class SearchResult:
    """What `run` did: `record` is what search.json holds."""
    record: dict
    ran: list[int]  # trial numbers this call trained

    @property
    def failed(self) -> list[dict]:
        return [t for t in self.record["trials"] if t["state"] == "failed"]


def run(experiment: str, workdir: str, *, sampler: str = "tpe", trials: int,
        objective: str = "validation_accuracy", pruner: str = "none",
        storage: str | None = None, study_seed: int = 0, overrides: Sequence[str] = (),
        train_fn: Callable | None = None, vectorize: str | None = None,
        per_program: int = 4, engine: str = "local", address: str | None = None,
        trial_cpus: float = 1.0, trial_gpus: float = 0.0) -> SearchResult:
    """Run (or resume) the search of `experiment` in `workdir` until `trials` trials count
    (see `counted`; a grid stops at its size). `train_fn` (default `pipeline.train`) trains one
    trial: `train_fn(config, workdir, on_evaluation=hook)`. With `vectorize` (a
    `sweep.vectorized` mode), `per_program` suggestions are asked at once and trained as one
    compiled program (`_run_vectorized`), each told to the study. With `engine="ray"`, each
    trial is a Ray task on the cluster at `address` (or a local Ray), as many at once as the
    cluster has slots of `trial_cpus` / `trial_gpus` (`_run_on_ray`)."""
    p = plan(experiment, workdir, sampler=sampler, trials=trials, objective=objective,
             pruner=pruner, storage=storage, study_seed=study_seed, overrides=overrides,
             vectorize=vectorize, per_program=per_program)
    if engine not in ("local", "ray"):
        raise ValueError(f"--engine {engine!r} is not valid; choose one of: local, ray")
    if engine == "ray":
        from jaxaccel.sweep import ray_engine
        if vectorize:
            raise ValueError("--engine ray runs one trial per Ray task; --vectorize is not "
                             "used with it")
        ray_engine.check_resources(trial_cpus, trial_gpus)
        if address:
            ray_engine.check_address(address)
    elif address:
        raise ValueError(f"--address {address!r} names a Ray cluster: add --engine ray")
    check_storage(p)
    if train_fn is None:
        from jaxaccel.pipeline import train as train_fn
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module logs what happens
    os.makedirs(p.workdir, exist_ok=True)
    study = open_study(p)
    requeue_stale(study)
    target = min(p.trials, grid_size(p)) if p.sampler == "grid" else p.trials
    ran: list[int] = []
    save = lambda: write_record(p, study)  # noqa: E731
    save()
    if engine == "ray":
        try:
            _run_on_ray(p, study, target, ran, address=address, trial_cpus=trial_cpus,
                        trial_gpus=trial_gpus, on_change=save)
        finally:
            save()
        return SearchResult(write_record(p, study, importances=True), ran)
    while True:
        now = study.get_trials(deepcopy=False)
        if len(counted(now)) + sum(map(_elsewhere, now)) >= target:
            break
        left = target - len(counted(now)) - sum(map(_elsewhere, now))
        asked = [study.ask({k.key: k.optuna for k in p.keys})
                 for _ in range(min(p.per_program, left))]
        ran.extend(t.number for t in asked)
        try:
            if p.vectorize:
                _run_vectorized(p, study, asked)
            else:
                _run_trial(p, study, asked[0], train_fn)
        except (Preempted, KeyboardInterrupt):
            for trial in asked:
                trials_now = study.get_trials(deepcopy=False)
                if trials_now[trial.number].state == TrialState.RUNNING:
                    _requeue(study, trials_now[trial.number], trials_now, trial,
                             "stopped by a signal")
            raise
        finally:
            save()
    return SearchResult(write_record(p, study, importances=True), ran)


def _run_trial(p: SearchPlan, study: optuna.Study, trial: optuna.Trial,
               train_fn: Callable, worker_attr: str = "worker") -> None:
    """Train one trial and tell the study how it ended (complete, pruned, failed).
    `worker_attr`: the user attr naming this process (the sweep's own `worker`, which stale
    detection reads, unless a Ray task of the sweep runs the trial: `ray_worker`)."""
    from jaxaccel import parallel, pipeline
    from jaxaccel.loop import StoppedEarly
    wd = trial_workdir(p, trial)
    trial.set_user_attr("workdir", os.path.basename(wd))
    trial.set_user_attr(worker_attr, parallel.worker_record() if worker_attr != "worker"
                        else {"host": socket.gethostname(), "pid": os.getpid()})
    params = {k.key: k.value(trial.params[k.key]) for k in p.keys}
    split, metric, _ = OBJECTIVES[p.objective]
    last: dict[str, dict] = {}
    resumes = trial.user_attrs.get("resumes")
    if resumes is not None:  # what the interrupted attempt reported up to its checkpoint
        reached = pipeline.trained_steps(wd) or 0
        old = study.get_trials(deepcopy=False)[resumes]
        for step, value in sorted(old.intermediate_values.items()):
            if step <= reached:
                trial.report(value, step)

    def on_evaluation(step: int, result: dict) -> bool:
        last.clear()
        last.update(result)
        trial.report(result[split][metric], step)
        return trial.should_prune()

    log.info("search: trial %d %s (%s)", trial.number, " ".join(cli_overrides(params)), wd)
    t0 = time.perf_counter()
    try:
        config = point_config(p.base, params)
        trial.set_user_attr("full_steps", full_steps(config))
        results = train_fn(config, wd, on_evaluation=on_evaluation)
    except StoppedEarly as e:
        trial.set_user_attr("pruned_at", e.step)
        trial.set_user_attr("steps", e.step)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        for s, r in last.items():
            for k in ("accuracy", "loss"):
                trial.set_user_attr(f"{s}_{k}", r[k])
        study.tell(trial, state=TrialState.PRUNED)
        log.info("search: trial %d pruned at step %d", trial.number, e.step)
        return
    except Preempted:
        raise
    except Exception as e:  # noqa: BLE001 - a trial's own failure must not stop the search
        message = " ".join(f"{type(e).__name__}: {e}".split())
        _fail(study, trial, wd, message, traceback.format_exc())
        return
    _tell_results(p, study, trial, wd, results, time.perf_counter() - t0)


def trial_command(p: SearchPlan, number: int) -> list[str]:
    """The command that trains trial `number` of this search in its own process (a Ray
    task's): `jaxaccel sweep ... --run-trial N` (`run_one_trial`)."""
    import sys
    return [sys.executable, "-m", "jaxaccel", "sweep", "--config", os.path.abspath(p.experiment),
            "--workdir", os.path.abspath(p.workdir), "--search", p.sampler,
            "--trials", str(p.trials), "--objective", p.objective, "--pruner", p.pruner,
            "--storage", p.storage, "--study-seed", str(p.study_seed),
            "--run-trial", str(number), *[f"--config.{o}" for o in p.overrides]]


def run_one_trial(experiment: str, workdir: str, number: int, *, sampler: str = "tpe",
                  trials: int, objective: str = "validation_accuracy", pruner: str = "none",
                  storage: str | None = None, study_seed: int = 0,
                  overrides: Sequence[str] = ()) -> None:
    """Train trial `number` (asked by a sweep on Ray, still running) here: it reports to the
    study, may be pruned, and tells the study how it ended. A trial already finished (a
    retried task whose first attempt got that far) is left as it is."""
    from jaxaccel.pipeline import train
    p = plan(experiment, workdir, sampler=sampler, trials=trials, objective=objective,
             pruner=pruner, storage=storage, study_seed=study_seed, overrides=overrides)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=p.study_name, storage=_open_storage(p.storage),
                              pruner=make_pruner(p))
    frozen = study.get_trials(deepcopy=False)
    if not 0 <= number < len(frozen):
        raise ValueError(f"--run-trial {number}: study {p.study_name!r} has trials "
                         f"0..{len(frozen) - 1}")
    if frozen[number].state != TrialState.RUNNING:
        log.info("search: trial %d is %s already", number, frozen[number].state.name.lower())
        return
    _run_trial(p, study, optuna.trial.Trial(study, frozen[number]._trial_id), train,
               worker_attr="ray_worker")


def _run_on_ray(p: SearchPlan, study: optuna.Study, target: int, ran: list[int], *,
                address: str | None, trial_cpus: float, trial_gpus: float,
                on_change: Callable[[], None]) -> None:
    """Ask trials and train each as a Ray task (`trial_command`), as many at once as the
    cluster has slots; the task's process reports, prunes and tells the study itself. A task
    whose node dies is retried elsewhere and resumes its trial from its checkpoint; one that
    fails without telling the study marks its trial failed with its log's last error."""
    from jaxaccel.sweep import ray_engine
    from jaxaccel.sweep.points import last_error_line, log_tail
    driver = {"host": socket.gethostname(), "pid": os.getpid()}  # stale detection reads this
    with ray_engine.connected(address) as ray:
        task = ray_engine.task_for(ray, trial_cpus, trial_gpus)
        capacity = ray_engine.slots(ray, trial_cpus, trial_gpus)
        inflight: dict[Any, optuna.Trial] = {}
        while True:
            now = study.get_trials(deepcopy=False)
            have = len(counted(now)) + sum(map(_elsewhere, now)) + len(inflight)
            while have < target and len(inflight) < capacity:
                trial = study.ask({k.key: k.optuna for k in p.keys})
                wd = trial_workdir(p, trial)
                trial.set_user_attr("workdir", os.path.basename(wd))
                trial.set_user_attr("worker", driver)
                os.makedirs(wd, exist_ok=True)
                open(os.path.join(wd, LOG_FILE), "w").close()
                inflight[task.remote(trial_command(p, trial.number),
                                     os.path.join(wd, LOG_FILE))] = trial
                ran.append(trial.number)
                have += 1
                log.info("search: trial %d submitted to Ray", trial.number)
            if not inflight:
                return
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                trial = inflight.pop(ref)
                wd = trial_workdir(p, trial)
                code = None
                try:
                    code = ray.get(ref)["returncode"]
                    message = last_error_line(log_tail(os.path.join(wd, LOG_FILE)), code)
                except Exception as e:  # noqa: BLE001 - retries used up
                    message = f"Ray task failed: {type(e).__name__}: {e}"
                trials = study.get_trials(deepcopy=False)
                if trials[trial.number].state != TrialState.RUNNING:
                    pass  # the task's process told the study
                elif code == ray_engine.PREEMPTED_EXIT:  # it checkpointed: train it again
                    _requeue(study, trials[trial.number], trials, trial, "preempted on Ray")
                else:
                    _fail(study, trial, wd, message, log_tail(os.path.join(wd, LOG_FILE)))
                on_change()


def _tell_results(p: SearchPlan, study: optuna.Study, trial: optuna.Trial, wd: str,
                  results: dict, seconds: float) -> None:
    """Tell the study a finished trial's objective (from its results.json), recording its
    steps, time and validation/test metrics as user attrs."""
    split, metric, _ = OBJECTIVES[p.objective]
    trial.set_user_attr("seconds", round(seconds, 2))
    trial.set_user_attr("steps", int(results.get("steps", 0)))
    for k, v in results.items():
        if k.startswith(("validation_", "test_")) and isinstance(v, (int, float, type(None))):
            trial.set_user_attr(k, v)
    value = results.get(f"{split}_{metric}")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(study, trial, wd, f"the objective {p.objective} is {value!r}, not a finite number")
        return
    study.tell(trial, float(value))
    log.info("search: trial %d %s=%.4g", trial.number, p.objective, value)


def _run_vectorized(p: SearchPlan, study: optuna.Study, trials: Sequence[optuna.Trial]) -> None:
    """Train `trials` (asked together) as one compiled program (`sweep.vectorized`), each in
    its own trial workdir, then tell the study each one's objective (or failure)."""
    from jaxaccel.sweep import vectorized
    from jaxaccel.sweep.points import DONE, RESULTS_FILE, PointRun, read_error, status_of
    runs = []
    for trial in trials:
        wd = trial_workdir(p, trial)
        trial.set_user_attr("workdir", os.path.basename(wd))
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        trial.set_user_attr("vectorized_trials", len(trials))
        params = {k.key: k.value(trial.params[k.key]) for k in p.keys}
        config = point_config(p.base, params)
        trial.set_user_attr("full_steps", full_steps(config))
        runs.append(PointRun(overrides=params, name=os.path.basename(wd), config=config,
                             workdir=wd))
    log.info("search: trials %s as one program (%s)", ", ".join(str(t.number) for t in trials),
             p.vectorize)
    t0 = time.perf_counter()
    vectorized.run_points(runs, mode=p.vectorize)
    seconds = time.perf_counter() - t0
    for trial, run in zip(trials, runs):
        if status_of(run.workdir, run.config) == DONE:
            _tell_results(p, study, trial, run.workdir,
                          io.read_json(os.path.join(run.workdir, RESULTS_FILE)), seconds)
        else:
            _fail(study, trial, run.workdir, run.error or read_error(run.workdir) or "failed")


def _fail(study: optuna.Study, trial: optuna.Trial, wd: str, message: str,
          details: str = "") -> None:
    from jaxaccel import pipeline
    trial.set_user_attr("error", message)
    trial.set_user_attr("steps", pipeline.trained_steps(wd) or 0)
    io.write_text(os.path.join(wd, ERROR_FILE), message + "\n\n" + details)
    study.tell(trial, state=TrialState.FAIL)
    log.error("search: trial %d failed: %s", trial.number, message)


# ----------------------------------------------------------------------------------------
# search.json
# ----------------------------------------------------------------------------------------
def _state(t: FrozenTrial, trials: Sequence[FrozenTrial]) -> str:
    if t.state == TrialState.FAIL and ("interrupted" in t.user_attrs or any(
            o.user_attrs.get("resumes") == t.number for o in trials)):
        return "interrupted"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
            TrialState.FAIL: "failed", TrialState.RUNNING: "running",
            TrialState.WAITING: "waiting"}[t.state]


def record(p: SearchPlan, study: optuna.Study, *, importances: bool = False) -> dict[str, Any]:
    """What search.json holds, rebuilt from the study (the truth); `importances`: also
    Optuna's fANOVA importance of each key (at the end of a run: it fits a forest)."""
    trials = study.get_trials(deepcopy=False)
    by_key = {k.key: k for k in p.keys}
    rows = []
    for t in trials:
        a = t.user_attrs
        params = {k: by_key[k].value(v) if k in by_key else v for k, v in t.params.items()}
        rows.append({"number": t.number, "state": _state(t, trials), "params": params,
                     "value": t.value if t.state == TrialState.COMPLETE else None,
                     **{k: a.get(k) for k in ("validation_accuracy", "validation_loss",
                                              "test_accuracy", "test_loss")},
                     "steps": a.get("steps"), "full_steps": a.get("full_steps"),
                     "pruned_at": a.get("pruned_at"), "seconds": a.get("seconds"),
                     "workdir": os.path.join(TRIALS_DIR, a["workdir"]) if "workdir" in a else None,
                     **({"error": a["error"]} if "error" in a else {}),
                     **({"resumes": a["resumes"]} if "resumes" in a else {}),
                     **({"vectorized_trials": a["vectorized_trials"]}  # trained K at once
                        if "vectorized_trials" in a else {})})
    counts = {s: sum(r["state"] == s for r in rows)
              for s in ("complete", "pruned", "failed", "interrupted", "running", "waiting")}
    # Compute: each workdir's steps once (an interrupted trial's go on in the trial resuming it).
    steps: dict[str, int] = {}
    for r in rows:
        if r["workdir"] and r["steps"] is not None:
            steps[r["workdir"]] = max(steps.get(r["workdir"], 0), r["steps"])
    full = sum(r["full_steps"] or 0 for r in rows if r["state"] in ("complete", "pruned",
                                                                    "failed"))
    trained = sum(steps.values())
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        b = study.best_trial
        row = rows[b.number]
        best = {"number": b.number, "value": b.value, "params": row["params"],
                "validation_accuracy": row["validation_accuracy"],
                "test_accuracy": row["test_accuracy"], "workdir": row["workdir"],
                "overrides": cli_overrides(row["params"]),
                "command_line": shlex.join(cli_overrides(row["params"]))}
    history, best_so_far = [], None
    for t in complete:
        if best_so_far is None or (t.value > best_so_far if p.direction == "maximize"
                                   else t.value < best_so_far):
            best_so_far = t.value
        history.append({"number": t.number, "value": t.value, "best": best_so_far})
    return io.to_jsonable({
        "study": p.study_name, "storage": shown_storage(p.storage),
        "experiment": os.path.abspath(p.experiment), "overrides": p.overrides,
        "sampler": p.sampler, "pruner": p.pruner, "study_seed": p.study_seed,
        "objective": p.objective, "direction": p.direction,
        "search_space": {k.key: k.describe() for k in p.keys},
        "trials_requested": p.trials, "counts": counts, "trials": rows, "best": best,
        "history": history,
        "importances": _importances(study, complete) if importances else None,
        "compute": {"steps_trained": trained, "full_steps": full,
                    "fraction": trained / full if full else None},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _importances(study: optuna.Study, complete: list[FrozenTrial]) -> dict[str, float] | None:
    """Optuna's fANOVA importance of each searched key (None: under 3 complete trials)."""
    if len(complete) < 3:
        return None
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return {k: float(v) for k, v in
                optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except Exception as e:  # noqa: BLE001 - e.g. every complete trial drew the same params
        log.debug("search: no parameter importances (%s)", e)
        return None


def write_record(p: SearchPlan, study: optuna.Study, *, importances: bool = False) -> dict:
    """Write WORKDIR/search.json (`record`); returns it."""
    body = record(p, study, importances=importances)
    io.write_json(os.path.join(p.workdir, SEARCH_FILE), body, sort_keys=False)
    return body


def table(body: dict) -> list[str]:
    """search.json's trials as a short text table, then the best trial's line."""
    keys = list(body["search_space"])
    head = ["trial", "state", body["objective"], "test_acc", "steps", *keys]
    lines = [head]
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    for t in body["trials"]:
        lines.append([str(t["number"]), t["state"],
                      fmt(t["value"] if t["state"] == "complete" else None),
                      fmt(t["test_accuracy"]), fmt(t["steps"]),
                      *[fmt(t["params"].get(k)) for k in keys]])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    b = body["best"]
    if b is not None:
        out.append(f"best: trial {b['number']} {body['objective']}={fmt(b['value'])} "
                   f"(validation_accuracy={fmt(b['validation_accuracy'])}, "
                   f"test_accuracy={fmt(b['test_accuracy'])}): {b['command_line']}")
    c = body["compute"]
    if c["full_steps"]:
        out.append(f"compute: {c['steps_trained']} steps trained of {c['full_steps']} for "
                   f"{sum(body['counts'][s] for s in ('complete', 'pruned', 'failed'))} full "
                   f"runs ({100 * c['fraction']:.0f}%)")
    return out
