"""Ensembles combined by a logistic-regression stacker (Wolpert 1992) fit on the validation
split only, and ensemble members with their own shape-keeping hyperparameters
(`ensemble.overrides`) trained as one program: each equals its own separate run."""
import json
import os

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import cli, data
from jaxaccel.compress import export as ex
from tiny_runs import fits_on_two_test_sets, tiny_config

OVERRIDES = ({"optimizer.lr": 3e-3}, {"optimizer.lr": 1e-3, "seed": 7})
SINGLES = ({"seed": 0, "optimizer.lr": 3e-3}, {"seed": 7, "optimizer.lr": 1e-3})


@pytest.fixture(scope="module")
def logistic(tmp_path_factory):
    """Two members with their own learning rates (and seeds), combined by a logistic stacker."""
    wd = str(tmp_path_factory.mktemp("logistic"))
    config = tiny_config(**{"ensemble.members": 2, "dataset.validation_split": 0.2,
                            "ensemble.combine": "logistic", "ensemble.overrides": OVERRIDES})
    return wd, config, jaxaccel.train(config, wd)


def test_members_with_their_own_lrs_equal_separate_runs(logistic, tmp_path):
    wd, _, results = logistic
    members = jaxaccel.load(wd)
    assert members.members == 2
    for k, changes in enumerate(SINGLES):
        single = str(tmp_path / f"member{k}")
        jaxaccel.train(tiny_config(**{"dataset.validation_split": 0.2, **changes}), single)
        want = jaxaccel.load(single).variables["params"]
        got = jax.tree.map(lambda x, k=k: x[k], members.variables["params"])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    record = results["ensemble"]["members"]
    assert [m["overrides"] for m in record] == [dict(o) for o in OVERRIDES]
    assert [m["seed"] for m in record] == [0, 7]
    assert json.load(open(os.path.join(wd, "ensemble.json")))["seeds"] == [0, 7]


def test_a_loaded_logistic_ensemble_predicts_its_recorded_combination(logistic):
    wd, _, results = logistic
    record = results["ensemble"]
    assert set(record) >= {"members", "average", "stacked", "logistic"}
    for combo in ("average", "stacked", "logistic"):
        assert set(record[combo]) == {"validation", "test"}
        assert set(record[combo]["test"]) == {"accuracy", "loss", "ece", "count"}
    assert results["test_accuracy"] == record["logistic"]["test"]["accuracy"]
    assert results["test_loss"] == record["logistic"]["test"]["loss"]
    stored = json.load(open(os.path.join(wd, "ensemble.json")))
    assert stored["combine"] == "logistic" and stored["weights"] is None
    assert np.shape(stored["logistic"]["kernel"]) == (20, 10)
    assert np.shape(stored["logistic"]["bias"]) == (10,)
    run = jaxaccel.load(wd)
    assert run.model.logistic is not None
    images, labels = data.read_arrays(data.get_source("digits", "test"), np.arange(360))
    logits = np.asarray(run.predict(images), np.float64)
    assert float(np.mean(logits.argmax(-1) == labels)) == pytest.approx(
        record["logistic"]["test"]["accuracy"], abs=1e-9)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    loss = -np.mean(logp[np.arange(len(labels)), labels])
    assert loss == pytest.approx(record["logistic"]["test"]["loss"], rel=1e-4)


def test_the_logistic_stacker_reads_only_the_validation_split(logistic):
    wd, config, _ = logistic
    fits = fits_on_two_test_sets(wd, config)
    for a, b in zip(*fits):  # kernel, bias
        np.testing.assert_array_equal(a, b)


def test_a_logistic_ensemble_exports_like_any_run(logistic, tmp_path, capsys):
    wd = logistic[0]
    out = tmp_path / "logistic.stablehlo"
    assert cli.main(["compress", "export", wd, "--out", str(out)]) == 0
    capsys.readouterr()
    raw, _ = data.read_arrays(data.get_source("digits", "test"), np.arange(50))
    np.testing.assert_allclose(ex.load_exported(out).call(raw), jaxaccel.load(wd).predict(raw),
                               rtol=1e-5, atol=1e-5)


EXPERIMENT = """
from jaxaccel.config import default_config

def get_config():
    c = default_config()
    c.dataset.name, c.model.name, c.num_steps, c.batch_size = "digits", "lenet300_100", 2, 32
    c.progress = False
    c.ensemble.members = 2
{body}
    return c
"""


@pytest.mark.parametrize("body,needle", [
    ("    c.ensemble.combine = 'median'",
     "ensemble.combine='median' is not valid; choose one of: average, stack, logistic"),
    ("    c.ensemble.combine = 'logistic'",
     "ensemble.combine='logistic' fits the combination on the validation split"),
    ("    c.ensemble.overrides = ({'optimizer.lr': 0.1},)",
     "a tuple of ensemble.members=2 dicts"),
    ("    c.ensemble.overrides = ({'dataset.validation_split': 0.5}, {})",
     "'dataset.validation_split' cannot differ between members"),
    ("    c.ensemble.overrides = ({'batch_size': 15}, {})",  # a member's own config is checked
     "ensemble.overrides[0]: batch_size=15 is not divisible"),
    ("    c.ensemble.overrides = ({'optimizer.lr': -1.0}, {})", "must be a number >= 0"),
    ("    c.ensemble.overrides = ({'optimizer.weight_decay': 1e-4}, {})",
     "needs optimizer.weight_decay > 0 in the config"),
])
def test_bad_combinations_and_overrides_are_one_line_errors(body, needle, tmp_path, capsys):
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.format(body=body))
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not workdir.exists(), err
    assert needle in err[0], err[0]
