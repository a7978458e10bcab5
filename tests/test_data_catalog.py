"""jaxaccel.data.catalog: dataset specs, the data dir, and TFDS catalog datasets read only
from a directory where they were prepared (nothing is ever downloaded)."""

from __future__ import annotations

import os
import shutil
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxaccel.data as data
from jaxaccel.data import DatasetSpec

def _listed(data_dir: str) -> dict[str, data.DatasetStatus]:
    return {d.name: d for d in data.list_datasets(data_dir)}


def test_default_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXACCEL_DATA_DIR", str(tmp_path / "env"))
    assert data.default_data_dir() == str(tmp_path / "env")
    assert data.default_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert data.default_data_dir("gs://bucket/tfds") == "gs://bucket/tfds"
    monkeypatch.delenv("JAXACCEL_DATA_DIR")
    assert data.default_data_dir() == os.path.expanduser("~/.cache/jaxaccel/tfds")


def test_specs_are_consistent():
    for name, spec in data.DATASETS.items():
        assert spec.name == name
        assert spec.kind in ("builtin", "catalog")
        assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]
    assert data.DATASETS["cifar10"].image_shape == (32, 32, 3)
    assert data.DATASETS["cifar100"].num_classes == 100
    with pytest.raises(ValueError, match="kind"):
        DatasetSpec("x", 2, (2, 2, 1), (0.5,), (0.5,), "weird")


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


def test_catalog_read_from_prepared_dir(tmp_path):
    """A prepared `<dir>/mnist/<version>` folder is read as is, even at another version."""
    catalog_dir = tmp_path / "catalog"
    data.prepare("digits")
    shutil.copytree(os.path.join(data.default_data_dir(), "digits", "1.0.0"), catalog_dir / "mnist" / "1.0.0")
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
