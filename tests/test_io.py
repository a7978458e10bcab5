"""jaxaccel.io: one strict, atomic JSON writer; every file of a diverged run parses strictly."""
import json
import math
import os

import numpy as np
import pytest

import jaxaccel
from jaxaccel import io
from jaxaccel.config import default_config


def test_non_finite_numbers_become_null_and_numpy_scalars_plain():
    obj = {"nan": float("nan"), "inf": np.float32("inf"), "ninf": -math.inf, "i": np.int64(3),
           "f": np.float32(0.5), "b": np.bool_(True), "t": (1, 2), "a": np.arange(2),
           "nested": [{"x": float("nan")}], 4: "key"}
    text = io.dumps(obj)
    assert io.loads(text) == {"nan": None, "inf": None, "ninf": None, "i": 3, "f": 0.5, "b": True,
                              "t": [1, 2], "a": [0, 1], "nested": [{"x": None}], "4": "key"}


def test_strict_parser_rejects_nan_and_writer_rejects_objects(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        io.loads('{"x": NaN}')
    with pytest.raises(TypeError, match="object"):
        io.dumps({"x": object()})
    path = tmp_path / "sub" / "x.json"
    io.write_json(path, {"b": 1, "a": float("inf")})
    assert path.read_text() == '{\n  "a": null,\n  "b": 1\n}\n'
    assert os.listdir(path.parent) == ["x.json"]  # no temporary file left behind


def _json_texts(workdir):
    """(path, text) of every JSON or JSON-lines file under `workdir` (TensorBoard's binary
    event files and orbax's array data excluded)."""
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                continue
            if text.lstrip()[:1] in ("{", "["):
                yield path, text


def test_every_file_of_a_diverged_run_is_strict_json(tmp_path):
    c = default_config()
    c.dataset.name, c.model.name, c.model.kwargs.padding = "digits", "lenet5", "SAME"
    c.num_steps, c.log_every, c.checkpoint_every, c.progress = 4, 2, 2, False
    c.optimizer.name, c.optimizer.lr, c.nonfinite = "sgd", 1e30, "skip"
    c.batch_size, c.eval_batch_size = 64, 128
    workdir = str(tmp_path / "nan")
    results = jaxaccel.train(c, workdir)
    assert results["nonfinite_steps"] > 0 and results["test_loss"] is None  # it diverged
    seen = set()
    for path, text in _json_texts(workdir):
        lines = text.splitlines() if path.endswith(".jsonl") else [text]
        for line in lines:
            io.loads(line)  # raises on NaN / Infinity
        seen.add(os.path.relpath(path, workdir).split(os.sep)[0])
    assert {"results.json", "config.json", "metrics.jsonl", "checkpoints"} <= seen
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["stages"][0]["test_loss"] is None
