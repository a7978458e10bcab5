"""Tests of jaxaccel.data: builders (digits, mnist5k, image folders, catalog), batches."""

from __future__ import annotations

import logging
import json
import os
import re
import shutil
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import jaxaccel.data as data
from jaxaccel.data import DatasetSpec, TrainBatches, builders, eval_batches

# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """One data dir per module so digits/mnist5k are built once."""
    return str(tmp_path_factory.mktemp("tfds"))


def _arrays(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    source = data.get_source(name, split, data_dir=data_dir)
    return data.read_arrays(source, np.arange(len(source)))


class ListSource(list):
    """A minimal random-access source: a list of {"image", "label"} records."""


def _synthetic_source(n: int, shape=(4, 5, 3), seed: int = 0) -> ListSource:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return ListSource({"image": images[i], "label": i} for i in range(n))


SYNTH_SPEC = DatasetSpec("synthetic", 1000, (4, 5, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "builtin")


def _write_folder(root, classes=("cat", "dog"), per_class=(3, 2), size=(6, 5), mode="RGB", seed=0):
    """root/{train,test}/<class>/<i>.png; returns {split: [(image array, label), ...]} in file order."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in zip(("train", "test"), per_class):
        rows = []
        for label, cls in enumerate(classes):
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(count):
                channels = 3 if mode == "RGB" else 1
                array = rng.integers(0, 256, size=(size[0], size[1], channels), dtype=np.uint8)
                Image.fromarray(array if channels == 3 else array[..., 0], mode).save(
                    root / split / cls / f"{i}.png"
                )
                rows.append((array, label))
        written[split] = rows
    return written


# ---------------------------------------------------------------------------------------
# Registry and data dir


def test_default_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXACCEL_DATA_DIR", str(tmp_path / "env"))
    assert data.default_data_dir() == str(tmp_path / "env")
    assert data.default_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert data.default_data_dir("gs://bucket/tfds") == "gs://bucket/tfds"
    monkeypatch.delenv("JAXACCEL_DATA_DIR")
    assert data.default_data_dir() == os.path.expanduser("~/.cache/jaxaccel/tfds")


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits.*mnist5k.*cifar10.*image_folder"):
        data.dataset_spec("nope")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data.get_source("nope", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="image_folder.*needs path"):
        data.dataset_spec("image_folder")


def test_specs_are_consistent():
    for name, spec in data.DATASETS.items():
        assert spec.name == name
        assert spec.kind in ("builtin", "catalog")
        assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]
    assert data.DATASETS["cifar10"].image_shape == (32, 32, 3)
    assert data.DATASETS["cifar100"].num_classes == 100
    with pytest.raises(ValueError, match="kind"):
        DatasetSpec("x", 2, (2, 2, 1), (0.5,), (0.5,), "weird")


# ---------------------------------------------------------------------------------------
# Built-in datasets


def test_digits_counts_split_and_content(data_dir):
    from sklearn.datasets import load_digits

    x_train, y_train = _arrays("digits", "train", data_dir)
    x_test, y_test = _arrays("digits", "test", data_dir)
    assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
    assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
    assert x_train.max() == 255  # 16 -> 255
    # Disjoint, and together exactly sklearn's images (each digits image is unique).
    train_rows = {r.tobytes() for r in x_train}
    test_rows = {r.tobytes() for r in x_test}
    assert len(train_rows) == 1437 and len(test_rows) == 360 and not train_rows & test_rows
    full = load_digits()
    expected = np.clip(np.round(full.images * 255 / 16), 0, 255).astype(np.uint8)[..., None]
    by_bytes = {r.tobytes(): int(y) for r, y in zip(expected, full.target)}
    assert train_rows | test_rows == set(by_bytes)
    assert all(by_bytes[r.tobytes()] == y for r, y in zip(x_test, y_test))  # labels kept
    # Stratified: each class's test count is within 1 of 20% of its total.
    totals = np.bincount(full.target, minlength=10)
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - totals * 360 / 1797) <= 1)


def test_mnist5k_counts_stratified(data_dir):
    x_train, y_train = _arrays("mnist5k", "train", data_dir)
    x_test, y_test = _arrays("mnist5k", "test", data_dir)
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.uint8
    assert np.array_equal(np.bincount(y_train), [400] * 10)
    assert np.array_equal(np.bincount(y_test), [100] * 10)
    assert not {r.tobytes() for r in x_train} & {r.tobytes() for r in x_test}
    assert x_train.max() == 255 and x_train.mean() > 20  # real digits, not blanks


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_builtin_stats_match_train_split(data_dir, name):
    x, _ = _arrays(name, "train", data_dir)
    spec = data.dataset_spec(name)
    np.testing.assert_allclose(spec.mean, [x.mean() / 255], atol=1e-5)
    np.testing.assert_allclose(spec.std, [(x / 255).std()], atol=1e-5)
    normed = data.normalize(x, spec)
    assert abs(float(normed.mean())) < 1e-3 and abs(float(normed.std()) - 1) < 1e-3


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


def _listed(data_dir: str) -> dict[str, data.DatasetStatus]:
    return {d.name: d for d in data.list_datasets(data_dir)}


def test_list_datasets(data_dir, tmp_path):
    listed = _listed(data_dir)
    assert set(listed) == set(data.DATASETS)
    assert listed["cifar10"] == data.DatasetStatus("cifar10", "catalog", False)
    assert {listed[n].kind for n in ("digits", "mnist5k")} == {"builtin"}
    data.prepare("digits", data_dir=data_dir)
    assert _listed(data_dir)["digits"] == data.DatasetStatus("digits", "builtin", True)
    assert not _listed(str(tmp_path))["digits"].prepared
    assert not os.listdir(tmp_path)  # listing builds nothing


def test_preparing_logs_one_honest_line_and_no_tfds_noise(tmp_path):
    """First use of a built-in dataset and of an image folder, logging at INFO into a pipe
    (like a sweep worker's log.txt): our own lines, none of TFDS's banners or progress bars."""
    folder = tmp_path / "pics"
    _write_folder(folder)  # 2 classes: 3 train and 2 test images each
    fresh = tmp_path / "fresh"
    script = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
              "from jaxaccel import data; data.prepare('digits'); data.prepare('digits'); "
              f"data.get_source('image_folder', 'train', path={str(folder)!r})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300,
                          check=False, env={**os.environ, "JAXACCEL_DATA_DIR": str(fresh)})
    out = (proc.stdout + proc.stderr).decode()  # bytes: text mode would turn \r into \n
    assert proc.returncode == 0, out
    digits_dir = fresh / "digits" / "1.0.0"
    assert f"preparing dataset 'digits' (built-in, offline) in {digits_dir} ..." in out, out
    assert re.search(r"prepared 'digits': 1,437 train / 360 test examples in \d+\.\d s", out), out
    assert out.count("preparing dataset 'digits'") == 1, out  # the second call reuses it
    assert f"preparing dataset 'image_folder' (your folder {folder}, offline) in {fresh}" in out
    assert re.search(rf"prepared image folder {re.escape(str(folder))}: 6 train / 4 test "
                     r"examples in \d+\.\d s", out), out
    for noise in ("Downloading and preparing", "Unknown size", "downloaded and prepared",
                  "Generating", "\x1b[", "\r"):
        assert noise not in out, (noise, out)


def test_quiet_tfds_restores_logging():
    absl = logging.getLogger("absl")
    before = absl.level
    try:
        absl.setLevel(logging.INFO)
        with builders.quiet_tfds():
            assert not absl.isEnabledFor(logging.WARNING)
            assert absl.isEnabledFor(logging.ERROR)
        assert absl.level == logging.INFO
    finally:
        absl.setLevel(before)


# ---------------------------------------------------------------------------------------
# Normalisation


def test_normalize_numpy_jax_and_jit():
    spec = SYNTH_SPEC
    images = np.array([0, 255, 51, 128], np.uint8).reshape(1, 2, 2, 1).repeat(3, axis=-1)
    expected = (images.astype(np.float64) / 255 - np.array(spec.mean)) / np.array(spec.std)
    out_np = data.normalize(images, spec)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    np.testing.assert_allclose(out_np, expected, rtol=1e-5, atol=1e-5)
    out_jnp = data.normalize(jnp.asarray(images), spec)
    assert isinstance(out_jnp, jax.Array) and out_jnp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_jnp), expected, rtol=1e-5, atol=1e-5)
    out_jit = jax.jit(lambda x: data.normalize(x, spec))(images.astype(np.float32))
    np.testing.assert_allclose(np.asarray(out_jit), expected, rtol=1e-5, atol=1e-5)
    by_name = data.normalize(np.full((1, 8, 8, 1), 255, np.uint8), "digits")
    np.testing.assert_allclose(by_name, (1 - 0.305434) / 0.375957, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Training batches


def test_train_batches_deterministic_and_epoch_cover(data_dir):
    source = data.get_source("digits", "train", data_dir=data_dir)
    spec = data.dataset_spec("digits")
    a = TrainBatches(source, spec, global_batch_size=100, seed=3)
    b = TrainBatches(source, spec, global_batch_size=100, seed=3)
    assert a.steps_per_epoch == 14
    for step in (0, 5, 14, 31):
        np.testing.assert_array_equal(a.batch(step)["image"], b.batch(step)["image"])
        np.testing.assert_array_equal(a.batch(step)["label"], b.batch(step)["label"])
    first = a.batch(0)
    assert first["image"].shape == (100, 8, 8, 1) and first["image"].dtype == np.float32
    assert first["label"].dtype == np.int32 and first["label"].min() >= 0 and first["label"].max() < 10
    assert not np.array_equal(a.batch(1)["image"], first["image"])
    other_seed = TrainBatches(source, spec, global_batch_size=100, seed=4)
    assert not np.array_equal(other_seed.batch(0)["label"], first["label"])
    # One epoch: distinct examples, 14 * 100 of them; the next epoch is a new order.
    epoch = np.concatenate([a.global_indices(s) for s in range(a.steps_per_epoch)])
    assert len(np.unique(epoch)) == 1400 and epoch.max() < 1437
    assert not np.array_equal(a.global_indices(14), a.global_indices(0))
    # The batch holds exactly the examples it names.
    x_all, y_all = data.read_arrays(source, np.arange(len(source)))
    idx = a.global_indices(5)
    np.testing.assert_array_equal(a.batch(5)["label"], y_all[idx])
    np.testing.assert_allclose(a.batch(5)["image"], data.normalize(x_all[idx], spec))


def test_train_batches_uncached_equals_cached(data_dir):
    source = data.get_source("digits", "train", data_dir=data_dir)
    spec = data.dataset_spec("digits")
    kw = dict(global_batch_size=64, seed=1, crop_padding=1, flip=True)
    cached, direct = TrainBatches(source, spec, **kw), TrainBatches(source, spec, cache=False, **kw)
    for step in (0, 22, 23):
        np.testing.assert_array_equal(cached.batch(step)["image"], direct.batch(step)["image"])
        np.testing.assert_array_equal(cached.batch(step)["label"], direct.batch(step)["label"])


@settings(max_examples=25, deadline=None)
@given(
    process_count=st.sampled_from([1, 2, 4]),
    step=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
    crop_padding=st.integers(0, 2),
    flip=st.booleans(),
)
def test_process_slices_concatenate_to_global_batch(process_count, step, seed, crop_padding, flip):
    source = _synthetic_source(50)
    kw = dict(global_batch_size=8, seed=seed, crop_padding=crop_padding, flip=flip)
    whole = TrainBatches(source, SYNTH_SPEC, **kw).batch(step)
    parts = [
        TrainBatches(source, SYNTH_SPEC, process_index=i, process_count=process_count, **kw).batch(step)
        for i in range(process_count)
    ]
    assert all(p["image"].shape == (8 // process_count, 4, 5, 3) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])


@settings(max_examples=25, deadline=None)
@given(step=st.integers(0, 100), seed=st.integers(0, 1000), padding=st.integers(1, 3))
def test_augmentation_is_crop_of_padded_or_mirror(step, seed, padding):
    source = _synthetic_source(20)
    raw = np.stack([r["image"] for r in source])
    batches = TrainBatches(source, SYNTH_SPEC, global_batch_size=10, seed=seed, crop_padding=padding, flip=True)
    plain = TrainBatches(source, SYNTH_SPEC, global_batch_size=10, seed=seed)
    out = batches.batch(step)
    np.testing.assert_array_equal(out["label"], plain.batch(step)["label"])
    h, w = raw.shape[1:3]
    for image, label in zip(out["image"], out["label"]):
        padded = np.pad(raw[label], ((padding, padding), (padding, padding), (0, 0)))
        candidates = [
            data.normalize(view, SYNTH_SPEC)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            for view in (padded[dy : dy + h, dx : dx + w], padded[dy : dy + h, dx : dx + w][:, ::-1])
        ]
        assert any(np.array_equal(image, c) for c in candidates)


def test_augmentation_varies():
    source = _synthetic_source(20)
    batches = TrainBatches(source, SYNTH_SPEC, global_batch_size=20, seed=0, crop_padding=2, flip=True)
    plain = TrainBatches(source, SYNTH_SPEC, global_batch_size=20, seed=0)
    changed = ~np.all(batches.batch(0)["image"] == plain.batch(0)["image"], axis=(1, 2, 3))
    assert 5 < changed.sum()  # P(unchanged) = 1/25 * 1/2 per image


def test_train_batches_bad_arguments():
    source = _synthetic_source(20)
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by process_count=4"):
        TrainBatches(source, SYNTH_SPEC, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        TrainBatches(source, SYNTH_SPEC, global_batch_size=8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="exceeds"):
        TrainBatches(source, SYNTH_SPEC, global_batch_size=32, seed=0)
    with pytest.raises(ValueError, match="step"):
        TrainBatches(source, SYNTH_SPEC, global_batch_size=8, seed=0).batch(-1)


# ---------------------------------------------------------------------------------------
# Evaluation batches


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), per_process=st.integers(1, 8), process_count=st.sampled_from([1, 2, 4]))
def test_eval_batches_cover_every_example_once(n, per_process, process_count):
    source = _synthetic_source(n)
    batch_size = per_process * process_count
    per_proc = [
        list(eval_batches(source, SYNTH_SPEC, batch_size=batch_size, process_index=i, process_count=process_count))
        for i in range(process_count)
    ]
    num_batches = -(-n // batch_size)
    assert all(len(b) == num_batches for b in per_proc)
    seen = []
    for k in range(num_batches):
        parts = [per_proc[i][k] for i in range(process_count)]
        for p in parts:
            assert p["image"].shape == (per_process, 4, 5, 3) and p["image"].dtype == np.float32
            assert p["mask"].dtype == bool and p["label"].dtype == np.int32
        labels = np.concatenate([p["label"] for p in parts])
        mask = np.concatenate([p["mask"] for p in parts])
        images = np.concatenate([p["image"] for p in parts])
        seen.extend(labels[mask].tolist())
        for label, image in zip(labels[mask], images[mask]):
            np.testing.assert_array_equal(image, data.normalize(source[label]["image"], SYNTH_SPEC))
    assert seen == list(range(n))  # in order, each once (labels are the indices)


def test_eval_batches_bad_batch_size():
    with pytest.raises(ValueError, match="not divisible"):
        next(eval_batches(_synthetic_source(4), SYNTH_SPEC, batch_size=3, process_count=2))


# ---------------------------------------------------------------------------------------
# Image folders


def test_image_folder_roundtrip(tmp_path):
    root = tmp_path / "pets"
    written = _write_folder(root)
    data_dir = str(tmp_path / "tfds")
    assert not data.is_prepared("image_folder", path=str(root), data_dir=data_dir)
    spec = data.dataset_spec("image_folder", path=str(root), data_dir=data_dir)
    assert data.is_prepared("image_folder", path=str(root), data_dir=data_dir)
    assert (spec.kind, spec.num_classes, spec.image_shape) == ("folder", 2, (6, 5, 3))
    train_pixels = np.stack([a for a, _ in written["train"]]).reshape(-1, 3) / 255
    np.testing.assert_allclose(spec.mean, train_pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(spec.std, train_pixels.std(0), atol=1e-6)
    for split in ("train", "test"):
        source = data.get_source("image_folder", split, path=str(root), data_dir=data_dir)
        x, y = data.read_arrays(source, np.arange(len(source)))
        np.testing.assert_array_equal(x, np.stack([a for a, _ in written[split]]))
        np.testing.assert_array_equal(y, [label for _, label in written[split]])
    batch = TrainBatches(source, spec, global_batch_size=2, seed=0).batch(0)
    assert batch["image"].shape == (2, 6, 5, 3)


def test_image_folders_do_not_collide_and_grayscale(tmp_path):
    data_dir = str(tmp_path / "tfds")
    _write_folder(tmp_path / "a", seed=1)
    _write_folder(tmp_path / "b", classes=("x", "y", "z"), per_class=(2, 1), size=(3, 4), mode="L", seed=2)
    spec_a = data.dataset_spec("image_folder", path=str(tmp_path / "a"), data_dir=data_dir)
    spec_b = data.dataset_spec("image_folder", path=str(tmp_path / "b"), data_dir=data_dir)
    assert (spec_a.num_classes, spec_a.image_shape) == (2, (6, 5, 3))
    assert (spec_b.num_classes, spec_b.image_shape) == (3, (3, 4, 1))
    assert len(os.listdir(os.path.join(data_dir, "image_folder"))) == 2
    assert len(data.get_source("image_folder", "test", path=str(tmp_path / "b"), data_dir=data_dir)) == 3


def test_image_folder_not_rebuilt(tmp_path):
    root = tmp_path / "pets"
    _write_folder(root)
    data_dir = str(tmp_path / "tfds")
    data.prepare("image_folder", path=str(root), data_dir=data_dir)
    [folder] = os.listdir(os.path.join(data_dir, "image_folder"))
    version_dir = os.path.join(data_dir, "image_folder", folder, "1.0.0")
    before = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    with mock.patch("jaxaccel.data.builders.ImageFolder._generate_examples", side_effect=AssertionError):
        data.prepare("image_folder", path=str(root), data_dir=data_dir)
        data.get_source("image_folder", "train", path=str(root), data_dir=data_dir)
    after = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    assert after == before


def test_image_folder_errors(tmp_path):
    data_dir = str(tmp_path / "tfds")

    def spec_of(root):
        return data.dataset_spec("image_folder", path=str(root), data_dir=data_dir)

    with pytest.raises(ValueError, match=f"{tmp_path / 'missing'} does not exist"):
        spec_of(tmp_path / "missing")

    no_test = tmp_path / "no_test"
    _write_folder(no_test)
    shutil.rmtree(no_test / "test")
    with pytest.raises(ValueError, match="no 'test' subfolder"):
        spec_of(no_test)

    empty = tmp_path / "empty"
    _write_folder(empty)
    (empty / "train" / "bird").mkdir()
    (empty / "test" / "bird").mkdir()
    with pytest.raises(ValueError, match=f"class folder {empty / 'train' / 'bird'} is empty"):
        spec_of(empty)

    bad = tmp_path / "bad"
    _write_folder(bad)
    (bad / "train" / "cat" / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=f"{bad / 'train' / 'cat' / 'notes.png'} is not a decodable image"):
        spec_of(bad)

    text = tmp_path / "text"
    _write_folder(text)
    (text / "test" / "dog" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="readme.txt is not an image file"):
        spec_of(text)

    sizes = tmp_path / "sizes"
    _write_folder(sizes)
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(sizes / "test" / "dog" / "big.png")
    with pytest.raises(ValueError, match=r"big.png is 9x7 \(height x width\) but .*0.png is 6x5"):
        spec_of(sizes)

    classes = tmp_path / "classes"
    _write_folder(classes)
    shutil.rmtree(classes / "test" / "dog")
    with pytest.raises(ValueError, match="test classes"):
        spec_of(classes)
    assert not os.path.exists(os.path.join(data_dir, "image_folder"))  # nothing half-built


# ---------------------------------------------------------------------------------------
# Catalog datasets


def test_catalog_not_prepared_error(tmp_path):
    data_dir = str(tmp_path / "empty")
    assert not data.is_prepared("cifar10", data_dir=data_dir)
    message = (
        f"dataset 'cifar10' is not prepared in {data_dir}; prepare it on a machine with internet"
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        data.get_source("cifar10", "train", data_dir=data_dir)
    assert "README" in str(info.value)
    with pytest.raises(ValueError, match="'mnist' is not prepared"):
        data.prepare("mnist", data_dir=data_dir)
    assert data.dataset_spec("cifar10").image_shape == (32, 32, 3)  # spec needs no data


def test_catalog_read_from_prepared_dir(data_dir, tmp_path):
    """A prepared `<dir>/mnist/<version>` folder is read as is, even at another version."""
    catalog_dir = tmp_path / "catalog"
    data.prepare("digits", data_dir=data_dir)
    shutil.copytree(os.path.join(data_dir, "digits", "1.0.0"), catalog_dir / "mnist" / "1.0.0")
    assert data.is_prepared("mnist", data_dir=str(catalog_dir))
    source = data.get_source("mnist", "train[:10%]", data_dir=str(catalog_dir))
    assert len(source) == 144 and source[0]["image"].shape == (8, 8, 1)
    assert _listed(str(catalog_dir))["mnist"] == data.DatasetStatus("mnist", "catalog", True)


def test_catalog_with_tfds_mock_data(tmp_path):
    data_dir = str(tmp_path / "empty")
    # mock_data fakes the records but not `is_prepared`, which jaxaccel checks first.
    with tfds.testing.mock_data(num_examples=12), mock.patch.object(
        tfds.core.DatasetBuilder, "is_prepared", lambda self: True
    ):
        cifar = data.get_source("cifar10", "train", data_dir=data_dir)
        assert len(cifar) == 12
        example = cifar[0]
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
        assert 0 <= example["label"] < 10
        mnist = data.get_source("mnist", "test[:50%]", data_dir=data_dir)
        assert mnist[5]["image"].shape == (28, 28, 1)
        # (TFDS 4.9.10's mock breaks `__getitems__`, so batches are not built from it.)


def test_image_folder_resize_to_image_size_and_class_names(tmp_path):
    root = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    sizes = {"train": [(6, 5), (9, 7), (6, 5)], "test": [(3, 8)]}
    for split, shapes in sizes.items():
        for cls in ("b_dog", "a_cat"):
            os.makedirs(root / split / cls)
            for i, (h, w) in enumerate(shapes):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
                    root / split / cls / f"{i}.png")
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"same size, or set dataset.image_size=\(H, W\)"):
        data.dataset_spec("image_folder", path=str(root), data_dir=data_dir)
    spec = data.dataset_spec("image_folder", path=str(root), data_dir=data_dir, image_size=(4, 6))
    assert spec.image_shape == (4, 6, 3) and spec.names() == ("a_cat", "b_dog")  # sorted
    source = data.get_source("image_folder", "train", path=str(root), data_dir=data_dir,
                             image_size=(4, 6))
    images, labels = data.read_arrays(source, np.arange(len(source)))
    assert images.shape == (6, 4, 6, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    other = data.dataset_spec("image_folder", path=str(root), data_dir=data_dir, image_size=(5, 5))
    assert other.image_shape == (5, 5, 3)  # another size is another prepared dataset
    assert data.dataset_spec("digits").names() == tuple("0123456789")
    with pytest.raises(ValueError, match="applies to 'image_folder' only"):
        data.get_source("digits", "train", image_size=(4, 4))


@pytest.mark.parametrize("name,size,needle", [
    ("image_folder", (4, 0), "must be \\(height, width\\), both > 0"),
    ("digits", (4, 4), "resizes 'image_folder' images only"),
])
def test_image_size_is_checked_with_the_config(name, size, needle, tmp_path):
    from jaxaccel.config import ConfigError, default_config, validate
    c = default_config()
    c.dataset.name, c.dataset.path, c.dataset.image_size = name, str(tmp_path), size
    with pytest.raises(ConfigError, match=needle):
        validate(c)


def test_a_run_records_its_dataset_and_class_names(tmp_path):
    import jaxaccel
    from jaxaccel.config import default_config
    root = tmp_path / "pets"
    _write_folder(root, classes=("cat", "dog"), per_class=(16, 4), size=(8, 8))
    c = default_config()
    c.dataset.name, c.dataset.path = "image_folder", str(root)
    c.dataset.data_dir, c.dataset.image_size = str(tmp_path / "tfds"), (6, 6)
    c.model.name, c.num_steps, c.batch_size, c.eval_batch_size = "lenet300_100", 2, 8, 8
    c.progress, c.parallel.num_devices = False, 1
    workdir = tmp_path / "run"
    jaxaccel.train(c, str(workdir))
    record = json.loads((workdir / "dataset.json").read_text())
    assert record["class_names"] == ["cat", "dog"] and record["image_shape"] == [6, 6, 3]
    assert record["num_train_examples"] == 32 and record["num_test_examples"] == 8
    assert len(record["mean"]) == len(record["std"]) == 3
