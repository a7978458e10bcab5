"""Per-layer compression report and the `jaxaccel compress report|package` command."""
import json

import chex
import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import cli, config as config_lib, data, models, stages
from jaxaccel import loading
from jaxaccel.compress import layer_table as report
from jaxaccel.compress import package, prune, quant, shrink

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


def test_weight_bits_follow_the_last_quantizing_stage():
    q = lambda b: {"mode": "ptq", "weight_bits": b}  # noqa: E731
    s = stages.stage
    assert loading.weight_bits([s("t", "train", steps=1)]) == 32
    assert loading.weight_bits([s("t", "train", steps=1), s("q", "quantize", quant=q(4)),
                               s("e", "evaluate")]) == 4
    assert loading.weight_bits([s("t", "train", steps=1, quant={"mode": "qat", "weight_bits": 6}),
                               s("p", "prune", prune={"method": "one_shot", "sparsity": .5})]) == 6
    assert loading.weight_bits([s("q", "quantize", quant=q(8)), s("t", "train", steps=1)]) == 32


@pytest.mark.parametrize("kwargs,needle", [({"bits": 9}, "bits.*9"), ({"bits": 1}, "bits.*1"),
                                           ({"float_bytes": 8}, "float_bytes.*8")])
def test_bad_arguments(cnn3, kwargs, needle):
    model, variables, _ = cnn3
    with pytest.raises(ValueError, match=needle):
        report.layer_table(model, variables, (16, 16, 3), **kwargs)
    with pytest.raises(ValueError, match=r"input_shape.*\(16, 16\)"):
        report.layer_table(model, variables, (16, 16))


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished run: lenet300_100 on digits, 10 steps, then a one-shot 90% prune."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 64
    c.eval_batch_size = 120
    c.log_every = 10
    c.checkpoint_every = 10
    c.progress = False
    c.parallel.num_devices = 1
    c.stages = (stages.stage("train", "train", steps=10),
                stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.9}))
    wd = str(tmp_path_factory.mktemp("compress_run"))
    return wd, jaxaccel.train(c, wd)


def test_report_command(run, tmp_path, capsys):
    wd, results = run
    out = tmp_path / "report.json"
    assert cli.main(["compress", "report", wd, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fc1 | dense | 64x300 | 19,200 | 1,920 | 90.00% | 32 |" in text
    assert "prune" in text and "applied again" in text
    rep = json.loads(out.read_text())
    assert [r["layer"] for r in rep["layers"]] == ["fc1", "fc2", "fc3"]
    assert rep["step"] == 10 and rep["bits"] == 32 and rep["stage"] == "prune"
    t = rep["totals"]
    # The pruned weights the report rebuilt are the ones the run evaluated.
    prune_row = results["stages"][-1]
    assert t["sparsity"] == pytest.approx(prune_row["sparsity"])
    assert t["nonzeros"] == prune_row["nonzero_weights"]
    assert t["packed_bytes"] == prune_row["packed_bytes"]
    assert t["macs_effective"] * 10 == t["macs_dense"] == 64 * 300 + 300 * 100 + 100 * 10

    assert cli.main(["compress", "report", wd, "--bits", "8"]) == 0
    assert "| fc1 | dense | 64x300 | 19,200 | 1,920 | 90.00% | 8 |" in capsys.readouterr().out


def test_package_command_then_load_and_report(run, tmp_path, capsys):
    wd, _ = run
    out = tmp_path / "model.npz"
    sizes = tmp_path / "sizes.json"
    assert cli.main(["compress", "package", wd, "--out", str(out), "--json", str(sizes)]) == 0
    text = capsys.readouterr().out
    info = json.loads(sizes.read_text())
    assert info["package_file_bytes"] == out.stat().st_size
    assert f"{info['package_file_bytes']:,} bytes on disk" in text
    assert "float32 dense parameters" in text and "orbax checkpoint" in text
    assert info["checkpoint_bytes"] > 10 * info["package_file_bytes"]
    assert info["ratio"] > 10 and info["sparsity"] == pytest.approx(0.9)
    # The package alone rebuilds the pruned int8 model: the run's final (pruned) weights,
    # fake-quantized as the PTQ stage does.
    pkg = package.load_compressed(out)
    model, variables = pkg.model, pkg.variables
    final = loading.final_weights(wd)
    assert model == final.model
    want = jax.jit(lambda p: quant.quantize_weights(p, package.weight_config(8))[0])(
        final.variables["params"])
    chex.assert_trees_all_equal(variables["params"], jax.device_get(want))
    assert np.count_nonzero(np.asarray(variables["params"]["fc1"]["kernel"])) == 1920
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    chex.assert_trees_all_close(apply(variables, x), apply({"params": want}, x),
                                atol=1e-5, rtol=1e-5)
    # It takes what jaxaccel.load(wd).predict takes: raw uint8 test images, normalised inside,
    # and gives the run's predictions with the int8 weights.
    raw, _ = data.read_arrays(data.get_source("digits", "test"), np.arange(64))
    loaded = jaxaccel.load(wd)
    chex.assert_trees_all_close(pkg.predict(raw),
                                loaded.predict_fn({**loaded.variables, "params": want}, raw),
                                atol=1e-5, rtol=1e-5)
    assert pkg.spec == data.dataset_spec("digits") and pkg.step == 10
    assert cli.main(["compress", "report", str(out)]) == 0
    assert "| fc1 | dense | 64x300 | 19,200 | 1,920 | 90.00% | 8 |" in capsys.readouterr().out


@pytest.mark.parametrize("args,needles", [
    (["package", "{wd}", "--out", "{tmp}/x.npz", "--bits", "9"], ["bits", "9"]),
    (["report", "{wd}", "--bits", "12"], ["bits", "12"]),
    (["report", "{tmp}/nope"], ["nope"]),
    (["report", "{tmp}"], ["config.json"]),
    (["report", "{wd}", "--input-shape", "8,8"], ["--input-shape", "8,8"]),
    (["report", "{wd}", "--step", "3"], ["step=3", "10"]),
    (["report", "{wd}", "--config.seed=1"], ["--config.seed=1"]),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, args, needles, monkeypatch):
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    wd, _ = run
    argv = ["compress"] + [a.format(wd=wd, tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not (tmp_path / "x.npz").exists()
