"""Workdirs written by older versions of jaxaccel still load, predict and resume.

`tests/fixtures/old_workdir` was written by jaxaccel at commit 3189569 (see
`tests/fixtures/make_old_workdir.py`): a train → prune → finetune pipeline preempted after 9
of its 12 steps, in its finetune stage.
"""
import os
import shutil

import jax
import numpy as np
import pytest

import jaxaccel
from fixtures.make_old_workdir import config as fixture_config

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OLD = os.path.join(HERE, "old_workdir")


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(HERE, "old_workdir_expected.npz")))


def test_old_workdir_loads_and_predicts_the_same_logits(expected):
    run = jaxaccel.load(OLD)
    assert run.step == 9
    logits = np.asarray(run.predict(expected["images"]))
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_old_workdir_resumes_to_the_uninterrupted_result(tmp_path, expected):
    workdir = str(tmp_path / "old")
    shutil.copytree(OLD, workdir)
    config = fixture_config()
    config.parallel.num_devices = 1  # as the fixture was made (the rounding of a sum differs)
    results = jaxaccel.train(config, workdir)
    assert results["steps"] == 12
    assert [row["name"] for row in results["stages"]] == ["train", "prune", "finetune"]
    params = jaxaccel.load(workdir).variables["params"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_allclose(np.asarray(leaf), expected["final" + jax.tree_util.keystr(path)],
                                   rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
