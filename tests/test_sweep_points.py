"""jaxaccel.sweep.points: the point-directory protocol — names, command-line values, configs,
status files and sweep.json."""
import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from jaxaccel import config as config_lib, sweep

def test_point_names_are_stable_safe_and_unique():
    assert sweep.point_name({"seed": 0, "optimizer.lr": 0.001}) == "optimizer.lr=0.001,seed=0"
    assert sweep.point_name({}) == "default"
    weird = {"dataset.path": "/data/my set", "model.kwargs.padding": "SAME",
             "optimizer.boundaries": (100, 200), "optimizer.nesterov": True}
    name = sweep.point_name(weird)
    assert "/" not in name and " " not in name and "boundaries=100-200" in name
    long = {f"model.kwargs.k{i}": 1.0 / 3 for i in range(20)}
    assert len(sweep.point_name(long)) <= 120
    assert sweep.point_name(long) != sweep.point_name({**long, "seed": 1})


scalar = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                   st.booleans(), st.text(max_size=12), st.none())


@settings(max_examples=50, deadline=None)
@given(value=st.one_of(scalar, st.lists(st.integers(-100, 100), max_size=4).map(tuple)))
def test_cli_values_round_trip(value):
    """What a worker process gets on its command line parses back to the same value."""
    assert config_lib.parse_value(sweep.format_value(value)) == value


def test_names_values_and_command_line_of_a_point():
    assert sweep.name_value(True) == "true" and sweep.name_value(1e-3) == "0.001"
    assert sweep.name_value((100, 200)) == "100-200" and sweep.name_value("SAME") == "SAME"
    assert sweep.cli_overrides({"optimizer.lr": 0.1, "dataset.flip": True, "model.kwargs.padding": "SAME"}) == [
        "--config.optimizer.lr=0.1", "--config.dataset.flip=true",
        "--config.model.kwargs.padding='SAME'"]
    with pytest.raises(ValueError, match="cannot be passed on the command line"):
        sweep.format_value(object())


def test_plan_checks_every_point_before_anything_runs(tmp_path):
    base = config_lib.default_config()
    runs = sweep.plan(base, sweep.grid("optimizer.lr", [0.1, 0.2]), str(tmp_path))
    assert [(r.name, r.status, r.config.optimizer.lr) for r in runs] == [
        ("optimizer.lr=0.1", sweep.PENDING, 0.1), ("optimizer.lr=0.2", sweep.PENDING, 0.2)]
    assert runs[0].workdir == os.path.join(str(tmp_path), "optimizer.lr=0.1")
    assert not os.listdir(tmp_path)  # planning writes nothing
    with pytest.raises(config_lib.ConfigError, match="sweep point 'optimizer.lrr=0.1'"):
        sweep.plan(base, [{"optimizer.lrr": 0.1}], str(tmp_path))
    with pytest.raises(ValueError, match="same point"):
        sweep.plan(base, [{"seed": 1}, {"seed": 1}], str(tmp_path))


def test_sweep_file_lists_every_point_and_the_counts(tmp_path):
    base = config_lib.default_config()
    runs = sweep.plan(base, sweep.grid("seed", [0, 1, 2]), str(tmp_path))
    runs[0].status, runs[0].seconds = sweep.DONE, 1.234
    sweep.mark_failed(runs[1], "ValueError: no", "Traceback ...")
    sweep.write_sweep_file(str(tmp_path), runs, experiment="exp.py", overrides=["seed=3"],
                           mode="sequential")
    body = json.loads((tmp_path / sweep.SWEEP_FILE).read_text())
    assert body["counts"] == {"done": 1, "failed": 1, "pending": 1}
    assert body["experiment"] == os.path.abspath("exp.py") and body["overrides"] == ["seed=3"]
    assert body["points"][0] == {"name": "seed=0", "overrides": {"seed": 0}, "status": "done",
                                 "seconds": 1.23}
    assert body["points"][1]["error"] == "ValueError: no"
    assert (tmp_path / "seed=1" / sweep.ERROR_FILE).read_text().startswith("ValueError: no\n\n")


def test_finished_means_results_for_this_many_steps(tmp_path):
    """A finished point re-runs (and continues from its checkpoint) when num_steps grows."""
    c = config_lib.default_config()
    sub = tmp_path / "p"
    sub.mkdir()
    assert sweep.status_of(str(sub), c) == "pending"
    (sub / "config.json").write_text(config_lib.to_json(c))
    (sub / "results.json").write_text("{}")
    assert sweep.status_of(str(sub), c) == "done"
    longer = sweep.point_config(c, {"num_steps": c.num_steps * 2})
    assert sweep.status_of(str(sub), longer) == "pending"
    run = sweep.plan(c, [{"num_steps": c.num_steps * 2}], str(tmp_path))[0]
    (tmp_path / run.name).mkdir()
    sweep.mark_started(run)
    sweep.mark_failed(run, "ValueError: boom\nsecond line", "Traceback ...")
    assert sweep.status_of(run.workdir, run.config) == "failed"
    assert sweep.read_error(run.workdir) == "ValueError: boom second line"


def test_point_configs_are_independent_copies():
    """Overrides inside config.stages must not leak from one point into another."""
    from jaxaccel import stages
    base = config_lib.default_config()
    base.stages = (stages.stage("train", "train", steps=10),
                   stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.5}))
    points = sweep.grid("stages.1.prune.sparsity", [0.8, 0.9])
    configs = [sweep.point_config(base, p) for p in points]
    assert [c.stages[1].prune.sparsity for c in configs] == [0.8, 0.9]
    assert base.stages[1].prune.sparsity == 0.5
