"""Which datasets jaxaccel knows, where prepared data lives, and TFDS catalog datasets.

`BUILTIN_SPECS` and `CATALOG_SPECS` (together `data.DATASETS`) map every name the framework
accepts without a path to its `DatasetSpec` (shapes and normalisation statistics). Catalog
datasets (mnist, cifar10, ...) are never downloaded here: they are read from a data dir that
was prepared on a machine with internet access
(`tfds build <name> --file_format=array_record --data_dir=<dir>`).

Owns `DatasetSpec`, `DatasetStatus`, the specs and the data dir (`default_data_dir`,
`$JAXACCEL_DATA_DIR`). Imports nothing of jaxaccel; never models, compress, state or anything
above.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from etils import epath

DATA_DIR_ENV = "JAXACCEL_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "jaxaccel", "tfds")

KINDS = ("builtin", "folder", "catalog")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset that models and normalisation need.

    `mean`/`std` are per-channel, in 0..1 units (pixel/255), computed on the train split.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str
    class_names: tuple[str, ...] = ()  # label i's name; () = the labels' numbers

    def names(self) -> tuple[str, ...]:
        """Every label's name, in label order ("0", "1", ... when the dataset names none)."""
        return self.class_names or tuple(str(i) for i in range(self.num_classes))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DatasetSpec.kind={self.kind!r}; valid kinds: {', '.join(KINDS)}")
        channels = self.image_shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"DatasetSpec {self.name!r}: mean/std need {channels} values (one per channel), "
                f"got mean={self.mean} std={self.std}"
            )


@dataclasses.dataclass(frozen=True)
class DatasetStatus:
    """One row of `list_datasets`: a dataset's name, kind (see KINDS) and whether its
    prepared files are already in the data dir (built-ins are built on first use if not)."""

    name: str
    kind: str
    prepared: bool


def default_data_dir(override: str | None = None) -> str:
    """The prepared-data directory: `override` > $JAXACCEL_DATA_DIR > ~/.cache/jaxaccel/tfds.

    gs:// paths are returned unchanged; local paths are expanded and made absolute.
    """
    path = override or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


# Statistics of the train splits (0..1 units). Built-in values were computed from the
# prepared data and are checked against it by tests/test_data_pipeline.py.
BUILTIN_SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 10, (8, 8, 1), (0.305434,), (0.375957,), "builtin"),
    "mnist5k": DatasetSpec("mnist5k", 10, (28, 28, 1), (0.131141,), (0.308319,), "builtin"),
}

# Standard published statistics of the TFDS catalog datasets' train splits.
CATALOG_SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), "catalog"),
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), "catalog"),
    "kmnist": DatasetSpec("kmnist", 10, (28, 28, 1), (0.1918,), (0.3483,), "catalog"),
    "cifar10": DatasetSpec(
        "cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "catalog"
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "catalog"
    ),
    "svhn_cropped": DatasetSpec(
        "svhn_cropped", 10, (32, 32, 3), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "catalog"
    ),
}


def not_prepared_error(name: str, data_dir: str) -> ValueError:
    """The error for a catalog dataset missing from `data_dir`, saying how to fix it."""
    return ValueError(
        f"dataset {name!r} is not prepared in {data_dir}; prepare it on a machine with internet: "
        f"`tfds build {name} --file_format=array_record --data_dir={data_dir}` "
        f"(or copy a prepared {name}/<version> folder there; see README)"
    )


def _prepared_version_dirs(data_dir: str, name: str) -> list[epath.Path]:
    """Version dirs `<data_dir>/<name>/<version>` holding a dataset_info.json, oldest first."""
    base = epath.Path(data_dir) / name
    try:
        if not base.is_dir():
            return []
        found = [p for p in base.iterdir() if (p / "dataset_info.json").exists()]
    except (OSError, ImportError):  # e.g. gs:// without gcsfs installed
        return []

    def version_key(p: epath.Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in p.name.split("."))
        except ValueError:
            return (-1,)

    return sorted(found, key=version_key)


def catalog_builder(name: str, data_dir: str) -> Any | None:
    """A TFDS builder for catalog dataset `name` prepared in `data_dir`, or None if absent.

    Prefers the version of the installed TFDS code; falls back to any other prepared
    version found on disk (read through `tfds.builder_from_directory`). Never downloads.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            return builder
    except tfds.core.registered.DatasetNotFoundError:
        pass
    versions = _prepared_version_dirs(data_dir, name)
    if versions:
        return tfds.builder_from_directory(str(versions[-1]))
    return None


def catalog_is_prepared(name: str, data_dir: str) -> bool:
    """Whether catalog dataset `name` can be read from `data_dir` without downloading."""
    return catalog_builder(name, data_dir) is not None


def catalog_data_source(name: str, split: str, data_dir: str) -> Any:
    """Random-access TFDS data source of a prepared catalog dataset split (never downloads)."""
    builder = catalog_builder(name, data_dir)
    if builder is None:
        raise not_prepared_error(name, data_dir)
    return builder.as_data_source(split=split)
