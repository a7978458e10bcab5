"""The validation split: stratified, deterministic, disjoint from training, for every kind of
dataset; runs report validation beside test and record every split's size."""
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import jaxaccel
from jaxaccel import data, metrics
from jaxaccel.config import ConfigError, default_config, validate


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=12),
       fraction=st.floats(0.01, 0.6), seed=st.integers(0, 2**31))
def test_split_sizes_stratification_disjointness_determinism(counts, fraction, seed):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
    n = len(labels)
    if max(1, round(fraction * n)) >= n:
        with pytest.raises(ValueError, match="leaves none to train on"):
            data.validation_indices(labels, fraction, seed)
        return
    train, val = data.validation_indices(labels, fraction, seed)
    assert len(val) == max(1, round(fraction * n)) and len(train) + len(val) == n
    assert not set(train) & set(val) and sorted(set(train) | set(val)) == list(range(n))
    assert np.all(np.diff(val) > 0) and np.all(np.diff(train) > 0)
    share = len(val) / n  # every class gives its share, to within one example
    for c, count in enumerate(counts):
        assert abs(np.sum(labels[val] == c) - share * count) < 1
    again_train, again_val = data.validation_indices(labels, fraction, seed)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)


def test_another_seed_holds_out_other_examples():
    labels = np.repeat(np.arange(10), 50)
    _, a = data.validation_indices(labels, 0.2, 0)
    _, b = data.validation_indices(labels, 0.2, 1)
    assert len(a) == len(b) == 100 and not np.array_equal(a, b)


def _dataset(name="digits", fraction=0.2, **kw):
    c = default_config().dataset
    c.name, c.validation_split = name, fraction
    for k, v in kw.items():
        c[k] = v
    return c


def _original_indices(subset):
    return set(subset.indices.tolist())


def test_digits_splits_are_disjoint_and_training_batches_never_see_validation():
    splits = data.splits_for(_dataset())
    assert splits.sizes() == {"num_train_examples": 1150, "num_validation_examples": 287,
                              "num_test_examples": 360}
    held = _original_indices(splits.validation)
    assert not held & _original_indices(splits.train)
    full = data.get_source("digits", "train")
    x, y = data.read_arrays(splits.validation, np.arange(5))
    fx, fy = data.read_arrays(full, splits.validation.indices[:5])
    np.testing.assert_array_equal(x, fx)
    np.testing.assert_array_equal(y, fy)
    batches = data.TrainBatches(splits.train, data.spec_for(_dataset()), global_batch_size=100,
                                seed=3)
    trained = {int(splits.train.indices[i]) for step in range(40)  # > 3 epochs
               for i in batches.global_indices(step)}
    assert trained and not trained & held
    assert data.splits_for(_dataset(fraction=0.0)).validation is None


def test_catalog_and_image_folder_datasets_split_too(tmp_path):
    # A catalog dataset read from a prepared directory (digits' files standing in for mnist).
    data.prepare("digits")
    catalog = tmp_path / "catalog"
    shutil.copytree(os.path.join(data.default_data_dir(), "digits", "1.0.0"),
                    catalog / "mnist" / "1.0.0")
    splits = data.splits_for(_dataset("mnist", 0.1, data_dir=str(catalog)))
    assert splits.sizes()["num_validation_examples"] == 144
    assert not _original_indices(splits.validation) & _original_indices(splits.train)
    # An image folder: 2 classes x 10 training images, 1 of each held out at 0.1.
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 2)):
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).save(
                    root / split / cls / f"{i}.png")
    splits = data.splits_for(_dataset("image_folder", 0.1, path=str(root),
                                      data_dir=str(tmp_path / "tfds")))
    _, labels = data.read_arrays(splits.validation, np.arange(2))
    assert sorted(labels.tolist()) == [0, 1]  # stratified: one per class
    assert splits.sizes() == {"num_train_examples": 18, "num_validation_examples": 2,
                              "num_test_examples": 4}


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_validation_split_must_be_a_fraction(value):
    c = default_config()
    c.dataset.validation_split = value
    with pytest.raises(ConfigError, match="dataset.validation_split"):
        validate(c)


def test_run_reports_validation_beside_test(tmp_path):
    c = default_config()
    c.dataset.name, c.dataset.validation_split = "digits", 0.2
    c.model.name = "lenet300_100"
    c.num_steps, c.eval_every, c.log_every, c.checkpoint_every = 6, 3, 3, 6
    c.batch_size, c.eval_batch_size, c.progress = 64, 128, False
    workdir = str(tmp_path / "run")
    results = jaxaccel.train(c, workdir)
    assert results["num_train_examples"] == 1150 and results["num_validation_examples"] == 287
    assert results["num_test_examples"] == 360
    assert 0 <= results["validation_accuracy"] <= 1 and results["validation_loss"] > 0
    row = results["stages"][0]
    assert (row["validation_accuracy"], row["test_accuracy"]) == (
        results["validation_accuracy"], results["test_accuracy"])
    evaluated = [(r["split"], r["step"]) for r in metrics.read_metrics(workdir)
                 if r["split"] in ("validation", "test")]
    assert sorted(evaluated) == [("test", 3), ("test", 6), ("validation", 3), ("validation", 6)]
    c.dataset.validation_split, workdir = 0.0, str(tmp_path / "plain")
    results = jaxaccel.train(c, workdir)
    assert results["num_validation_examples"] == 0 and "validation_accuracy" not in results
