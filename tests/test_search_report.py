"""jaxaccel.sweep.search_report (`jaxaccel report W` on a `jaxaccel sweep --search` workdir):
the trials table, the best trial chosen on validation with its test accuracy beside and a
ready-to-run override list, the compute used, the plots (history, importances only when they
can be measured, the objective against each key); rebuilt from the study when only
study.db is left, from search.json when the study lives elsewhere; a search with no trials is
one line, exit 2."""
import csv
import json
import os

from PIL import Image

from jaxaccel import cli
from jaxaccel.sweep import search, search_report
from jaxaccel.sweep.points import format_value
from test_search import write_experiment

def experiment(tmp_path):
    """test_search's tiny digits experiment, 4 steps, searching lr and weight decay."""
    return write_experiment(tmp_path, '{"optimizer.lr": sweep.loguniform(1e-3, 3e-2), '
                                      '"optimizer.weight_decay": sweep.loguniform(1e-5, 1e-3)}',
                            extra="c.num_steps = 4")


def fmt(v):
    return f"{v:.4f}"


def test_report_of_a_tiny_search(tmp_path, capsys):
    exp, wd = experiment(tmp_path), tmp_path / "wd"
    search.run(exp, str(wd), sampler="random", trials=3)
    body = json.loads((wd / "search.json").read_text())
    best = body["best"]
    assert [t["state"] for t in body["trials"]] == ["complete"] * 3

    assert cli.main(["report", str(wd)]) == 0
    out = capsys.readouterr().out
    assert f"best: trial {best['number']} validation_accuracy=" in out and "compute:" in out
    md = (wd / "search.md").read_text()
    # The best trial is the one with the highest validation accuracy; its test accuracy is on
    # the same line, and its overrides are a ready-to-run command line.
    assert best["validation_accuracy"] == max(t["validation_accuracy"] for t in body["trials"])
    line = next(l for l in md.splitlines() if l.startswith(f"**Trial {best['number']}**"))
    assert (f"validation accuracy **{fmt(best['validation_accuracy'])}**, test accuracy "
            f"**{fmt(best['test_accuracy'])}**") in line
    lr = format_value(best["params"]["optimizer.lr"])
    assert f"--config.optimizer.lr={lr}" in md and "jaxaccel train --config" in md
    assert f"optuna-dashboard sqlite:///{wd}/study.db" in md
    steps = sum(t["steps"] for t in body["trials"])
    assert f"{steps:,} steps trained by the trials vs {3 * 4:,} for 3 full runs" in md
    rows = list(csv.DictReader(open(wd / "trials.csv")))
    assert [(int(r["trial"]), r["state"]) for r in rows] == [
        (t["number"], t["state"]) for t in body["trials"]]
    assert all(r["optimizer.lr"] and r["optimizer.weight_decay"] for r in rows)
    # Plots: the history, importances (3 complete trials), the objective against each key.
    assert {p for p in os.listdir(wd) if p.endswith(".png")} == {
        "search_history.png", "search_importances.png", "search_vs_optimizer.lr.png",
        "search_vs_optimizer.weight_decay.png"}
    assert Image.open(wd / "search_history.png").size[0] > 500
    importances = md[md.index("## Parameter importances"):]
    assert "| `optimizer.lr` |" in importances and "| `optimizer.weight_decay` |" in importances

    # Only the study left (search.json deleted): rebuilt from study.db, same best trial.
    (wd / "search.json").unlink()
    assert cli.main(["report", str(wd), "--no-plots"]) == 0
    md = (wd / "search.md").read_text()
    assert f"**Trial {best['number']}**" in md and "Sampler `unknown`" in md
    assert not (wd / "search.json").exists()


def test_a_search_with_no_trials_is_one_line_exit_2(tmp_path, capsys):
    exp, wd = experiment(tmp_path), tmp_path / "wd"
    p = search.plan(exp, str(wd), trials=2)
    wd.mkdir()
    search.write_record(p, search.open_study(p))  # as a sweep killed before its first trial
    assert cli.main(["report", str(wd)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trials" in err[0] and "exp" in err[0], err
    assert not (wd / "search.md").exists()


def hand_made(wd, trials, storage="postgresql://user:***@db/optuna"):
    """A search.json as a search whose study lives in another storage leaves it."""
    space = {"optimizer.lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-2},
             "model.kwargs.hidden": {"kind": "choice", "values": [[64, 32], [32, 16]]}}
    rows = []
    for n, (state, lr, hidden, val, test, steps) in enumerate(trials):
        rows.append({"number": n, "state": state, "params": {"optimizer.lr": lr,
                                                             "model.kwargs.hidden": hidden},
                     "value": val if state == "complete" else None,
                     "validation_accuracy": val, "validation_loss": 1 - val,
                     "test_accuracy": test, "test_loss": 1 - test, "steps": steps,
                     "full_steps": 8, "pruned_at": steps if state == "pruned" else None,
                     "seconds": 1.0, "workdir": f"trials/trial-{n:04d}"})
    done = [r for r in rows if r["state"] == "complete"]
    b = max(done, key=lambda r: r["value"])
    best = {"number": b["number"], "value": b["value"], "params": b["params"],
            "validation_accuracy": b["validation_accuracy"],
            "test_accuracy": b["test_accuracy"], "workdir": b["workdir"],
            "overrides": [
                f"--config.{k}={format_value(tuple(v) if isinstance(v, list) else v)}"
                for k, v in b["params"].items()]}
    steps = sum(r["steps"] for r in rows)
    body = {"study": "exp", "storage": storage, "experiment": "/x/exp.py", "overrides": [],
            "sampler": "tpe", "pruner": "asha", "study_seed": 0,
            "objective": "validation_accuracy", "direction": "maximize", "search_space": space,
            "trials_requested": len(rows),
            "counts": {s: sum(r["state"] == s for r in rows) for s in
                       ("complete", "pruned", "failed", "interrupted", "running", "waiting")},
            "trials": rows, "best": best, "history": [], "importances": None,
            "compute": {"steps_trained": steps, "full_steps": 8 * len(rows),
                        "fraction": steps / (8 * len(rows))}}
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "search.json").write_text(json.dumps(body))
    return body


def test_importances_need_two_complete_trials_and_a_varying_key(tmp_path):
    wd = tmp_path / "wd"
    hand_made(wd, [("complete", 1e-3, [64, 32], 0.9, 0.88, 8),
                   ("pruned", 3e-3, [32, 16], 0.5, 0.5, 2)])
    (wd / "search_importances.png").write_bytes(b"stale")
    paths, body = search_report.build(str(wd))
    md = (wd / "search.md").read_text()
    assert "Not computed: parameter importances need at least 2 complete trials (1 so far)" in md
    assert not (wd / "search_importances.png").exists()  # the stale plot is gone
    # Tuples are categories: the key varies among complete + pruned trials, so it is plotted.
    assert set(paths) == {"md", "csv", "search_history", "search_vs_optimizer.lr",
                          "search_vs_model.kwargs.hidden"}
    # The command and the override list are shell-quoted, ready to paste.
    assert md.count("--config.optimizer.lr=0.001 '--config.model.kwargs.hidden=(64, 32)'") == 2
    assert "| 1 | pruned | _0.5000_ | _0.5000_ | 2 (pruned) |" in md
    assert "optuna-dashboard postgresql://user:***@db/optuna" in md

    hand_made(wd, [("complete", 1e-3, [64, 32], 0.9, 0.88, 8),
                   ("complete", 1e-3, [64, 32], 0.8, 0.81, 8)])
    imp, why = search_report.importances(json.loads((wd / "search.json").read_text()))
    assert imp is None and "same value of every searched key" in why
    hand_made(wd, [("complete", 1e-3, [64, 32], 0.9, 0.88, 8),
                   ("complete", 3e-3, [64, 32], 0.8, 0.81, 8),
                   ("complete", 5e-3, [32, 16], 0.7, 0.71, 8)])
    imp, why = search_report.importances(json.loads((wd / "search.json").read_text()))
    assert set(imp) == {"optimizer.lr", "model.kwargs.hidden"} and why == ""
    assert abs(sum(imp.values()) - 1) < 1e-6
