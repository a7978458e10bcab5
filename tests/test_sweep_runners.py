"""jaxaccel.sweep.runners: running a sweep's points in this process or in `jaxaccel train`
worker processes — bad keys fail before anything runs, a failing point records its error,
re-runs skip finished points — and the report after (through `jaxaccel sweep`)."""
import json
import os
import sys
import textwrap

import pytest
from PIL import Image

from jaxaccel import cli, config as config_lib, sweep

EXPERIMENT = '''
from jaxaccel import sweep
from jaxaccel.config import default_config

def get_config():
    c = default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 32
    c.eval_batch_size = 360
    c.num_steps = 6
    c.log_every = 3
    c.checkpoint_every = 6
    c.progress = False
    c.parallel.num_devices = 1
    return c

def get_sweep():
    return {sweep_expr}
'''


def write_experiment(tmp_path, sweep_expr: str, name="exp.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(EXPERIMENT.replace("{sweep_expr}", sweep_expr)))
    return str(path)


def test_bad_key_fails_up_front_with_one_line(tmp_path, capsys):
    exp = write_experiment(tmp_path, 'sweep.grid("optimizer.lrr", [0.1, 0.2])')
    wd = tmp_path / "wd"
    assert cli.main(["sweep", "--config", exp, "--workdir", str(wd)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:")
    assert "optimizer.lrr" in err[0] and "optimizer.lr" in err[0]
    assert not wd.exists()  # nothing ran, nothing was written
    exp = write_experiment(tmp_path, 'sweep.grid("model.width", [1.0, 1.0])', "dup.py")
    assert cli.main(["sweep", "--config", exp, "--workdir", str(wd)]) == 2
    assert "same point" in capsys.readouterr().err


def mtimes(wd, names):
    return {n: os.path.getmtime(os.path.join(wd, n, "results.json")) for n in names}


def test_grid_with_seeds_failure_and_rerun(tmp_path, capsys):
    exp = write_experiment(tmp_path, 'sweep.product(sweep.grid("optimizer.lr", [1e-3, 3e-3]), '
                                     'sweep.grid("model.width", [0.5, 1.0]), sweep.seeds(2))')
    wd = tmp_path / "runs"
    bad = "model.width=1.0,optimizer.lr=0.003,seed=1"
    # Force one point to fail at run time: a file stands where its checkpoints go.
    os.makedirs(wd / bad)
    (wd / bad / "checkpoints").write_text("not a directory")

    assert cli.main(["sweep", "--config", exp, "--workdir", str(wd)]) == 1
    out = capsys.readouterr().out
    assert "7/8 points done" in out and f"failed {bad}" in out
    names = [sweep.point_name(p) for p in sweep.load_sweep(exp)]
    assert len(set(names)) == 8 and "model.width=0.5,optimizer.lr=0.001,seed=0" in names
    status = json.loads((wd / "sweep.json").read_text())
    by_name = {p["name"]: p for p in status["points"]}
    assert by_name[bad]["status"] == "failed" and "checkpoint" in by_name[bad]["error"]
    assert sum(p["status"] == "done" for p in status["points"]) == 7
    assert (wd / bad / "error.txt").read_text().startswith("CheckpointSaveError:")
    for n in names:
        if n != bad:
            results = json.loads((wd / n / "results.json").read_text())
            assert results["steps"] == 6 and 0 <= results["test_accuracy"] <= 1
            assert json.loads((wd / n / "point.json").read_text())["name"] == n

    # Report: one csv row per point; md rows grouped over the 2 seeds; PNGs that open.
    rows = (wd / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 9 and rows[0].startswith("point,status,optimizer.lr,model.width,seed")
    md = (wd / "results.md").read_text()
    assert "±" in md and "## Failed points" in md and bad in md
    # Plots of what varies: lr and width (not seed); every point is dense float32.
    assert sorted(p.name for p in wd.glob("*.png")) == [
        "accuracy_vs_model.width.png", "accuracy_vs_optimizer.lr.png", "training_curves.png"]
    for png in wd.glob("*.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100

    # Other overrides for the same workdir: refused before anything runs.
    assert cli.main(["sweep", "--config", exp, "--workdir", str(wd), "--config.batch_size=16"]) == 2
    assert "holds a different experiment (batch_size: 32 -> 16)" in capsys.readouterr().err

    # Re-run: finished points are skipped; the fixed point runs.
    (wd / bad / "checkpoints").unlink()
    before = mtimes(wd, [n for n in names if n != bad])
    result = sweep.run(exp, str(wd))
    assert sorted(result.skipped) == sorted(n for n in names if n != bad)
    assert not result.failed and all(r.status == "done" for r in result.runs)
    assert mtimes(wd, before) == before
    assert not (wd / bad / "error.txt").exists() and (wd / bad / "results.json").exists()
    assert "## Failed points" not in (wd / "results.md").read_text()
    # And once more: nothing to do.
    assert len(sweep.run(exp, str(wd), report=False).skipped) == 8


def test_worker_processes_and_their_failures(tmp_path):
    """Two `jaxaccel train` processes; a point that fails at run time records its error."""
    exp = write_experiment(tmp_path, 'sweep.grid("batch_size", [32, 5000])')
    wd = tmp_path / "runs"
    result = sweep.run(exp, str(wd), workers=2, overrides=["optimizer.lr=0.002"], report=False)
    ok, bad = wd / "batch_size=32", wd / "batch_size=5000"
    assert [r.status for r in result.runs] == ["done", "failed"]
    assert "5000" in result.runs[1].error and "exceeds" in result.runs[1].error
    assert (bad / "log.txt").exists() and (bad / "error.txt").exists()
    saved = config_lib.from_json((ok / "config.json").read_text())
    assert saved.optimizer.lr == 0.002 and saved.batch_size == 32  # CLI values round-tripped
    assert json.loads((ok / "results.json").read_text())["steps"] == 6


def finished_sweep(tmp_path, sweep_expr, accuracy):
    """A sweep workdir whose points all look finished (no training): experiment, workdir."""
    exp = write_experiment(tmp_path, sweep_expr)
    wd = tmp_path / "runs"
    for run in sweep.plan(config_lib.load_experiment(exp, []), sweep.load_sweep(exp), str(wd)):
        sweep.mark_started(run)
        (wd / run.name / "config.json").write_text(config_lib.to_json(run.config))
        (wd / run.name / "results.json").write_text(json.dumps(
            {"test_accuracy": accuracy(run.overrides), "test_loss": 0.5, "steps": 6,
             "train_images_per_sec": 100.0}))
    return exp, wd


def test_sweep_prints_the_results_table(tmp_path, capsys):
    exp, wd = finished_sweep(tmp_path, 'sweep.product(sweep.grid("optimizer.lr", [1e-3, 1e-2]), '
                                       'sweep.seeds(2))', lambda p: 0.9 - p["optimizer.lr"] - p["seed"] / 100)
    assert cli.main(["sweep", "--config", exp, "--workdir", str(wd)]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index("| optimizer.lr | n | test_accuracy | test_loss | sparsity | bits | packed_bytes "
                       "| train_images_per_sec |")
    assert out[header + 2].startswith("| 0.001 | 2 | 0.8940 ± 0.0071 |")
    assert out[header + 3].startswith("| 0.01 | 2 | 0.8850 ± 0.0071 |")
    assert any(l.startswith("No best point is selected") for l in out[header:])
    assert out[-1].startswith("sweep: 4/4 points done (4 finished before), 0 failed")
    assert (wd / "results.md").read_text().count(out[header + 2]) == 1  # results.md's table
    assert cli.main(["sweep", "--config", exp, "--workdir", str(wd), "--no-report"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("sweep: 4/4 points done")


def test_workers_record_how_many_shared_the_machine(tmp_path, monkeypatch):
    """point.json says how many worker processes ran at once while the point trained."""
    def fake_train(experiment, run, base_overrides):  # a worker that finishes at once
        path = os.path.join(os.path.abspath(run.workdir), "results.json")
        return [sys.executable, "-c", f"open({path!r}, 'w').write('{{}}')"]
    from jaxaccel.sweep import runners as sweep_run
    monkeypatch.setattr(sweep_run, "worker_command", fake_train)
    base = config_lib.default_config()

    def point_file(run):
        return json.loads((tmp_path / run.name / "point.json").read_text())

    runs = sweep.plan(base, sweep.grid("optimizer.lr", [0.1, 0.2]), str(tmp_path))
    sweep.run_workers("exp.py", runs, [], workers=2, poll_seconds=0.01)
    assert [r.status for r in runs] == ["done", "done"]
    assert [point_file(r)["concurrent_workers"] for r in runs] == [2, 2]

    alone = sweep.plan(base, sweep.grid("optimizer.lr", [0.3]), str(tmp_path))
    sweep.run_workers("exp.py", alone, [], workers=2, poll_seconds=0.01)
    assert point_file(alone[0])["concurrent_workers"] == 1
    sweep.mark_started(runs[0])  # run again in this process: the old record goes
    assert "concurrent_workers" not in point_file(runs[0])


def test_worker_command_trains_the_point_in_its_own_workdir(tmp_path):
    run = sweep.plan(config_lib.default_config(), [{"optimizer.lr": 0.5}], str(tmp_path))[0]
    cmd = sweep.worker_command("exp.py", run, ["batch_size=16"])
    assert cmd[:4] == [sys.executable, "-m", "jaxaccel", "train"]
    assert cmd[cmd.index("--config") + 1] == os.path.abspath("exp.py")
    assert cmd[cmd.index("--workdir") + 1] == os.path.abspath(run.workdir)
    assert cmd[-3:] == ["--config.batch_size=16", "--config.optimizer.lr=0.5",
                        "--config.progress=false"]  # base overrides, then the point's


def test_workers_and_vectorize_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either --workers or --vectorize"):
        sweep.run("exp.py", str(tmp_path), workers=2, vectorize=True)
