"""jaxaccel.compress.layer_table: the per-layer compression table (counts, MACs, packed bytes,
markdown) of a model's variables and masks."""
import jax
import numpy as np
import pytest

from jaxaccel import data, models
from jaxaccel.compress import layer_table as report
from jaxaccel.compress import package, prune, shrink

_masks_at = jax.jit(lambda params, s: prune.magnitude_masks(params, s))


@pytest.fixture(scope="module")
def cnn3():
    model = models.get_model("cnn3", 10, width=0.25)
    variables = models.init_variables(model, jax.random.key(0), (16, 16, 3))
    return model, variables, _masks_at(variables["params"], 0.75)


def test_layer_table_counts(cnn3):
    model, variables, masks = cnn3
    table = report.layer_table(model, variables, (16, 16, 3), masks=masks)
    rows = table["layers"]
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    conv1, fc2 = rows[0], rows[-1]
    assert conv1["kind"] == "conv" and conv1["shape"] == [3, 3, 3, 8]
    assert conv1["params"] == 216 and conv1["nonzeros"] == 54
    assert conv1["sparsity"] == pytest.approx(0.75)
    assert conv1["macs_dense"] == 16 * 16 * 216  # SAME conv: every output position
    assert conv1["macs_effective"] == 16 * 16 * 54
    assert rows[1]["macs_dense"] == 8 * 8 * 3 * 3 * 8 * 16  # after one 2x2 pool
    assert fc2["kind"] == "dense" and fc2["macs_dense"] == 32 * 10
    t = table["totals"]
    assert t["macs_dense"] == shrink.flops(model, (16, 16, 3))
    assert t["mac_reduction"] == pytest.approx(4.0)
    assert t["params"] == sum(r["params"] for r in rows)
    assert t["variables"] == sum(np.size(x) for x in jax.tree.leaves(variables))
    # Unquantized and sparse: float32 nonzeros + bit-mask + float32 bias.
    assert conv1["bits"] == 32 and conv1["bytes"] == 54 * 4 + 216 // 8 + 8 * 4
    dense = report.layer_table(model, variables, (16, 16, 3))
    assert dense["totals"]["packed_bytes"] == dense["totals"]["dense_float32_bytes"]
    assert dense["totals"]["sparsity"] == 0.0


def test_layer_macs_of_depthwise_separable_model_by_hand():
    """Grouped convs: a depthwise conv costs kh*kw MACs per output value (its kernel is
    (3, 3, 1, C)), a 1x1 pointwise conv Cin per output value."""
    model = models.get_model("dscnn_bn", 10)
    abstract = jax.eval_shape(lambda r: model.init(r, jax.numpy.zeros((1, 28, 28, 1)), train=False),
                              jax.random.key(0))
    variables = jax.tree.map(lambda s: np.ones(s.shape, np.float32), dict(abstract))
    table = report.layer_table(model, variables, (28, 28, 1))
    macs = {r["layer"]: r["macs_dense"] for r in table["layers"]}
    # the stem runs at 28x28, block 1 after a 2x2 pool at 14x14, block 2 at 7x7
    assert macs == {"conv1": 28 * 28 * 9 * 32, "dw1": 14 * 14 * 9 * 32, "pw1": 14 * 14 * 32 * 64,
                    "dw2": 7 * 7 * 9 * 64, "pw2": 7 * 7 * 64 * 128, "fc": 128 * 10, "other": 0}
    assert table["totals"]["macs_dense"] == sum(macs.values()) == 1_114_560 == shrink.flops(model, (28, 28, 1))
    dw1 = next(r for r in table["layers"] if r["layer"] == "dw1")
    assert dw1["kind"] == "conv" and dw1["shape"] == [3, 3, 1, 32] and dw1["params"] == 288


def test_table_bytes_are_the_package_bytes(cnn3, tmp_path):
    model, variables, masks = cnn3
    table = report.layer_table(model, variables, (16, 16, 3), masks=masks, bits=4)
    spec = data.dataset_spec("cifar10")
    spec = data.DatasetSpec("toy16", 10, (16, 16, 3), spec.mean, spec.std, "builtin")
    info = package.save_compressed(tmp_path / "p.npz", model, variables, masks, spec=spec, bits=4)
    assert table["totals"]["packed_bytes"] == info["packed_bytes"]
    assert all(r["bits"] == 4 for r in table["layers"])
    half = report.layer_table(model, variables, (16, 16, 3), masks=masks, bits=4, float_bytes=2)
    info16 = package.save_compressed(tmp_path / "h.npz", model, variables, masks, spec=spec, bits=4,
                                     float_dtype="float16")
    assert half["totals"]["packed_bytes"] == info16["packed_bytes"] < info["packed_bytes"]


def test_markdown_has_rows_and_totals(cnn3):
    model, variables, masks = cnn3
    rep = {"source": "x", "model": "cnn3", "step": 1, "stage": "s", "bits": 8,
           "input_shape": [16, 16, 3], "notes": ["hello"],
           **report.layer_table(model, variables, (16, 16, 3), masks=masks, bits=8)}
    text = report.to_markdown(rep)
    lines = [l for l in text.splitlines() if l.startswith("|")]
    assert len(lines) == 2 + 5 + 1
    assert lines[2].startswith("| conv1 | conv | 3x3x3x8 | 216 | 54 | 75.00% | 8 |")
    assert lines[-1].startswith("| **total** |") and "- hello" in text


@pytest.mark.parametrize("kwargs,needle", [({"bits": 9}, "bits.*9"), ({"bits": 1}, "bits.*1"),
                                           ({"float_bytes": 8}, "float_bytes.*8")])
def test_bad_arguments(cnn3, kwargs, needle):
    model, variables, _ = cnn3
    with pytest.raises(ValueError, match=needle):
        report.layer_table(model, variables, (16, 16, 3), **kwargs)
    with pytest.raises(ValueError, match=r"input_shape.*\(16, 16\)"):
        report.layer_table(model, variables, (16, 16))
