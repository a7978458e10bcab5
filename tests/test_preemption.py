"""jaxaccel.preemption: SIGTERM/SIGINT ask a run to checkpoint and stop cleanly.

`PreemptionGuard` records the signal instead of dying mid-step and restores the previous
handlers on exit; the real `python -m jaxaccel train` command then checkpoints, exits with
status 3 and resumes exactly.
"""
import os
import signal
import subprocess

import chex
import pytest

import jaxaccel
from jaxaccel.preemption import Preempted, PreemptionGuard
from tiny_runs import (experiment_file, last_line, params_of, run_command, steps_in,
                       tiny_config, train_argv, train_rows, wait_until)


def test_sigterm_is_recorded_and_handlers_restored_on_exit():
    before = {sig: signal.getsignal(sig) for sig in PreemptionGuard.SIGNALS}
    with PreemptionGuard() as guard:
        # Installed (checked before raising: an uninstalled handler would end the process).
        assert all(signal.getsignal(sig) not in (before[sig], signal.SIG_DFL, signal.SIG_IGN)
                   for sig in PreemptionGuard.SIGNALS)
        assert not guard.should_stop() and guard.signal_name is None
        signal.raise_signal(signal.SIGTERM)
        assert guard.should_stop() and guard.signal_name == "SIGTERM"
        assert guard.should_stop()  # stays set
    assert {sig: signal.getsignal(sig) for sig in PreemptionGuard.SIGNALS} == before


def test_sigint_is_recorded_and_a_second_one_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGINT) not in (before, signal.SIG_DFL, signal.SIG_IGN)
        signal.raise_signal(signal.SIGINT)
        assert guard.should_stop() and guard.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_preempted_names_the_signal_and_the_step():
    e = Preempted(40, "SIGTERM")
    assert e.step == 40
    assert str(e).startswith("preempted by SIGTERM at step 40; checkpoint saved")
    assert "run the same command again to resume" in str(e)


# ----------------------------------------------------------------------------------------
# The real command in a subprocess
# ----------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_sigterm_checkpoints_exits_3_and_resumes_exactly(reference, tmp_path):
    exp = experiment_file(tmp_path, num_steps=100_000, log_every=1, checkpoint_every=100_000)
    wd = str(tmp_path / "run")
    proc = subprocess.Popen(train_argv(exp, wd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(lambda: os.path.exists(os.path.join(wd, "metrics.jsonl")) and train_rows(wd),
               proc, "a logged step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    line = last_line(err)
    assert line.startswith("jaxaccel: preempted by SIGTERM at step ") and "resume" in line
    stopped = int(line.split("at step ")[1].split(";")[0])
    assert steps_in(wd) == [stopped]  # the checkpoint written on the way out
    assert train_rows(wd)[-1]["step"] == stopped  # and the metrics so far
    assert "Traceback" not in err
    # Resume with the same command (num_steps may change: it only moves the end).
    end = max(20, stopped + 3)
    done = run_command(train_argv(exp, wd, f"num_steps={end}"))
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {stopped}" in done.stderr
    assert [r["step"] for r in train_rows(wd)] == list(range(1, end + 1))
    ref = reference[0]
    if end != 20:  # stopped late: compare with an uninterrupted run of the same length
        ref = str(tmp_path / "uninterrupted")
        jaxaccel.train(tiny_config(num_steps=end, checkpoint_every=100_000), ref)
    chex.assert_trees_all_equal(params_of(wd), params_of(ref))


@pytest.mark.multiprocess
def test_sigint_checkpoints_and_exits_3(tmp_path):
    exp = experiment_file(tmp_path, num_steps=100_000, log_every=1, checkpoint_every=100_000)
    wd = str(tmp_path / "run")
    proc = subprocess.Popen(train_argv(exp, wd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(lambda: os.path.exists(os.path.join(wd, "metrics.jsonl")) and train_rows(wd),
               proc, "a logged step")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert last_line(err).startswith("jaxaccel: preempted by SIGINT at step ")
    stopped = int(last_line(err).split("at step ")[1].split(";")[0])
    assert steps_in(wd) == [stopped]
