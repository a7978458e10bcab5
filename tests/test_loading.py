"""jaxaccel.loading: `jaxaccel.load(W)` (predict on raw images, class names, which step) and
the weights a run ended with (`final_weights`), for today's workdirs and older ones."""
import logging
import os
import shutil

import chex
import numpy as np
import pytest

import jaxaccel
from jaxaccel import checkpoint, data, loading, stages
from jaxaccel.compress import prune
from tiny_runs import copy_run, corrupt, params_of, steps_in

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OLD = os.path.join(HERE, "old_workdir")


def test_load_predict_matches_eval(reference):
    from jaxaccel import data
    wd, results = reference
    loaded = jaxaccel.load(wd)
    assert loaded.step == 20 and loaded.config.model.name == "lenet300_100"
    spec = data.dataset_spec("digits")
    source = data.get_source("digits", "test")
    examples = [source[i] for i in range(len(source))]
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    logits = loaded.predict(images)
    assert logits.shape == (len(source), spec.num_classes)
    acc = float(np.mean(np.argmax(logits, -1) == labels))
    assert acc == pytest.approx(results["test_accuracy"], abs=1e-6)


def test_load_unknown_step(reference):
    with pytest.raises(ValueError, match="step=7"):
        jaxaccel.load(reference[0], step=7)


def test_load_a_given_step_and_the_class_names(reference):
    wd, _ = reference
    newest, at_10 = jaxaccel.load(wd), jaxaccel.load(wd, step=10)
    assert (newest.step, at_10.step) == (20, 10)
    assert at_10.class_names == newest.class_names == tuple("0123456789")  # dataset.json
    assert not np.array_equal(at_10.variables["params"]["fc1"]["kernel"],
                              newest.variables["params"]["fc1"]["kernel"])
    assert set(newest.variables) == {"params", "batch_stats"}
    assert newest.config.num_steps == 20
    raw = np.full((2, 8, 8, 1), 255, np.uint8)  # predict normalises raw pixels itself
    np.testing.assert_allclose(newest.predict(raw), newest.model.apply(
        newest.variables, data.normalize(raw, "digits"), train=False), rtol=1e-5, atol=1e-5)


def test_not_a_workdir_or_nothing_saved_yet(tmp_path, reference):
    with pytest.raises(ValueError, match="is not a jaxaccel workdir"):
        jaxaccel.load(str(tmp_path))
    wd = str(tmp_path / "fresh")
    os.makedirs(wd)
    shutil.copy(os.path.join(reference[0], "config.json"), wd)
    assert loading.read_config(wd).num_steps == 20
    with pytest.raises(ValueError, match="has no checkpoints"):
        jaxaccel.load(wd)


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


# ----------------------------------------------------------------------------------------
# The weights a run ended with
# ----------------------------------------------------------------------------------------
def test_weight_bits_follow_the_last_quantizing_stage():
    q = lambda b: {"mode": "ptq", "weight_bits": b}  # noqa: E731
    s = stages.stage
    assert loading.weight_bits([s("t", "train", steps=1)]) == 32
    assert loading.weight_bits([s("t", "train", steps=1), s("q", "quantize", quant=q(4)),
                               s("e", "evaluate")]) == 4
    assert loading.weight_bits([s("t", "train", steps=1, quant={"mode": "qat", "weight_bits": 6}),
                               s("p", "prune", prune={"method": "one_shot", "sparsity": .5})]) == 6
    assert loading.weight_bits([s("q", "quantize", quant=q(8)), s("t", "train", steps=1)]) == 32


def test_final_weights_apply_the_trailing_prune_stage_again(pruned_run):
    """train (checkpointed at step 10) → prune (no checkpoint): the final weights are the
    checkpoint's, pruned again exactly as the run's prune stage pruned them."""
    wd, results = pruned_run
    final = loading.final_weights(wd)
    assert (final.step, final.stage, final.bits) == (10, "prune", 32)
    assert final.input_shape == (8, 8, 1) and final.spec.name == "digits"
    assert final.checkpoint_dir == os.path.join(wd, "checkpoints", "10")
    assert any("'prune' (prune) applied again" in n for n in final.notes)
    kernels = [(p, x) for p, x in prune.named_leaves(final.variables["params"])
               if prune.is_kernel(p, x)]
    zeros = sum(int(np.sum(np.asarray(x) == 0)) for _, x in kernels)
    total = sum(int(np.size(x)) for _, x in kernels)
    assert total - zeros == results["stages"][-1]["nonzero_weights"]
    assert zeros / total == pytest.approx(0.9, abs=1e-3)
    # The checkpoint itself holds the dense weights of the train stage.
    dense = params_of(wd)
    assert np.count_nonzero(np.asarray(dense["fc1"]["kernel"])) == 64 * 300
    kept = np.asarray(final.variables["params"]["fc1"]["kernel"]) != 0
    np.testing.assert_array_equal(np.asarray(final.variables["params"]["fc1"]["kernel"])[kept],
                                  np.asarray(dense["fc1"]["kernel"])[kept])
    # A chosen step is that checkpoint's weights: later stages are named, not applied.
    at_10 = loading.final_weights(wd, step=10)
    assert at_10.stage == "train" and at_10.bits == 32
    assert any("stages after 'train' not included: prune" in n for n in at_10.notes)
    chex.assert_trees_all_equal(at_10.variables["params"], dense)


def test_an_unfinished_run_gives_its_checkpoint(pruned_run, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(pruned_run[0], wd)
    os.remove(os.path.join(wd, "results.json"))  # stopped before its prune stage finished
    final = loading.final_weights(wd)
    assert final.stage == "train" and any("not included" in n for n in final.notes)
    chex.assert_trees_all_equal(final.variables["params"], params_of(pruned_run[0]))


# ----------------------------------------------------------------------------------------
# Workdirs written by older versions of jaxaccel still load and predict (and resume: see
# tests/test_pipeline.py). `tests/fixtures/old_workdir` was written at commit 3189569 (see
# `tests/fixtures/make_old_workdir.py`): a train → prune → finetune pipeline preempted after
# 9 of its 12 steps, in its finetune stage.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(HERE, "old_workdir_expected.npz")))


def test_old_workdir_loads_and_predicts_the_same_logits(expected):
    run = jaxaccel.load(OLD)
    assert run.step == 9
    logits = np.asarray(run.predict(expected["images"]))
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)
