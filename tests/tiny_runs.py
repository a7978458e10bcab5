"""Tiny training runs the tests share, and what tests do to their workdirs.

`tiny_config()` is lenet300_100 on digits on one device: a 20-step run takes a second or two.
`tests/conftest.py` trains it once per test process (the `reference` fixture) and a
train → prune run (`pruned_run`, `pruned_config()`). The rest: reading a workdir back
(`params_of`, `steps_in`), damaging checkpoints the ways disks and people do (`corrupt`),
and running the real `python -m jaxaccel train` command in a subprocess.
"""
import glob
import os
import shutil
import subprocess
import sys
import time

import jaxaccel
from jaxaccel import config as config_lib, metrics, stages

ALL_DEVICES = {"parallel.num_devices": 0}  # every (simulated) device: 8 in the tests


def tiny_config(**changes):
    """lenet300_100 on digits, one device: a 20-step run takes a second or two."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_steps = 20
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.log_every = 5
    c.checkpoint_every = 10
    c.keep_checkpoints = 5
    c.progress = False
    c.parallel.num_devices = 1
    for k, v in changes.items():
        config_lib.set_value(c, k, v)
    return c


def pruned_config():
    """A tiny finished run: lenet300_100 on digits, 10 steps, then a one-shot 90% prune."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 64
    c.eval_batch_size = 120
    c.log_every = 10
    c.checkpoint_every = 10
    c.progress = False
    c.parallel.num_devices = 1
    c.stages = (stages.stage("train", "train", steps=10),
                stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.9}))
    return c


def params_of(workdir, step=None):
    return jaxaccel.load(workdir, step).variables["params"]


def steps_in(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def latest_step(workdir):
    """The newest finished checkpoint step in `workdir`, 0 when there is none yet."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return 0
    return max(steps_in(workdir), default=0)


def copy_run(reference, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    os.remove(os.path.join(wd, "results.json"))
    return wd


# ----------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------
def largest_data_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and "/d/" in f]
    return max(files, key=os.path.getsize)


def corrupt(step_dir, how):
    """Damage a finished checkpoint the ways disks and people do."""
    if how == "flip_bytes":  # zstd data without a checksum: restores silently wrong values
        path = largest_data_file(step_dir)
        data = bytearray(open(path, "rb").read())
        for pos in (len(data) // 3, len(data) // 2):
            data[pos] ^= 0xFF
        open(path, "wb").write(bytes(data))
    elif how == "truncate":
        path = largest_data_file(step_dir)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "remove_arrays":
        shutil.rmtree(os.path.join(step_dir, "state"))
    elif how == "garble_record":
        path = os.path.join(step_dir, "meta", "metadata")
        text = open(path).read()
        open(path, "w").write(text.replace('"step": 20', '"step": 21'))
    else:
        raise ValueError(how)


# ----------------------------------------------------------------------------------------
# The real command in a subprocess
# ----------------------------------------------------------------------------------------
def experiment_file(directory, **changes):
    """An experiment file whose get_config() is exactly `tiny_config(**changes)`."""
    path = os.path.join(str(directory), "tiny_experiment.py")
    with open(path, "w") as f:
        f.write("from jaxaccel.config import from_json\n\n\ndef get_config():\n"
                f"    return from_json({config_lib.to_json(tiny_config(**changes))!r})\n")
    return path


def train_argv(experiment, workdir, *overrides):
    return [sys.executable, "-m", "jaxaccel", "train", "--config", experiment,
            "--workdir", workdir, *[f"--config.{o}" for o in overrides]]


def run_command(argv, timeout=300, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAXACCEL_DEBUG": ""}, **kwargs)


def run_cli(*args, timeout=300):
    """`python -m jaxaccel ARGS...` in a subprocess (tracebacks off, as a user sees it)."""
    return run_command([sys.executable, "-m", "jaxaccel", *args], timeout=timeout)


def assert_one_line_error(proc, *needles):
    """Exit status 2, no traceback, and a last line that is the error naming every needle."""
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("jaxaccel: error:") or "error:" in lines[-1], proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def last_line(stderr):
    return [line for line in stderr.strip().splitlines() if line.strip()][-1]


def wait_until(condition, proc, what, deadline=240):
    """Poll until `condition()` (a deadline only guards against a hang; nothing is timed)."""
    end = time.monotonic() + deadline
    while not condition():
        if proc is not None:
            assert proc.poll() is None, f"process ended before {what}: {proc.communicate()}"
        assert time.monotonic() < end, f"no {what} after {deadline} s"
        time.sleep(0.02)


def train_rows(workdir):
    return [r for r in metrics.read_metrics(workdir) if r["split"] == "train"]


def fits_on_two_test_sets(workdir, config):
    """What `pipeline.combine_ensemble` fits for an ensemble run when evaluated with its own
    test split and with another one (the first 50 test examples): equal fits mean the
    combination never reads the test split."""
    import numpy as np

    from jaxaccel import data, pipeline
    from jaxaccel.loop import Evaluator
    from jaxaccel.state import build

    run = jaxaccel.load(workdir)
    setup = build(config)
    members = {"params": run.variables["params"], "batch_stats": run.variables["batch_stats"]}
    splits = data.splits_for(config.dataset)
    fits = []
    for test in (splits.test, data.Subset(splits.test, np.arange(50))):
        evaluator = Evaluator(data.Splits(splits.train, splits.validation, test), setup.spec,
                              batch_size=120)
        fits.append(pipeline.combine_ensemble(setup, members, evaluator, config.ensemble)[2])
    return fits
