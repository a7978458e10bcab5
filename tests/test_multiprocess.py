"""Multi-process (multi-host) runs on this machine: 2 processes x 2 CPU devices joined by
jax.distributed on 127.0.0.1 with gloo collectives, launched by
scripts/launch_local_multiprocess.sh.

One job is run twice: the first launch loses process 1 to SIGKILL mid-training (the other
must notice and stop, no hang); the second launch is the same command and must resume from
the last checkpoint and end where a single-process 4-device run of the experiment ends.
"""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import pytest

import jaxaccel
from jaxaccel import config as config_lib, metrics

pytestmark = pytest.mark.multiprocess

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "scripts", "launch_local_multiprocess.sh")
STEPS = 40


def job_config():
    """lenet300_100 on digits with FSDP: params and Adam state sharded over both processes."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_steps = STEPS
    c.log_every = 1
    c.checkpoint_every = 5
    c.keep_checkpoints = 2
    c.progress = False
    c.parallel.strategy = "fsdp"
    return c


def launch(experiment, workdir, *, env_extra=None, **popen):
    env = {**os.environ, "JAXACCEL_DEBUG": "", "PYTHON": sys.executable,
           "JAXACCEL_HEARTBEAT_TIMEOUT": "5", "GRACE_SECONDS": "15", **(env_extra or {})}
    return subprocess.Popen(["bash", SCRIPT, experiment, workdir], env=env, text=True, **popen)


def checkpoint_steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Launch the job, SIGKILL process 1 after its first checkpoint, then launch it again."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    experiment = str(tmp / "experiment.py")
    with open(experiment, "w") as f:
        f.write("from jaxaccel.config import from_json\n\n\ndef get_config():\n"
                f"    return from_json({config_lib.to_json(job_config())!r})\n")
    workdir = str(tmp / "run")
    out = {"workdir": workdir}

    # -- First launch: lose a process mid-run ------------------------------------------
    with open(tmp / "launch1.out", "w") as stdout:
        proc = launch(experiment, workdir, stdout=stdout, stderr=subprocess.PIPE)
        started = proc.stderr.readline()
        assert "started 2 processes" in started, started
        pids = [int(p) for p in started.split("pids ")[1].split(",")[0].split()]
        end = time.monotonic() + 300  # a guard against a hang, not a timing
        while not checkpoint_steps(workdir):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < end, "no checkpoint after 300 s"
            time.sleep(0.05)
        os.kill(pids[1], signal.SIGKILL)
        _, err1 = proc.communicate(timeout=240)  # heartbeat 5 s + grace 15 s, with slack
    out["rc1"], out["err1"] = proc.returncode, err1
    out["log1"] = open(os.path.join(workdir, "logs", "process_0.log")).read()
    out["steps_after_kill"] = checkpoint_steps(workdir)

    # -- Second launch: the same command resumes ------------------------------------------
    proc = launch(experiment, workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out2, err2 = proc.communicate(timeout=600)
    out["rc2"], out["out2"], out["err2"] = proc.returncode, out2, err2
    out["log2"] = {i: open(os.path.join(workdir, "logs", f"process_{i}.log")).read()
                   for i in (0, 1)}
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The same experiment in one process on 4 devices (the test process has 8)."""
    wd = str(tmp_path_factory.mktemp("single"))
    c = job_config()
    c.parallel.num_devices = 4
    c.checkpoint_every = STEPS
    jaxaccel.train(c, wd)
    return wd


def test_a_dead_process_is_detected_and_the_job_stops(job):
    assert job["rc1"] == 128 + signal.SIGKILL, job["err1"]
    assert "process 1 was killed by signal 9" in job["err1"]
    # Process 0 saw the broken collective (or the heartbeat timeout) and stopped itself.
    log = job["log1"]
    assert ("Gloo" in log and "failed" in log) or "heartbeat" in log or "died" in log, log[-2000:]
    assert job["steps_after_kill"] and max(job["steps_after_kill"]) < STEPS


def test_the_restarted_job_resumes_and_matches_one_process(job, single_process):
    assert job["rc2"] == 0, job["err2"] + job["out2"][-3000:]
    resumed = [line for line in job["log2"][0].splitlines() if "resumed from step" in line]
    assert resumed and int(resumed[0].split("step ")[1].split()[0]) in job["steps_after_kill"]
    assert "all 2 processes finished" in job["err2"]
    wd = job["workdir"]
    results = json.load(open(os.path.join(wd, "results.json")))
    assert results["num_processes"] == 2 and results["num_devices"] == 4
    assert results["strategy"] == "fsdp" and results["steps"] == STEPS
    chex.assert_trees_all_close(jaxaccel.load(wd).variables["params"],
                                jaxaccel.load(single_process).variables["params"],
                                atol=1e-5, rtol=0)


def test_only_process_0_writes_metrics_and_checkpoints_are_collective(job):
    wd = job["workdir"]
    rows = [r for r in metrics.read_metrics(wd) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    starts = [r["step"] for r in metrics.read_metrics(wd, raw=True) if r["split"] == "start"]
    assert len(starts) == 2  # one row per launch: process 1 wrote none
    state_dir = os.path.join(wd, "checkpoints", str(STEPS), "state")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
