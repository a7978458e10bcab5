"""jaxaccel.sweep.search (`jaxaccel sweep --search`): an Optuna study over an experiment's
get_search() — the objective is read on validation, ASHA prunes trials early from the loop's
own evaluations, a search killed mid-trial resumes (that trial from its checkpoint) and
reaches --trials in total, and bad input or a foreign study database is refused in one line
with nothing written."""
import json
import os
import socket
import sqlite3
import textwrap

import numpy as np
import optuna
import pytest

from jaxaccel import cli, sweep
from jaxaccel.pipeline import train
from jaxaccel.sweep import search

EXPERIMENT = '''
from jaxaccel import sweep
from jaxaccel.config import default_config

def get_config():
    c = default_config()
    c.dataset.name = "digits"
    c.dataset.validation_split = 0.2
    c.model.name = "lenet300_100"
    c.model.width = 0.25
    c.batch_size = 32
    c.eval_batch_size = 360
    c.num_steps = 8
    c.eval_every = 2
    c.log_every = 4
    c.checkpoint_every = 4
    c.progress = False
    c.parallel.num_devices = 1
    {extra}
    return c

def get_search():
    return {search_expr}
'''


def write_experiment(tmp_path, search_expr, extra="", name="exp.py"):
    path = tmp_path / name
    text = textwrap.dedent(EXPERIMENT).replace("{extra}", extra)
    if search_expr is None:
        text = text[:text.index("def get_search")]
    path.write_text(text.replace("{search_expr}", str(search_expr)))
    return str(path)


def read(path):
    with open(path) as f:
        return json.load(f)


def test_asha_prunes_early_and_the_objective_is_validation(tmp_path, capsys):
    # Shuffled by the grid's seed, trials run lr 3e-3 first, then ever smaller rates:
    # at the first rung (step 2, the first evaluation) those are behind and stop there.
    exp = write_experiment(tmp_path, '{"optimizer.lr": sweep.choice([1e-5, 3e-5, 3e-3, 1e-4])}')
    wd = tmp_path / "wd"
    rc = cli.main(["sweep", "--config", exp, "--workdir", str(wd), "--search", "grid",
                   "--trials", "4", "--pruner", "asha"])
    out = capsys.readouterr().out
    assert rc == 0 and "best: trial" in out
    body = read(wd / "search.json")
    assert body["objective"] == "validation_accuracy" and body["direction"] == "maximize"
    states = [t["state"] for t in body["trials"]]
    assert len(states) == 4 and "pruned" in states and "complete" in states
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{wd}/study.db")
    assert [t.state.name.lower() for t in study.trials] == states
    for t, frozen in zip(body["trials"], study.trials):
        tw = wd / t["workdir"]
        rows = [json.loads(line) for line in open(tw / "metrics.jsonl")]
        val = {r["step"]: r["accuracy"] for r in rows if r["split"] == "validation"}
        # One report per evaluation of the loop, from validation (never test).
        assert {s: v for s, v in frozen.intermediate_values.items()} == \
            {s: val[s] for s in frozen.intermediate_values}
        if t["state"] == "pruned":
            assert t["pruned_at"] == t["steps"] == 2 < 8  # stopped at the first rung
            assert sorted(int(d) for d in os.listdir(tw / "checkpoints") if d.isdigit()) == [2]
            assert not (tw / "results.json").exists()
        else:
            results = read(tw / "results.json")
            assert t["value"] == results["validation_accuracy"] == frozen.value
            assert t["test_accuracy"] == results["test_accuracy"] and t["steps"] == 8
    best = body["best"]
    assert best["params"] == {"optimizer.lr": 3e-3} and best["overrides"] == [
        "--config.optimizer.lr=0.003"]
    assert best["validation_accuracy"] == best["value"] and best["test_accuracy"] is not None
    assert body["compute"]["steps_trained"] < body["compute"]["full_steps"] == 4 * 8


class Killed(BaseException):
    """The sweep process dying mid-trial (nothing of the search sees it coming)."""


def test_search_resumes_after_a_kill_and_counts_trials_in_total(tmp_path):
    exp = write_experiment(tmp_path, '{"optimizer.lr": sweep.loguniform(1e-3, 1e-2), '
                                     '"model.kwargs.hidden": sweep.choice([(64, 32), (32, 16)])}')
    wd = str(tmp_path / "wd")
    seen: dict[str, list[int]] = {}

    def train_fn(config, workdir, on_evaluation):
        name = os.path.basename(workdir)
        steps = seen.setdefault(name, [])

        def hook(step, result):
            steps.append(step)
            if name == "trial-0001" and step == 6 and len(steps) == 3:
                raise Killed  # after the checkpoint at step 4
            return on_evaluation(step, result)
        if name == "trial-0000":
            raise RuntimeError("this trial's own failure")
        return train(config, workdir, on_evaluation=hook)

    with pytest.raises(Killed):
        search.run(exp, wd, sampler="random", trials=3, train_fn=train_fn)
    study = optuna.load_study(study_name="exp", storage=search.default_storage(wd))
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING"]

    result = search.run(exp, wd, sampler="random", trials=3, train_fn=train_fn)  # the rerun
    body = result.record
    assert [t["state"] for t in body["trials"]] == ["failed", "interrupted", "complete",
                                                    "complete"]
    failed, killed, resumed, new = body["trials"]
    assert "own failure" in failed["error"] and body["counts"]["failed"] == 1
    assert open(os.path.join(wd, failed["workdir"], "error.txt")).readline().startswith(
        "RuntimeError: this trial's own failure")
    # The interrupted trial ran again with its params, in its workdir, from its checkpoint.
    assert resumed["resumes"] == 1 and resumed["workdir"] == killed["workdir"]
    assert resumed["params"] == killed["params"] and resumed["steps"] == 8
    assert isinstance(resumed["params"]["model.kwargs.hidden"], tuple | list)
    assert seen["trial-0001"] == [2, 4, 6, 6]  # the rerun's first evaluation: step 6
    assert set(study.trials[2].intermediate_values) == {2, 4, 6}  # carried over + its own
    assert new["workdir"] == "trials/trial-0003" and new["params"] != killed["params"]
    assert result.ran == [2, 3]
    assert search.run(exp, wd, sampler="random", trials=3, train_fn=train_fn).ran == []


@pytest.mark.parametrize("space,extra,args,words", [
    ('{"optimizer.lrr": sweep.loguniform(1e-4, 1e-2)}', "", [], ["optimizer.lrr"]),
    ('{"optimizer.name": sweep.uniform(0.1, 0.2)}', "", [], ["optimizer.name", "str"]),
    ('{"model.width": sweep.choice(["wide", "narrow"])}', "", [], ["model.width", "float"]),
    ('{"num_steps": sweep.uniform(4, 8)}', "", [], ["num_steps", "int"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "", ["--trials", "0"], ["--trials=0"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "c.dataset.validation_split = 0.0", [],
     ["validation_split"]),
    (None, "", [], ["get_search()"]),
    ('{"optimizer.lr": sweep.loguniform(1e-4, 1e-2)}', "", ["--search", "grid"],
     ["grid", "optimizer.lr"]),
    ('{"model.width": sweep.choice([0.5, 1.0])}', "", ["--search", "cmaes"],
     ["cmaes", "model.width"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "", ["--workers", "2"], ["--workers"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "c.eval_every = 0", ["--pruner", "asha"],
     ["eval_every"]),
    ('{"model.width": [0.5, 1.0]}', "", ["--vectorize"], ["--vectorize", "'model.width'"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "", ["--vectorize", "--pruner", "asha"],
     ["--pruner asha", "--vectorize"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "", ["--vectorize", "--vectorize-trials", "1"],
     ["--vectorize-trials=1"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "", ["--vectorize-trials", "3"],
     ["--vectorize-trials 3", "add --vectorize"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "", ["--trial-gpus", "1"],
     ["--trial-gpus", "add --engine ray"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "", ["--storage", "sqlite:////no/such/dir/study.db"],
     ["--storage sqlite:////no/such/dir/study.db", "cannot be opened"]),
    ('{"optimizer.lr": [1e-3, 1e-2]}', "", ["--storage", "postgresql://u@127.0.0.1:1/db"],
     ["--storage", "cannot be opened"]),
], ids=["unknown-key", "uniform-on-str", "choice-type", "uniform-on-int", "trials", "no-val",
        "no-get-search", "grid-not-choice", "cmaes-choice", "workers", "pruner-no-eval",
        "vectorize-shapes", "vectorize-pruner", "vectorize-k", "vectorize-k-alone",
        "trial-gpus-local", "storage-missing-dir",
        "storage-unreachable"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, space, extra, args, words):
    exp = write_experiment(tmp_path, space, extra)
    wd = tmp_path / "wd"
    argv = ["sweep", "--config", exp, "--workdir", str(wd), "--search", "tpe", "--trials", "2"]
    assert cli.main(argv + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    assert all(w in err[0] for w in words), err[0]
    assert not wd.exists()


def test_unknown_sampler_and_trials_without_search(tmp_path, capsys):
    exp = write_experiment(tmp_path, '{"optimizer.lr": [1e-3, 1e-2]}')
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--config", exp, "--workdir", str(tmp_path / "wd"),
                  "--search", "bayes", "--trials", "2"])
    assert e.value.code == 2 and "bayes" in capsys.readouterr().err
    assert cli.main(["sweep", "--config", exp, "--workdir", str(tmp_path / "wd"),
                     "--trials", "2"]) == 2
    assert "--search" in capsys.readouterr().err and not (tmp_path / "wd").exists()


def test_a_foreign_study_database_is_refused_and_kept(tmp_path, capsys):
    exp = write_experiment(tmp_path, '{"optimizer.lr": sweep.loguniform(1e-4, 1e-2)}')
    wd = tmp_path / "wd"
    wd.mkdir()
    db = wd / "study.db"
    argv = ["sweep", "--config", exp, "--workdir", str(wd), "--search", "tpe", "--trials", "2"]

    def refused(*words):
        before = db.read_bytes()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err
        assert db.read_bytes() == before and sorted(os.listdir(wd)) == ["study.db"]

    db.write_bytes(b"not a database at all" * 100)
    refused("not an Optuna study database")
    db.unlink()
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE papers (title TEXT)")
    refused("not an Optuna study database", "papers")
    db.unlink()
    url = search.default_storage(str(wd))
    other = optuna.create_study(study_name="exp", storage=url)  # same name, another space
    other.set_user_attr("jaxaccel", {**search.plan(exp, str(wd), trials=2).identity(),
                                     "search_space": {"optimizer.lr": {"kind": "uniform"}}})
    refused("another search space")
    other.set_user_attr("jaxaccel", search.plan(exp, str(wd), trials=2,
                                                overrides=["batch_size=16"]).identity())
    refused("another config", "batch_size: 16 -> 32")
    optuna.delete_study(study_name="exp", storage=url)
    optuna.create_study(study_name="exp", storage=url)  # someone's own Optuna study
    refused("not a jaxaccel search")
    optuna.delete_study(study_name="exp", storage=url)
    optuna.create_study(study_name="another_experiment", storage=url)
    refused("another_experiment", "another experiment")


def test_intrange_and_how_keys_map_to_optuna():
    with pytest.raises(ValueError, match="multiple of step"):
        sweep.intrange(1, 10, step=2)
    with pytest.raises(ValueError, match="integers"):
        sweep.intrange(1.0, 10)
    with pytest.raises(ValueError, match="low >= 1"):
        sweep.intrange(0, 10, log=True)
    draws = [p["k"] for p in sweep.sample({"k": sweep.intrange(2, 10, step=4)}, 50)]
    assert set(draws) == {2, 6, 10}
    logs = [p["k"] for p in sweep.sample({"k": sweep.intrange(1, 1000, log=True)}, 200)]
    assert all(isinstance(x, int) and 1 <= x <= 1000 for x in logs) and np.median(logs) < 200
    from jaxaccel.config import default_config
    keys = {k.key: k for k in search.search_keys(default_config(), {
        "num_steps": sweep.intrange(100, 1000, step=100),
        "optimizer.lr": sweep.loguniform(1e-4, 1e-1),
        "model.width": sweep.uniform(0.25, 1.0),
        "optimizer.name": sweep.choice(["adam", "sgd"]),
        "model.kwargs.hidden": sweep.choice([(300, 100), (100, 30)])})}
    assert keys["num_steps"].optuna == optuna.distributions.IntDistribution(100, 1000, step=100)
    assert keys["optimizer.lr"].optuna.log and not keys["model.width"].optuna.log
    assert keys["optimizer.name"].optuna.choices == ("adam", "sgd")
    hidden = keys["model.kwargs.hidden"]
    assert hidden.optuna.choices == ("(300, 100)", "(100, 30)")
    assert hidden.value("(100, 30)") == (100, 30)


def test_a_trial_running_in_a_live_process_is_left_alone(tmp_path, capsys):
    exp = write_experiment(tmp_path, '{"optimizer.lr": sweep.loguniform(1e-4, 1e-2)}')
    wd = tmp_path / "wd"
    p = search.plan(exp, str(wd), trials=2)
    wd.mkdir()
    study = search.open_study(p)
    trial = study.ask()  # as another sweep process of this host, still alive, runs it
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getppid()})
    assert cli.main(["sweep", "--config", exp, "--workdir", str(wd), "--search", "tpe",
                     "--trials", "2"]) == 2
    assert "another sweep of this study" in capsys.readouterr().err
    assert [t.state.name for t in study.trials] == ["RUNNING"]


def test_the_search_experiment_plans():
    root = os.path.join(os.path.dirname(__file__), "..", "experiments")
    p = search.plan(os.path.join(root, "search_lenet300.py"), "unused", trials=3,
                    pruner="asha", sampler="tpe")
    assert [k.key for k in p.keys] == ["optimizer.lr", "optimizer.weight_decay", "model.width"]
    assert p.base.dataset.validation_split > 0 and p.study_name == "search_lenet300"


def test_vectorized_search_equals_sequential_trials_for_the_same_suggestions(tmp_path):
    """K suggestions asked at once and trained as one program (`--vectorize loop`, exact on
    one device) get the objective values the same suggestions get trained one by one."""
    exp = write_experiment(tmp_path, '{"optimizer.lr": sweep.choice([1e-3, 1e-2])}')
    values = {}
    for name, how in (("seq", {}), ("vec", {"vectorize": "loop", "per_program": 2})):
        result = search.run(exp, str(tmp_path / name), sampler="grid", trials=2, **how)
        trials = result.record["trials"]
        assert [t["state"] for t in trials] == ["complete"] * 2
        values[name] = {json.dumps(t["params"], sort_keys=True): (t["value"], t["test_accuracy"])
                        for t in trials}
        if how:
            assert all(t["vectorized_trials"] == 2 for t in trials), trials
    assert values["vec"].keys() == values["seq"].keys() and len(values["seq"]) == 2
    for key, (value, test) in values["seq"].items():
        assert values["vec"][key] == pytest.approx((value, test), abs=1e-9), key

