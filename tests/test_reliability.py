"""Faults a research run meets, tried for real: corrupt checkpoints, failed saves, torn
metrics, non-finite numerics, non-determinism, SIGTERM/SIGINT and SIGKILL at random moments.

Every test states what the user sees; RELIABILITY.md lists them. Subprocess tests (signals,
kills, resource limits) run the real `python -m jaxaccel train` command.
"""
import contextlib
import glob
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxaccel
from jaxaccel import checkpoint, config as config_lib, metrics, parallel

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_lenet5.py")


def tiny_config(**changes):
    """lenet300_100 on digits, one device: a 20-step run takes a second or two."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.keep_checkpoints = 5
    c.progress = False
    c.parallel.num_devices = 1
    for k, v in changes.items():
        config_lib.set_value(c, k, v)
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with checkpoints at steps 10 and 20."""
    wd = str(tmp_path_factory.mktemp("reference"))
    results = jaxaccel.train(tiny_config(), wd)
    return wd, results


def copy_run(reference, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    os.remove(os.path.join(wd, "results.json"))
    return wd


# ----------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------
def test_checksums_same_for_every_sharding_and_host_copy():
    mesh = parallel.make_mesh()  # 8 devices
    x = jnp.arange(8 * 300, dtype=jnp.float32).reshape(8, 300) / 7
    tree = {"a": x, "b": jnp.arange(10, dtype=jnp.int32), "c": jnp.ones((3,), jnp.bfloat16),
            "d": jnp.array([True, False]), "e": jax.random.PRNGKey(3),
            "f": jnp.zeros((0, 4)), "g": jnp.int8(-3)}
    one_device = checkpoint.tree_checksums(tree)
    sharded = checkpoint.tree_checksums(jax.device_put(
        tree, parallel.state_shardings(tree, mesh, "fsdp")))
    on_host = checkpoint.tree_checksums(jax.device_get(tree))
    assert one_device == sharded == on_host
    assert len(set(one_device.values())) == len(tree)
    # Arrays sharded over several processes are hashed on device; the sums are the same.
    placed = jax.device_put(tree, parallel.state_shardings(tree, mesh, "fsdp"))
    leaves = jax.tree.leaves(placed)
    for x, h in zip(leaves, checkpoint._hash_leaves(leaves)):
        np.testing.assert_array_equal(np.asarray(h), checkpoint._hash_host(x))


@settings(max_examples=20, deadline=None)
@given(index=st.integers(0, 2399), bit=st.integers(0, 31))
def test_checksum_changes_with_any_flipped_bit(index, bit):
    x = np.arange(2400, dtype=np.float32) / 7
    flipped = x.copy()
    flipped.view(np.uint32)[index] ^= np.uint32(1 << bit)
    expected = checkpoint.tree_checksums({"w": x})
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"checksum mismatch in \['w'\]"):
        checkpoint.verify_checksums({"w": jnp.asarray(flipped)}, expected)
    checkpoint.verify_checksums({"w": jnp.asarray(x)}, expected)  # the true bits pass


def test_checksum_detects_swapped_elements():
    x = np.arange(16, dtype=np.float32)
    swapped = x.copy()
    swapped[[3, 9]] = swapped[[9, 3]]
    assert checkpoint.tree_checksums(x) != checkpoint.tree_checksums(swapped)


# ----------------------------------------------------------------------------------------
# Corrupt or truncated checkpoints
# ----------------------------------------------------------------------------------------
def _largest_data_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and "/d/" in f]
    return max(files, key=os.path.getsize)


def corrupt(step_dir, how):
    """Damage a finished checkpoint the ways disks and people do."""
    if how == "flip_bytes":  # zstd data without a checksum: restores silently wrong values
        path = _largest_data_file(step_dir)
        data = bytearray(open(path, "rb").read())
        for pos in (len(data) // 3, len(data) // 2):
            data[pos] ^= 0xFF
        open(path, "wb").write(bytes(data))
    elif how == "truncate":
        path = _largest_data_file(step_dir)
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


def test_silently_corrupt_latest_checkpoint_is_skipped_and_run_ends_identical(
        reference, tmp_path, caplog):
    wd = copy_run(reference, tmp_path)
    corrupt(os.path.join(wd, "checkpoints", "20"), "flip_bytes")
    with caplog.at_level(logging.WARNING, logger="jaxaccel"):
        results = jaxaccel.train(tiny_config(), wd)
    warnings = [r.getMessage() for r in caplog.records if "warning" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "checkpoint step 20: checksum mismatch" in warnings[0]
    assert "using step 10" in warnings[0]
    # The bad step was moved aside, training redid steps 11..20, and the answer is the same.
    assert os.path.isdir(os.path.join(wd, checkpoint.CORRUPT_DIR, "20"))
    assert steps_in(wd) == [10, 20]
    chex.assert_trees_all_equal(params_of(wd), params_of(reference[0]))
    assert results["test_accuracy"] == reference[1]["test_accuracy"]


@pytest.mark.parametrize("how,reason", [
    ("truncate", "cannot restore checkpoint step 20"),
    ("remove_arrays", "cannot restore checkpoint step 20"),
    ("garble_record", "step 20: its JSON record fails its checksum"),
])
def test_damaged_latest_checkpoint_is_detected(how, reason, reference, tmp_path, caplog):
    from jaxaccel.state import checkpoint_target
    wd = copy_run(reference, tmp_path)
    corrupt(os.path.join(wd, "checkpoints", "20"), how)
    ck = checkpoint.Checkpointer(wd)
    with caplog.at_level(logging.WARNING, logger="jaxaccel"):
        step, payload, meta = ck.restore_latest(
            lambda meta: checkpoint_target(tiny_config(), meta.get("stage", 0))[1])
    ck.close()
    assert step == 10 and meta["step"] == 10
    (line,) = [r.getMessage() for r in caplog.records if "warning" in r.getMessage()]
    assert reason in line and "using step 10" in line and "\n" not in line
    chex.assert_trees_all_equal(payload["state"].params, params_of(reference[0], 10))
    assert steps_in(wd) == [10]


def test_every_checkpoint_corrupt_refuses_to_start_over(reference, tmp_path):
    wd = copy_run(reference, tmp_path)
    corrupt(os.path.join(wd, "checkpoints", "20"), "flip_bytes")
    corrupt(os.path.join(wd, "checkpoints", "10"), "remove_arrays")
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"no usable checkpoint .*step 20.*step 10.*--overwrite"):
        jaxaccel.train(tiny_config(), wd)
    assert steps_in(wd) == [10, 20]  # nothing moved or deleted
    assert not os.path.exists(os.path.join(wd, checkpoint.CORRUPT_DIR))


def test_load_skips_corrupt_latest_without_touching_the_workdir(reference, tmp_path, caplog):
    wd = copy_run(reference, tmp_path)
    corrupt(os.path.join(wd, "checkpoints", "20"), "flip_bytes")
    with caplog.at_level(logging.WARNING, logger="jaxaccel"):
        loaded = jaxaccel.load(wd)
    assert loaded.step == 10
    assert any("checkpoint step 20" in r.getMessage() for r in caplog.records)
    chex.assert_trees_all_equal(loaded.variables["params"], params_of(reference[0], 10))
    assert steps_in(wd) == [10, 20]
    with pytest.raises(checkpoint.CorruptCheckpointError, match="step 20: checksum mismatch"):
        jaxaccel.load(wd, step=20)


def test_unfinished_save_is_ignored_and_removed(reference, tmp_path):
    """What a SIGKILL during a save leaves: a temporary directory orbax never renamed."""
    wd = copy_run(reference, tmp_path)
    ckdir = os.path.join(wd, "checkpoints")
    partial = os.path.join(ckdir, "30.orbax-checkpoint-tmp-1234567")
    shutil.copytree(os.path.join(ckdir, "20"), partial)
    os.remove(os.path.join(partial, "commit_success.txt"))
    ck = checkpoint.Checkpointer(wd)
    assert ck.latest_step() == 20
    ck.close()
    assert not os.path.exists(partial)


# ----------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------
def test_torn_metrics_line_is_skipped_and_next_writer_starts_fresh(tmp_path):
    wd = str(tmp_path)
    with metrics.MetricWriter(wd, tensorboard=False) as w:
        w.mark_start(0)
        w.write(5, {"loss": 1.0}, prefix="train")
        w.write(10, {"loss": 0.5}, prefix="train")
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 15, "split": "train", "lo')  # the crash came mid-write
    assert [r["step"] for r in metrics.read_metrics(wd)] == [5, 10]
    with metrics.MetricWriter(wd, tensorboard=False) as w:  # the resumed run
        w.mark_start(10)
        w.write(15, {"loss": 0.25}, prefix="train")
    rows = list(metrics.read_metrics(wd))
    assert [(r["step"], r["loss"]) for r in rows] == [(5, 1.0), (10, 0.5), (15, 0.25)]
    lines = open(os.path.join(wd, "metrics.jsonl")).read().splitlines()
    assert lines[3] == '{"step": 15, "split": "train", "lo'  # kept, alone on its line


def test_rows_of_lost_work_are_superseded_by_the_resumed_run(tmp_path):
    wd = str(tmp_path)
    with metrics.MetricWriter(wd, tensorboard=False) as w:  # crashed after logging 15
        w.mark_start(0)
        for step in (5, 10, 15):
            w.write(step, {"loss": 1.0 / step}, prefix="train")
        w.write(15, {"accuracy": 0.1}, prefix="test")
    with metrics.MetricWriter(wd, tensorboard=False) as w:  # resumed from checkpoint 10
        w.mark_start(10)
        w.write(12, {"loss": 0.0}, prefix="train")  # e.g. a different log cadence
        w.write(20, {"accuracy": 0.9}, prefix="test")
    rows = list(metrics.read_metrics(wd))
    assert [(r["split"], r["step"]) for r in rows] == [
        ("train", 5), ("train", 10), ("train", 12), ("test", 20)]
    assert len(list(metrics.read_metrics(wd, raw=True))) == 8


# ----------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------
EXPLODE = {"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.lr": 1e30,
           "num_steps": 8, "log_every": 50}  # step 0 is finite, every later step is not


def test_nonfinite_stop_names_the_step_and_never_checkpoints_it(tmp_path):
    wd = str(tmp_path)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 1;"):
        jaxaccel.train(tiny_config(**EXPLODE, checkpoint_every=1), wd)
    assert steps_in(wd) == [1]  # the state after the bad step 1 was not saved
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params_of(wd)))


def test_nonfinite_skip_keeps_weights_and_counts_in_metrics(tmp_path):
    wd = str(tmp_path)
    results = jaxaccel.train(tiny_config(**EXPLODE, nonfinite="skip", checkpoint_every=4), wd)
    assert results["nonfinite_steps"] == 7
    rows = [r for r in metrics.read_metrics(wd) if r["split"] == "train"]
    assert sum(r["nonfinite"] for r in rows) == 7 and rows[-1]["nonfinite_total"] == 7
    # Steps 1..7 were skipped: the weights at step 8 are those after step 0 (and finite).
    chex.assert_trees_all_equal(params_of(wd, 8), params_of(wd, 4))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params_of(wd, 8)))
    assert jaxaccel.load(wd, 8).step == 8


def test_same_config_and_seed_give_bitwise_identical_runs(reference, tmp_path):
    """A second run of the reference config (the subprocess tests above also compare fresh
    processes with in-process runs bit for bit)."""
    again = str(tmp_path / "again")
    results = jaxaccel.train(tiny_config(), again)
    chex.assert_trees_all_equal(params_of(again), params_of(reference[0]))
    for key in ("test_loss", "test_accuracy"):
        assert results[key] == reference[1][key]
    keys = ("split", "step", "loss", "accuracy", "grad_norm")
    rows = [[tuple(r.get(k) for k in keys) for r in metrics.read_metrics(w)]
            for w in (again, reference[0])]
    assert rows[0] == rows[1] and len(rows[0]) >= 5


# ----------------------------------------------------------------------------------------
# The real command in a subprocess: signals, kills, failed saves
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


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAXACCEL_DEBUG": ""}, **kwargs)


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
    done = run(train_argv(exp, wd, f"num_steps={end}"))
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


KILL_IN_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def killing_finalize(self):
    if self.get_final().name == sys.argv[1]:  # step directory written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
from jaxaccel.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.multiprocess
def test_sigkill_in_the_middle_of_a_checkpoint_write(reference, tmp_path):
    exp = experiment_file(tmp_path)
    wd = str(tmp_path / "run")
    argv = train_argv(exp, wd)
    killed = run([sys.executable, "-c", KILL_IN_SAVE, "20"] + argv[3:])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [d for d in os.listdir(os.path.join(wd, "checkpoints")) if d.startswith("20.")]
    assert leftovers and steps_in(wd) == [10]  # step 20 was half written
    done = run(argv)
    assert done.returncode == 0, done.stderr
    assert "resumed from step 10" in done.stderr
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "20"]
    chex.assert_trees_all_equal(params_of(wd), params_of(reference[0]))


@pytest.mark.multiprocess
def test_sigkill_at_random_moments_then_resume_gives_identical_params(reference, tmp_path):
    """Kill a real run twice at random moments (mostly inside the per-step saves).

    Each kill is placed by progress, not by the clock (a random number of new checkpoints,
    then a random few milliseconds), so it lands mid-run on a slow or a fast CPU alike."""
    exp = experiment_file(tmp_path, checkpoint_every=1, log_every=1, keep_checkpoints=2)
    wd = str(tmp_path / "run")
    rng = random.Random(1234)
    kills = 0
    for _ in range(2):
        before = latest_step(wd)
        target = min(before + rng.randint(1, 6), 15)  # 5 steps (and saves) before the end
        proc = subprocess.Popen(train_argv(exp, wd), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_until(lambda: latest_step(wd) >= target or proc.poll() is not None, None,
                   f"checkpoint {target}")
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), proc.returncode
    assert kills >= 1
    done = run(train_argv(exp, wd))
    assert done.returncode == 0, done.stderr
    chex.assert_trees_all_equal(params_of(wd), params_of(reference[0]))
    assert [r["step"] for r in train_rows(wd)] == list(range(1, 21))  # each step once
    assert not [d for d in os.listdir(os.path.join(wd, "checkpoints"))
                if checkpoint.TMP_SUFFIX in d]


# Runs argv[1:] with files limited to 64 KB; SIGXFSZ ignored so writes fail with EFBIG.
LIMIT_FILE_SIZE = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.multiprocess
def test_disk_full_during_save_is_one_clear_error_and_keeps_previous(reference, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes past 64 KB fail."""
    wd = copy_run(reference, tmp_path)
    shutil.rmtree(os.path.join(wd, "checkpoints", "20"))
    exp = experiment_file(tmp_path)
    full = run([sys.executable, "-c", LIMIT_FILE_SIZE] + train_argv(exp, wd))
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr, full.stderr  # orbax's background noise is silenced
    line = last_line(full.stderr)
    assert line.startswith("jaxaccel: error: could not save step 20")
    assert "File too large" in line and "previous checkpoint (step 10) is intact" in line
    assert steps_in(wd) == [10]
    chex.assert_trees_all_equal(params_of(wd, 10), params_of(reference[0], 10))
    # With space again, the same command finishes the run with the same answer.
    done = run(train_argv(exp, wd))
    assert done.returncode == 0, done.stderr
    chex.assert_trees_all_equal(params_of(wd), params_of(reference[0]))


@contextlib.contextmanager
def immutable(path):
    """chattr +i: even root cannot create files in the directory (a read-only mount)."""
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


def test_read_only_checkpoint_dir_fails_before_training(reference, tmp_path):
    wd = copy_run(reference, tmp_path)
    shutil.rmtree(os.path.join(wd, "checkpoints", "20"))
    with immutable(os.path.join(wd, "checkpoints")):
        with pytest.raises(checkpoint.CheckpointSaveError) as info:
            jaxaccel.train(tiny_config(), wd)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write checkpoints in {wd}/checkpoints: "
                              f"Operation not permitted")
    assert steps_in(wd) == [10]
    chex.assert_trees_all_equal(params_of(wd, 10), params_of(reference[0], 10))


def test_directory_turning_read_only_between_saves(tmp_path):
    wd = str(tmp_path)
    tree = {"w": jnp.arange(1000, dtype=jnp.float32)}
    ck = checkpoint.Checkpointer(wd)
    ck.save(10, tree, {"step": 10})
    ck.wait()
    with immutable(os.path.join(wd, "checkpoints")):
        with pytest.raises(checkpoint.CheckpointSaveError,
                           match=r"could not save step 20 .*Operation not permitted.*"
                                 r"previous checkpoint \(step 10\) is intact"):
            ck.save(20, {"w": tree["w"] + 1}, {"step": 20})
    ck.close()
    ck = checkpoint.Checkpointer(wd)
    assert ck.all_steps() == [10]
    payload, meta = ck.restore(10, checkpoint.abstract_like(tree))
    np.testing.assert_array_equal(payload["w"], tree["w"])
    assert meta == {"step": 10}
    ck.close()


def test_a_file_where_the_checkpoint_dir_should_be(tmp_path):
    wd = str(tmp_path)
    open(os.path.join(wd, "checkpoints"), "w").close()
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=f"cannot write checkpoints in {wd}/checkpoints: Not a directory"):
        checkpoint.Checkpointer(wd)


# ----------------------------------------------------------------------------------------
# Damaged datasets
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory):
    from jaxaccel import data
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", data_dir=data_dir)
    return data_dir


def damage_dataset(data_dir, how):
    version_dir = os.path.join(data_dir, "digits", "1.0.0")
    train = glob.glob(os.path.join(version_dir, "digits-train.array_record*"))[0]
    if how == "flip_byte":  # array_record's chunk hashes catch it when the chunk is read
        raw = bytearray(open(train, "rb").read())
        raw[len(raw) // 3] ^= 0xFF
        open(train, "wb").write(bytes(raw))
        return train
    if how == "truncate":
        with open(train, "r+b") as f:
            f.truncate(os.path.getsize(train) // 2)
        return train
    if how == "remove":
        os.remove(train)
        return version_dir
    if how == "garble_info":
        path = os.path.join(version_dir, "dataset_info.json")
        open(path, "w").write("{not json")
        return path
    raise ValueError(how)


@pytest.mark.parametrize("how", ["flip_byte", "truncate", "remove", "garble_info"])
def test_damaged_dataset_files_give_one_error_naming_the_file(how, prepared_digits, tmp_path):
    from jaxaccel import data
    data_dir = str(tmp_path / "tfds")
    shutil.copytree(prepared_digits, data_dir)
    named = damage_dataset(data_dir, how)
    with pytest.raises(ValueError) as info:
        source = data.get_source("digits", "train", data_dir=data_dir)
        data.read_arrays(source, np.arange(len(source)))
    message = str(info.value)
    assert "\n" not in message and named in message and "delete" in message, message


def test_damaged_dataset_through_the_command(prepared_digits, tmp_path, capsys):
    from jaxaccel import cli
    data_dir = str(tmp_path / "tfds")
    shutil.copytree(prepared_digits, data_dir)
    named = damage_dataset(data_dir, "truncate")
    exp = experiment_file(tmp_path, **{"dataset.data_dir": data_dir})
    wd = str(tmp_path / "wd")
    assert cli.main(["train", "--config", exp, "--workdir", wd]) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith("jaxaccel: error: dataset 'digits'") and named in line
    assert not os.path.exists(wd)  # nothing was written for a run that could not start


def test_image_folder_with_a_non_image_file_through_the_command(tmp_path, capsys):
    from PIL import Image
    from jaxaccel import cli
    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((6, 5, 3), 40 * i, np.uint8)).save(
                    root / split / cls / f"{i}.png")
    bad = root / "train" / "dog" / "notes.png"
    bad.write_text("not an image")
    exp = experiment_file(tmp_path, **{"dataset.name": "image_folder",
                                       "dataset.path": str(root),
                                       "dataset.data_dir": str(tmp_path / "tfds"),
                                       "batch_size": 2, "eval_batch_size": 2})
    wd = str(tmp_path / "wd")
    assert cli.main(["train", "--config", exp, "--workdir", wd]) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith("jaxaccel: error:") and f"{bad} is not a decodable image" in line
    assert not os.path.exists(wd)
