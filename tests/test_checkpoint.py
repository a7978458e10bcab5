"""jaxaccel.checkpoint: orbax storage of any pytree, verified by checksums on restore.

Round trips against abstract targets (onto another sharding), checksums that are the same for
every sharding and change with any flipped bit, the newest usable checkpoint found past
corrupt, truncated or half-written ones, and failed saves (read-only directory, disk full,
SIGKILL mid-write) that leave the previous checkpoint intact. Subprocess tests run the real
`python -m jaxaccel train` command; RELIABILITY.md lists what the user sees.
"""
import contextlib
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
from jaxaccel import checkpoint, parallel
from tiny_runs import (copy_run, corrupt, experiment_file, last_line,
                       latest_step, params_of, run_command, steps_in, tiny_config,
                       train_argv, train_rows, wait_until)


def as_hex(sums):
    """A leaf's two device sums in `tree_checksums`' notation (16 hex digits)."""
    a, b = np.asarray(sums, np.uint32)
    return f"{int(a):08x}{int(b):08x}"


# ----------------------------------------------------------------------------------------
# Saving and restoring
# ----------------------------------------------------------------------------------------
def small_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((64, 40)), jnp.float32),
            "b": jnp.arange(40, dtype=jnp.int32), "key": jax.random.PRNGKey(seed),
            "step": jnp.int32(7)}


def test_save_restore_round_trip_against_an_abstract_target(tmp_path):
    tree = small_tree()
    with checkpoint.Checkpointer(str(tmp_path), keep=2) as ck:
        ck.save(5, tree, {"step": 5, "stage": "train", "nan": float("nan")})
    ck = checkpoint.Checkpointer(str(tmp_path))
    assert ck.all_steps() == [5] and ck.latest_step() == 5
    assert ck.read_meta(5) == {"step": 5, "stage": "train", "nan": None}  # strict JSON
    payload, meta = ck.restore(5, checkpoint.abstract_like(tree))
    ck.close()
    chex.assert_trees_all_equal(payload, tree)
    assert meta == {"step": 5, "stage": "train", "nan": None}
    assert jax.tree.structure(payload) == jax.tree.structure(tree)


def test_restore_onto_another_sharding(tmp_path):
    """Saved from one device, restored sharded over 8 (fsdp): the target's layout wins."""
    tree = small_tree(1)
    with checkpoint.Checkpointer(str(tmp_path)) as ck:
        ck.save(1, tree, {"step": 1})
    shardings = parallel.state_shardings(tree, parallel.make_mesh(), "fsdp")
    with checkpoint.Checkpointer(str(tmp_path), read_only=True) as ck:
        payload, _ = ck.restore(1, checkpoint.abstract_like(tree, shardings))
    assert payload["w"].sharding.is_equivalent_to(shardings["w"], 2)
    assert not payload["w"].sharding.is_fully_replicated  # 64 rows over 8 devices
    chex.assert_trees_all_equal(jax.device_get(payload), jax.device_get(tree))


def test_keeps_the_newest_checkpoints(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path), keep=2) as ck:
        for step in (1, 2, 3):
            ck.save(step, {"x": jnp.full((3,), step)}, {"step": step})
    ck = checkpoint.Checkpointer(str(tmp_path))
    assert ck.all_steps() == [2, 3]
    payload, _ = ck.restore(2, checkpoint.abstract_like({"x": jnp.zeros((3,), jnp.int32)}))
    ck.close()
    np.testing.assert_array_equal(payload["x"], [2, 2, 2])


def test_a_flipped_array_byte_fails_its_checksum_and_restore_latest_skips_it(tmp_path, caplog):
    tree = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(20_000), jnp.float32)}
    with checkpoint.Checkpointer(str(tmp_path), keep=3) as ck:
        ck.save(1, tree, {"step": 1})
        ck.save(2, {"w": tree["w"] + 1}, {"step": 2})
    corrupt(os.path.join(str(tmp_path), "checkpoints", "2"), "flip_bytes")
    target = checkpoint.abstract_like(tree)
    ck = checkpoint.Checkpointer(str(tmp_path))
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"checkpoint step 2: checksum mismatch in \['w'\]"):
        ck.restore(2, target)
    with caplog.at_level(logging.WARNING, logger="jaxaccel"):
        step, payload, meta = ck.restore_latest(lambda meta: target)
    ck.close()
    assert (step, meta) == (1, {"step": 1})
    np.testing.assert_array_equal(payload["w"], tree["w"])
    (line,) = [r.getMessage() for r in caplog.records if "warning" in r.getMessage()]
    assert "checkpoint step 2: checksum mismatch" in line and "using step 1" in line
    assert os.listdir(os.path.join(str(tmp_path), checkpoint.CORRUPT_DIR)) == ["2"]
    assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [1]


def test_no_checkpoint_is_none(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path)) as ck:
        assert ck.latest_step() is None and ck.all_steps() == []
        assert ck.restore_latest(lambda meta: {}) is None


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
    paths = list(one_device)  # the same flattening order
    for path, h in zip(paths, checkpoint.hash_leaves(leaves)):
        assert as_hex(h) == one_device[path], path


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
# Corrupt or truncated checkpoints of a run
# ----------------------------------------------------------------------------------------
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
# Failed saves and kills: the real command in a subprocess
# ----------------------------------------------------------------------------------------
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
    killed = run_command([sys.executable, "-c", KILL_IN_SAVE, "20"] + argv[3:])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [d for d in os.listdir(os.path.join(wd, "checkpoints")) if d.startswith("20.")]
    assert leftovers and steps_in(wd) == [10]  # step 20 was half written
    done = run_command(argv)
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
    done = run_command(train_argv(exp, wd))
    assert done.returncode == 0, done.stderr
    chex.assert_trees_all_equal(params_of(wd), params_of(reference[0]))
    assert [r["step"] for r in train_rows(wd)] == list(range(1, 21))  # each step once
    assert not [d for d in os.listdir(os.path.join(wd, "checkpoints"))
                if checkpoint.TMP_SUFFIX in d]


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
    full = run_command([sys.executable, "-c", LIMIT_FILE_SIZE] + train_argv(exp, wd))
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr, full.stderr  # orbax's background noise is silenced
    line = last_line(full.stderr)
    assert line.startswith("jaxaccel: error: could not save step 20")
    assert "File too large" in line and "previous checkpoint (step 10) is intact" in line
    assert steps_in(wd) == [10]
    chex.assert_trees_all_equal(params_of(wd, 10), params_of(reference[0], 10))
    # With space again, the same command finishes the run with the same answer.
    done = run_command(train_argv(exp, wd))
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
