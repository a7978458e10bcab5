"""What may change when a run resumes: num_steps extends a run only where nothing already
planned changes; otherwise one clear refusal (or --overwrite starts again)."""
import json
import os

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import cli
from jaxaccel.config import default_config


def _config(steps, schedule):
    c = default_config()
    c.dataset.name, c.model.name = "digits", "lenet300_100"
    c.num_steps, c.log_every, c.checkpoint_every, c.progress = steps, 4, 4, False
    c.batch_size, c.eval_batch_size = 32, 120
    c.optimizer.schedule, c.optimizer.lr = schedule, 3e-3
    c.parallel.num_devices = 1
    return c


def _params(workdir):
    return jax.tree.leaves(jax.device_get(jaxaccel.load(workdir).variables["params"]))


@pytest.mark.parametrize("schedule", ["cosine", "warmup_cosine"])
def test_more_steps_under_a_decaying_schedule_is_refused(schedule, tmp_path):
    workdir = str(tmp_path / "run")
    c = _config(8, schedule)
    c.optimizer.warmup_steps = 2 if schedule == "warmup_cosine" else 0
    jaxaccel.train(c, workdir)
    before = {f: open(os.path.join(workdir, f)).read() for f in ("config.json", "results.json")}
    c.num_steps = 12
    with pytest.raises(ValueError, match=rf"num_steps 8 -> 12: optimizer.schedule='{schedule}' "
                                         r"decays over num_steps.*step 8 would jump from"):
        jaxaccel.train(c, workdir)
    assert before == {f: open(os.path.join(workdir, f)).read() for f in before}
    results = jaxaccel.train(c, workdir, overwrite=True)  # starts again, as asked
    assert results["steps"] == 12
    assert json.load(open(os.path.join(workdir, "config.json")))["num_steps"] == 12


def test_a_constant_schedule_extends_exactly(tmp_path, caplog):
    extended, fresh = str(tmp_path / "extended"), str(tmp_path / "fresh")
    jaxaccel.train(_config(8, "constant"), extended)
    with caplog.at_level("INFO", logger="jaxaccel"):
        results = jaxaccel.train(_config(12, "constant"), extended)
    assert "num_steps 8 -> 12" in caplog.text and "continuing from step 8" in caplog.text
    assert results["steps"] == 12
    jaxaccel.train(_config(12, "constant"), fresh)
    for a, b in zip(_params(extended), _params(fresh)):
        np.testing.assert_array_equal(a, b)


def test_fewer_steps_than_trained_is_refused_on_the_command_line(tmp_path, capsys):
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        "from jaxaccel.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.dataset.name, c.model.name = 'digits', 'lenet300_100'\n"
        "    c.num_steps, c.checkpoint_every, c.batch_size, c.progress = 4, 4, 32, False\n"
        "    return c\n")
    workdir = str(tmp_path / "run")
    args = ["train", "--config", str(experiment), "--workdir", workdir]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args + ["--config.num_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jaxaccel: error: workdir {workdir!r}: num_steps=2 is fewer than the 4 steps "
                   f"this run already trained; use a new --workdir, or --overwrite to start again"]
