"""Faults a research run meets, tried for real: corrupt checkpoints, failed saves, torn
metrics, non-finite numerics, non-determinism, SIGTERM/SIGINT and SIGKILL at random moments.

Every test states what the user sees; RELIABILITY.md lists them. Subprocess tests (signals,
kills, resource limits) run the real `python -m jaxaccel train` command.
"""
import contextlib
import glob
import json
import logging
import os
import random
import resource
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
    from jaxaccel import train as train_lib
    wd = copy_run(reference, tmp_path)
    corrupt(os.path.join(wd, "checkpoints", "20"), how)
    ck = checkpoint.Checkpointer(wd)
    with caplog.at_level(logging.WARNING, logger="jaxaccel"):
        step, payload, meta = ck.restore_latest(
            lambda meta: train_lib.checkpoint_target(tiny_config(), meta.get("stage", 0))[1])
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


def test_same_config_and_seed_give_bitwise_identical_runs(tmp_path):
    config = tiny_config(**{"parallel.num_devices": 0, "num_steps": 10})  # all 8 devices
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ra, rb = jaxaccel.train(config, a), jaxaccel.train(config, b)
    chex.assert_trees_all_equal(params_of(a), params_of(b))
    assert (ra["test_loss"], ra["test_accuracy"]) == (rb["test_loss"], rb["test_accuracy"])
    keys = ("split", "step", "loss", "accuracy", "grad_norm")
    rows = [[tuple(r.get(k) for k in keys) for r in metrics.read_metrics(w)] for w in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) >= 3
