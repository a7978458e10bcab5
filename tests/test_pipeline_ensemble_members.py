"""Ensembles whose members differ in shapes or program (`ensemble.overrides` setting
model.*, batch_size, optimizer.name): each member is a run of its own, trained one after
another in WORKDIR/members/member<k>, then combined on validation only like stacked members;
the ensemble loads, predicts, exports and teaches like any run."""
import json
import os

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import cli, config as config_lib, data
from jaxaccel.compress import export as ex
from tiny_runs import tiny_config

OVERRIDES = ({}, {"model.width": 0.5, "optimizer.name": "sgd", "optimizer.lr": 0.05,
                  "batch_size": 32, "seed": 5})


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("members"))
    config = tiny_config(**{"ensemble.members": 2, "dataset.validation_split": 0.2,
                            "ensemble.combine": "logistic", "ensemble.overrides": OVERRIDES,
                            "num_steps": 10})
    return wd, config, jaxaccel.train(config, wd)


def test_each_member_is_its_own_run_equal_to_a_separate_one(members, tmp_path):
    wd, config, results = members
    assert config_lib.sequential_members(config)
    single = str(tmp_path / "single")
    jaxaccel.train(tiny_config(**{"dataset.validation_split": 0.2, "num_steps": 10,
                                  **OVERRIDES[1]}), single)
    want = jaxaccel.load(single).variables["params"]
    got = jaxaccel.load(os.path.join(wd, "members", "member1")).variables["params"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    record = results["ensemble"]["members"]
    assert [m["workdir"] for m in record] == ["members/member0", "members/member1"]
    assert [m["seed"] for m in record] == [0, 5]
    assert record[1]["overrides"] == OVERRIDES[1]
    assert record[1]["num_params"] < record[0]["num_params"]  # half width
    own = json.load(open(os.path.join(wd, "members", "member1", "results.json")))
    assert record[1]["test"]["accuracy"] == pytest.approx(own["test_accuracy"], abs=1e-9)
    assert results["steps"] == 20 and results["test_accuracy"] == \
        results["ensemble"]["logistic"]["test"]["accuracy"]
    stored = json.load(open(os.path.join(wd, "ensemble.json")))
    assert stored["workdirs"] == ["members/member0", "members/member1"]
    assert np.shape(stored["logistic"]["kernel"]) == (20, 10)


def test_the_loaded_ensemble_predicts_and_exports_its_combination(members, tmp_path, capsys):
    wd, _, results = members
    run = jaxaccel.load(wd)
    assert run.members == 2 and run.step is None and run.model.heterogeneous
    images, labels = data.read_arrays(data.get_source("digits", "test"), np.arange(360))
    logits = np.asarray(run.predict(images))
    assert float(np.mean(logits.argmax(-1) == labels)) == pytest.approx(
        results["test_accuracy"], abs=1e-9)
    out = tmp_path / "members.stablehlo"
    assert cli.main(["compress", "export", wd, "--out", str(out)]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(ex.load_exported(out).call(images[:50]), logits[:50],
                               rtol=1e-5, atol=1e-5)


def test_a_rerun_trains_no_finished_member_again_and_it_can_teach(members, tmp_path):
    wd, config, results = members
    metrics = os.path.join(wd, "members", "member0", "metrics.jsonl")
    before = os.path.getmtime(metrics)
    again = jaxaccel.train(config, wd)
    assert os.path.getmtime(metrics) == before
    assert again["ensemble"] == results["ensemble"]
    student = jaxaccel.train(tiny_config(**{"model.width": 0.25, "distill.teacher": wd,
                                            "distill.temperature": 4.0}),
                             str(tmp_path / "student"))
    assert student["test_accuracy"] > 0.2


EXPERIMENT = """
from jaxaccel.config import default_config

def get_config():
    c = default_config()
    c.dataset.name, c.model.name, c.num_steps, c.batch_size = "digits", "lenet300_100", 2, 32
    c.progress = False
    c.ensemble.members = 2
    c.ensemble.overrides = {overrides}
    return c
"""


@pytest.mark.parametrize("overrides,needle", [
    ("({'dataset.name': 'mnist5k'}, {})", "'dataset.name' cannot differ between members"),
    ("({'model.name': 'lenet7'}, {})", "ensemble.overrides[0]: "),
    ("({'model.width': 0.5}, {'optimizer.name': 'rmsprop'})",
     "ensemble.overrides[1]: optimizer.name='rmsprop' is not valid; choose one of"),
])
def test_bad_member_overrides_are_one_line_errors(overrides, needle, tmp_path, capsys):
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.format(overrides=overrides))
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not workdir.exists(), err
    assert needle in err[0], err[0]


def test_an_ensemble_is_not_packaged(members, tmp_path, capsys):
    out = tmp_path / "members.jxz"
    assert cli.main(["compress", "package", members[0], "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an ensemble run (2 members)" in err[0] and not out.exists()
