"""jaxaccel.data (the package's entry points): the dataset registry, preparing and opening
sources, listing, the run's splits (`splits_for`: train / validation / test), and damaged
dataset files reported in one line naming the file."""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import jaxaccel.data as data
from jaxaccel import config as config_lib
from tiny_runs import experiment_file, last_line

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """One data dir per module so digits/mnist5k are built once."""
    return str(tmp_path_factory.mktemp("tfds"))


def _listed(data_dir: str) -> dict[str, data.DatasetStatus]:
    return {d.name: d for d in data.list_datasets(data_dir)}


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits.*mnist5k.*cifar10.*image_folder"):
        data.dataset_spec("nope")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data.get_source("nope", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="image_folder.*needs path"):
        data.dataset_spec("image_folder")


def test_prepare_is_idempotent_and_reused(data_dir):
    data.prepare("digits", data_dir=data_dir)
    assert data.is_prepared("digits", data_dir=data_dir)
    version_dir = os.path.join(data_dir, "digits", "1.0.0")
    before = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    assert any(f.endswith("array_record-00000-of-00001") for f in before)
    data.prepare("digits", data_dir=data_dir)
    data.get_source("digits", "train", data_dir=data_dir)
    after = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    assert after == before
    assert sorted(os.listdir(os.path.join(data_dir, "digits"))) == ["1.0.0"]


def test_source_access_and_slicing(data_dir):
    source = data.get_source("digits", "test", data_dir=data_dir)
    example = source[3]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
    assert isinstance(example["label"], int) and 0 <= example["label"] < 10
    pair = source.__getitems__([3, 5])
    np.testing.assert_array_equal(pair[0]["image"], example["image"])
    assert len(data.get_source("digits", "train[:10%]", data_dir=data_dir)) == 144
    with pytest.raises(ValueError, match="no split 'validation'.*train"):
        data.get_source("digits", "validation", data_dir=data_dir)


def test_list_datasets(data_dir, tmp_path):
    listed = _listed(data_dir)
    assert set(listed) == set(data.DATASETS)
    assert listed["cifar10"] == data.DatasetStatus("cifar10", "catalog", False)
    assert {listed[n].kind for n in ("digits", "mnist5k")} == {"builtin"}
    data.prepare("digits", data_dir=data_dir)
    assert _listed(data_dir)["digits"] == data.DatasetStatus("digits", "builtin", True)
    assert not _listed(str(tmp_path))["digits"].prepared
    assert not os.listdir(tmp_path)  # listing builds nothing


# ---------------------------------------------------------------------------------------
# The splits of a run
# ---------------------------------------------------------------------------------------
def _dataset(name="digits", fraction=0.2, **kw):
    c = config_lib.default_config().dataset
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


# ---------------------------------------------------------------------------------------
# Damaged datasets
# ---------------------------------------------------------------------------------------
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
