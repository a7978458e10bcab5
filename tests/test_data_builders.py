"""jaxaccel.data.builders: the built-in datasets (digits, mnist5k) and image folders written
as TFDS array_record files on first use, offline, with one log line each and none of TFDS's
noise; image folders' layout and files checked with one clear error."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jaxaccel.data as data
from image_folders import write_folder
from jaxaccel.data import TrainBatches, builders
from tiny_runs import experiment_file, last_line

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """One data dir per module so digits/mnist5k are built once."""
    return str(tmp_path_factory.mktemp("tfds"))


def _arrays(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    source = data.get_source(name, split, data_dir=data_dir)
    return data.read_arrays(source, np.arange(len(source)))


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


def test_preparing_logs_one_honest_line_and_no_tfds_noise(tmp_path):
    """First use of a built-in dataset and of an image folder, logging at INFO into a pipe
    (like a sweep worker's log.txt): our own lines, none of TFDS's banners or progress bars."""
    folder = tmp_path / "pics"
    write_folder(folder)  # 2 classes: 3 train and 2 test images each
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
# Image folders
# ---------------------------------------------------------------------------------------
def test_image_folder_roundtrip(tmp_path):
    root = tmp_path / "pets"
    written = write_folder(root)
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
    write_folder(tmp_path / "a", seed=1)
    write_folder(tmp_path / "b", classes=("x", "y", "z"), per_class=(2, 1), size=(3, 4), mode="L", seed=2)
    spec_a = data.dataset_spec("image_folder", path=str(tmp_path / "a"), data_dir=data_dir)
    spec_b = data.dataset_spec("image_folder", path=str(tmp_path / "b"), data_dir=data_dir)
    assert (spec_a.num_classes, spec_a.image_shape) == (2, (6, 5, 3))
    assert (spec_b.num_classes, spec_b.image_shape) == (3, (3, 4, 1))
    assert len(os.listdir(os.path.join(data_dir, "image_folder"))) == 2
    assert len(data.get_source("image_folder", "test", path=str(tmp_path / "b"), data_dir=data_dir)) == 3


def test_image_folder_not_rebuilt(tmp_path, caplog):
    root = tmp_path / "pets"
    written = write_folder(root)
    data_dir = str(tmp_path / "tfds")
    data.prepare("image_folder", path=str(root), data_dir=data_dir)
    [folder] = os.listdir(os.path.join(data_dir, "image_folder"))
    version_dir = os.path.join(data_dir, "image_folder", folder, "1.0.0")
    before = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    # Every image replaced by garbage of the same size and mtime: the folder is the same
    # dataset (path, size, mtime), and building it again (decoding each image) would fail.
    for png in root.rglob("*.png"):
        stat = png.stat()
        png.write_bytes(b"\0" * stat.st_size)
        os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level(logging.INFO, logger="jaxaccel"):
        data.prepare("image_folder", path=str(root), data_dir=data_dir)
        source = data.get_source("image_folder", "train", path=str(root), data_dir=data_dir)
    assert not [r.getMessage() for r in caplog.records if "prepar" in r.getMessage()]
    x, _ = data.read_arrays(source, np.arange(len(source)))  # the prepared pixels
    np.testing.assert_array_equal(x, np.stack([a for a, _ in written["train"]]))
    after = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    assert after == before


def test_image_folder_errors(tmp_path):
    data_dir = str(tmp_path / "tfds")

    def spec_of(root):
        return data.dataset_spec("image_folder", path=str(root), data_dir=data_dir)

    with pytest.raises(ValueError, match=f"{tmp_path / 'missing'} does not exist"):
        spec_of(tmp_path / "missing")

    no_test = tmp_path / "no_test"
    write_folder(no_test)
    shutil.rmtree(no_test / "test")
    with pytest.raises(ValueError, match="no 'test' subfolder"):
        spec_of(no_test)

    empty = tmp_path / "empty"
    write_folder(empty)
    (empty / "train" / "bird").mkdir()
    (empty / "test" / "bird").mkdir()
    with pytest.raises(ValueError, match=f"class folder {empty / 'train' / 'bird'} is empty"):
        spec_of(empty)

    bad = tmp_path / "bad"
    write_folder(bad)
    (bad / "train" / "cat" / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=f"{bad / 'train' / 'cat' / 'notes.png'} is not a decodable image"):
        spec_of(bad)

    text = tmp_path / "text"
    write_folder(text)
    (text / "test" / "dog" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="readme.txt is not an image file"):
        spec_of(text)

    sizes = tmp_path / "sizes"
    write_folder(sizes)
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(sizes / "test" / "dog" / "big.png")
    with pytest.raises(ValueError, match=r"big.png is 9x7 \(height x width\) but .*0.png is 6x5"):
        spec_of(sizes)

    classes = tmp_path / "classes"
    write_folder(classes)
    shutil.rmtree(classes / "test" / "dog")
    with pytest.raises(ValueError, match="test classes"):
        spec_of(classes)
    assert not os.path.exists(os.path.join(data_dir, "image_folder"))  # nothing half-built


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
