"""Datasets as TFDS array_record files, read with random access and no TensorFlow.

Built-in datasets (`digits`, `mnist5k`) and image folders are prepared on first use under
the data dir and reused afterwards; TFDS catalog datasets (`mnist`, `cifar10`, ...) are only
read from a data dir where they were prepared beforehand (nothing is ever downloaded).

    source = get_source("mnist5k", "train")
    batches = TrainBatches(source, dataset_spec("mnist5k"), global_batch_size=128, seed=0)
    batch = batches.batch(step)   # {"image": float32 (B,H,W,C), "label": int32 (B,)}

Owns the dataset names (`DATASETS`, `list_datasets`, `dataset_spec`), preparing them
(`prepare`, `is_prepared`), sources (`get_source`) and a config's splits (`spec_for`,
`splits_for`: train, the validation held out, test); the parts live in `catalog`, `builders`
and `pipeline`. Imports nothing of jaxaccel outside data/; never models, compress, state or
anything above.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any

from jaxaccel.data import builders
from jaxaccel.data.catalog import (
    BUILTIN_SPECS,
    CATALOG_SPECS,
    DatasetSpec,
    DatasetStatus,
    catalog_builder,
    catalog_is_prepared,
    default_data_dir,
    not_prepared_error,
)
from jaxaccel.data.pipeline import (
    ArraySource,
    ExampleSource,
    Subset,
    TrainBatches,
    eval_batches,
    normalize,
    read_arrays,
    read_labels,
    validation_indices,
)

__all__ = [
    "ArraySource",
    "DATASETS",
    "FOLDER_DATASET",
    "DatasetSpec",
    "DatasetStatus",
    "ExampleSource",
    "Splits",
    "Subset",
    "TrainBatches",
    "as_spec",
    "dataset_spec",
    "default_data_dir",
    "eval_batches",
    "get_source",
    "is_prepared",
    "list_datasets",
    "normalize",
    "prepare",
    "read_arrays",
    "read_labels",
    "spec_for",
    "splits_for",
    "validation_indices",
]

FOLDER_DATASET = "image_folder"

DATASETS: dict[str, DatasetSpec] = {**BUILTIN_SPECS, **CATALOG_SPECS}


Size = tuple[int, int] | None  # image_folder: resize every image to (H, W)


def _check_name(name: str, path: str | None, image_size: Size = None) -> str:
    """The dataset's kind; ValueError for unknown names, a missing folder path, or a resize
    asked of a dataset that is not an image folder."""
    if image_size is not None:
        if name != FOLDER_DATASET:
            raise ValueError(f"image_size={tuple(image_size)} applies to {FOLDER_DATASET!r} only "
                             f"(dataset {name!r} has a fixed shape)")
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size={tuple(image_size)} must be (height, width) > 0")
    if name == FOLDER_DATASET:
        if not path:
            raise ValueError(f"dataset {FOLDER_DATASET!r} needs path=<folder with train/ and test/>")
        return "folder"
    if name not in DATASETS:
        valid = ", ".join([*DATASETS, FOLDER_DATASET])
        raise ValueError(f"unknown dataset {name!r}; valid names: {valid}")
    return DATASETS[name].kind


def _builder(name: str, data_dir: str, path: str | None, image_size: Size = None) -> Any:
    """A TFDS builder for `name`, preparing built-in datasets and folders if needed.

    Damaged prepared files (truncated, bytes flipped, unparsable metadata) give one
    ValueError naming the directory, never a library traceback.
    """
    try:
        return _open_builder(name, data_dir, path, image_size)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - TFDS/array_record/protobuf raise many types
        where = os.path.join(data_dir, name)
        what = _bad_json(where) or f"prepared files under {where}"
        raise _unreadable(f"dataset {name!r}: {what}", e, where,
                          rebuildable=DATASETS.get(name) is None
                          or DATASETS[name].kind != "catalog") from e


def _bad_json(directory: str) -> str | None:
    """The first metadata file under `directory` that is not valid JSON, if any."""
    for path in sorted(glob.glob(os.path.join(directory, "**", "*.json"), recursive=True)):
        try:
            with open(path) as f:
                json.load(f)
        except (OSError, ValueError):
            return path
    return None


def _unreadable(what: str, e: BaseException, directory: str, *, rebuildable: bool) -> ValueError:
    reason = " ".join(str(e).split())[:300] or type(e).__name__
    fix = (f"delete {directory} and run again to rebuild it" if rebuildable
           else f"prepare it again into {directory}")
    return ValueError(f"{what} cannot be read ({reason}); {fix}")


def _open_builder(name: str, data_dir: str, path: str | None, image_size: Size = None) -> Any:
    kind = _check_name(name, path, image_size)
    if kind == "catalog":
        builder = catalog_builder(name, data_dir)
        if builder is None:
            raise not_prepared_error(name, data_dir)
        return builder
    if kind == "folder":
        builder = builders.folder_builder(builders.scan_folder(path, image_size), data_dir)
    else:
        builder = builders.builtin_builder(name, data_dir)
    builders.prepare_builder(builder)
    return builder


def prepare(name: str, *, data_dir: str | None = None, path: str | None = None,
            image_size: Size = None) -> None:
    """Write the dataset's array_record files unless already prepared (idempotent).

    Catalog datasets cannot be prepared offline: ValueError if they are not in `data_dir`.
    """
    _builder(name, default_data_dir(data_dir), path, image_size)


def is_prepared(name: str, *, data_dir: str | None = None, path: str | None = None,
                image_size: Size = None) -> bool:
    """Whether `name` can be read from the data dir without building or downloading anything."""
    kind = _check_name(name, path, image_size)
    data_dir = default_data_dir(data_dir)
    if kind == "catalog":
        return catalog_is_prepared(name, data_dir)
    if kind == "folder":
        version_dir = builders.folder_version_dir(data_dir,
                                                  builders.scan_folder(path, image_size))
        return (version_dir / "dataset_info.json").exists()
    return builders.builtin_builder(name, data_dir).is_prepared()


def list_datasets(data_dir: str | None = None) -> list[DatasetStatus]:
    """Name, kind and prepared? of every built-in and known catalog dataset (nothing is built),
    for `jaxaccel datasets`; the kind says what "not prepared" means: built-ins are built on
    first use, catalog datasets must be prepared elsewhere."""
    return [DatasetStatus(name, spec.kind, is_prepared(name, data_dir=data_dir))
            for name, spec in DATASETS.items()]


def as_spec(spec: DatasetSpec | str) -> DatasetSpec:
    """`spec` itself, or the spec of the built-in dataset it names; ValueError otherwise (what
    exporters take to know a model's input shape and normalisation)."""
    if isinstance(spec, str):
        spec = dataset_spec(spec)
    if not isinstance(spec, DatasetSpec):
        raise ValueError(f"spec must be the model's jaxaccel.data.DatasetSpec (or a dataset name), "
                         f"got {spec!r}")
    return spec


def dataset_spec(name: str, *, path: str | None = None, data_dir: str | None = None,
                 image_size: Size = None) -> DatasetSpec:
    """Shape, classes and normalisation of a dataset.

    For `image_folder` the folder is prepared if needed: classes are its train subfolders in
    sorted order (label i = the i-th name), the shape is the images' common size (or
    `image_size`, to which every image is resized), mean/std are measured on its train split.
    """
    kind = _check_name(name, path, image_size)
    if kind != "folder":
        return DATASETS[name]
    info = _builder(name, default_data_dir(data_dir), path, image_size).info
    metadata = info.metadata or {}
    return DatasetSpec(
        name=FOLDER_DATASET,
        num_classes=info.features["label"].num_classes,
        image_shape=tuple(int(d) for d in info.features["image"].shape),
        mean=tuple(metadata["mean"]),
        std=tuple(metadata["std"]),
        kind="folder",
        class_names=tuple(info.features["label"].names),
    )


_SPLIT_NAME = re.compile(r"^\s*([\w\-]+)")


def get_source(
    name: str, split: str, *, data_dir: str | None = None, path: str | None = None,
    image_size: Size = None,
) -> ExampleSource:
    """Random-access source of `{"image": uint8 HWC, "label": int}` for one split.

    Prepares built-in datasets and folders on first use. `split` is "train"/"test" (catalog
    datasets: their own split names) with optional TFDS slicing, e.g. "train[:10%]".
    """
    data_dir = default_data_dir(data_dir)
    builder = _builder(name, data_dir, path, image_size)
    base = _SPLIT_NAME.match(split)
    splits = list(builder.info.splits.keys())
    if base is None or (splits and base.group(1) not in splits):
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits)}")
    files = sorted(glob.glob(os.path.join(str(builder.data_dir),
                                          f"*-{base.group(1)}.array_record*")))
    label = ", ".join(files) if files else f"the {base.group(1)!r} files in {builder.data_dir}"
    try:
        source = builder.as_data_source(split=split)
        if len(source):  # files open lazily: read one record now so damage shows up here
            source[0]
    except Exception as e:  # noqa: BLE001 - array_record reports damage as RuntimeError
        raise _unreadable(f"dataset {name!r}: {label}", e, str(builder.data_dir),
                          rebuildable=DATASETS.get(name) is None
                          or DATASETS[name].kind != "catalog") from e
    return ExampleSource(source, name=name, split=split, files=label)


@dataclasses.dataclass
class Splits:
    """The examples a run trains on, selects on (validation, optional) and reports (test)."""

    train: Any
    validation: Any | None
    test: Any

    def sizes(self) -> dict[str, int]:
        """`num_train_examples`, `num_validation_examples`, `num_test_examples`."""
        return {"num_train_examples": len(self.train),
                "num_validation_examples": len(self.validation) if self.validation is not None else 0,
                "num_test_examples": len(self.test)}


def _location(dataset: Any) -> dict[str, Any]:
    """`data_dir`, `path` and `image_size` arguments of a config's `dataset` section."""
    size = tuple(dataset.get("image_size", (0, 0)))
    return dict(data_dir=dataset.data_dir or None, path=dataset.path or None,
                image_size=size if any(size) else None)


def spec_for(dataset: Any) -> DatasetSpec:
    """The `DatasetSpec` of a config's `dataset` section."""
    return dataset_spec(dataset.name, **_location(dataset))


def splits_for(dataset: Any) -> Splits:
    """Train, validation and test examples of a config's `dataset` section.

    With `validation_split` = f > 0, a stratified fraction f of the train split, drawn from
    `validation_seed` (not the run's seed: every run of an experiment selects on the same
    examples), is held out as the validation split and never trained on.
    """
    kwargs = _location(dataset)
    train = get_source(dataset.name, dataset.train_split, **kwargs)
    test = get_source(dataset.name, dataset.test_split, **kwargs)
    if not dataset.validation_split:
        return Splits(train, None, test)
    kept, held = validation_indices(read_labels(train), dataset.validation_split,
                                    dataset.validation_seed)
    return Splits(Subset(train, kept, split=f"{dataset.train_split} (without validation)"),
                  Subset(train, held, split="validation"), test)

