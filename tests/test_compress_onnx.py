"""jaxaccel.compress.onnx_export and `jaxaccel compress export --format onnx [--int8]`: the
written graphs run in a plain ONNX Runtime session (in a fresh Python that never imports jax or
jaxaccel, too), take raw uint8 NHWC images of any batch size and return the logits of
`predict` (float) or of jaxaccel's own int8 inference (int8 QDQ, up to rounding ties)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")  # a safety net only: the [test] extra installs it
onnx = pytest.importorskip("onnx")

import jaxaccel  # noqa: E402
from jaxaccel import cli, config as config_lib, data, loading, stages  # noqa: E402
from jaxaccel.compress import fold, quant as q  # noqa: E402
from jaxaccel.compress import int8 as i8  # noqa: E402
from jaxaccel.compress import onnx_export as ox  # noqa: E402
from jaxaccel.models import MODELS, get_model, init_variables  # noqa: E402
from jaxaccel.models.ensemble import Ensemble  # noqa: E402

DIGITS = data.dataset_spec("digits")  # (8, 8, 1)


def _session(path, optimize=True):
    """A plain ONNX Runtime CPU session (one thread: the test workers share the cores)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, images, optimize=True):
    return _session(path, optimize).run(None, {"images": images})[0]


def _split(name, n):
    images, labels = data.read_arrays(data.get_source("digits", name), np.arange(n))
    return images, labels


def _model(name):
    """A registry model at a quarter of its width on digits, initialised, with BatchNorm's
    statistics and affine parameters moved off 0 / 1 (so that normalisation and folding
    matter) and nonzero biases."""
    fields = {"padding": "SAME"} if name == "lenet5" else {}
    model = get_model(name, 10, width=0.25, **fields)
    variables = init_variables(model, jax.random.key(0), DIGITS.image_shape)
    rng = np.random.default_rng(1)

    def moved(path, a):
        a, leaf = np.asarray(a), jax.tree_util.keystr(path[-1:])
        if "var" in leaf or "scale" in leaf:
            return (a * rng.uniform(0.5, 1.5, a.shape)).astype(np.float32)
        return (a + rng.normal(0.0, 0.1, a.shape)).astype(np.float32) if a.ndim == 1 else a

    return model, jax.tree_util.tree_map_with_path(moved, variables)


def _assert_int8_close(got, want, *, agreement=0.995):
    """ONNX Runtime's int8 logits vs jaxaccel's int8 inference. A QDQ conv's bias is an int32
    in units of its accumulator's step (s_x * s_w, as int8 runtimes need it), while jaxaccel
    adds the float bias: the difference, below half an accumulator step, moves a value across a
    rounding boundary of the next layer's codes now and then (on digits, in a few percent of
    the images, one code by one). So each image's logits agree within 3% of their range and
    the top-1 classes in at least `agreement` of the images."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    span = np.maximum(np.ptp(want, axis=1), 1e-3)
    worst = np.max(np.abs(got - want).max(axis=1) / span)
    assert worst <= 0.03, f"logits differ by {worst:.3g} of their range"
    assert np.mean(got.argmax(1) == want.argmax(1)) >= agreement


def _graph_io(path):
    graph = onnx.load(str(path)).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return ((graph.input[0].name, graph.input[0].type.tensor_type.elem_type, dims(graph.input[0])),
            (graph.output[0].name, dims(graph.output[0])))


# --------------------------------------------------------------------------- every registry model
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registry_model_exports_float_and_int8(name, tmp_path):
    model, variables = _model(name)
    raw, _ = _split("test", 96)
    path = tmp_path / "float.onnx"
    info = ox.export_float(model, variables, DIGITS, path)
    assert info["num_classes"] == 10 and info["opset"] == ox.ONNX_OPSET
    assert _graph_io(path) == (("images", onnx.TensorProto.UINT8, ["batch", 8, 8, 1]),
                               ("logits", ["batch", 10]))
    want = np.asarray(loading.predict_function(model, DIGITS)(variables, raw))
    np.testing.assert_allclose(_run(path, raw), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_run(path, raw[:3]), want[:3], rtol=1e-4, atol=1e-5)  # another batch

    # int8: calibrated like the quantize stage (BN folded, uint8 affine activations)
    folded, fvars = fold.fold_bn(model, variables, input_shape=(1, 8, 8, 1))
    train, _ = _split("train", 256)
    act = q.calibrate(folded, fvars, [data.normalize(train, DIGITS)])
    qpath = tmp_path / "int8.onnx"
    qinfo = ox.export_int8(folded, fvars, act, DIGITS, qpath)
    assert qinfo["int8_layers"] == len(act)
    qm = i8.convert_int8(fvars, act)
    want8 = np.asarray(jax.jit(lambda m, x: i8.int8_apply(folded, m, x))(qm, data.normalize(raw, DIGITS)))
    _assert_int8_close(_run(qpath, raw), want8, agreement=0.97)
    ops = [n.op_type for n in onnx.load(str(qpath)).graph.node]
    assert ops.count("QuantizeLinear") >= len(act)  # every int8 layer's input, at least


def test_int8_graph_of_signed_activations_per_tensor_weights_and_int8_codes(tmp_path):
    """int8 (symmetric) activation codes, one weight scale per kernel, and the kernels stored as
    int8 (not uint8 + 128): the graph's own arithmetic (ONNX Runtime without its fused int8
    kernels, which saturate u8 x s8 products on CPUs without VNNI) is jaxaccel's int8."""
    model, variables = _model("cnn3")
    train, _ = _split("train", 128)
    raw, _ = _split("test", 64)
    act = q.calibrate(model, variables, [data.normalize(train, DIGITS)],
                      q.QuantConfig(symmetric=True, per_channel=False))
    w_cfg = q.QuantConfig(per_channel=False)
    path = tmp_path / "int8.onnx"
    ox.export_int8(model, variables, act, DIGITS, path, weight_config=w_cfg, weight_dtype="int8")
    types = {(i.name.rsplit("_", 1)[0], i.data_type) for i in onnx.load(str(path)).graph.initializer}
    assert {("w_int8", onnx.TensorProto.INT8), ("x_zero_point", onnx.TensorProto.INT8)} <= types
    assert not any(name in ("w_uint8", "w_zero_point") for name, _ in types)
    qm = i8.convert_int8(variables, act, weight_config=w_cfg)
    want = jax.jit(lambda m, x: i8.int8_apply(model, m, x))(qm, data.normalize(raw, DIGITS))
    _assert_int8_close(_run(path, raw, optimize=False), want)
    with pytest.raises(ValueError, match="weight_dtype 'int4'"):
        ox.export_int8(model, variables, act, DIGITS, path, weight_dtype="int4")


def test_ensembles_export_in_float(tmp_path):
    """Stacked members (vmapped in jaxaccel, one branch each in the graph), weighted; and
    members of different widths with a logistic stacker."""
    raw, _ = _split("test", 48)
    model = get_model("lenet5", 10, width=0.25, padding="SAME")
    members = [init_variables(model, jax.random.key(k), (8, 8, 1)) for k in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    other = get_model("cnn_bn", 10, width=0.25)
    mixed_vars = {"params": (members[0]["params"],
                             init_variables(other, jax.random.key(7), (8, 8, 1))["params"]),
                  "batch_stats": (members[0]["batch_stats"],
                                  init_variables(other, jax.random.key(7), (8, 8, 1))["batch_stats"])}
    rng = np.random.default_rng(2)
    logistic = (tuple(map(tuple, rng.normal(size=(20, 10)))), tuple(rng.normal(size=10)))
    cases = {"stacked": (Ensemble(model, (0.5, 0.2, 0.3)), stacked),
             "mixed": (Ensemble((model, other), logistic=logistic), mixed_vars)}
    with pytest.raises(ValueError, match="ensemble"):
        ox.export_int8(cases["stacked"][0], stacked, {}, DIGITS, tmp_path / "e.onnx")
    for name, (ensemble, variables) in cases.items():
        path = tmp_path / f"{name}.onnx"
        ox.export_float(ensemble, variables, DIGITS, path)
        want = loading.predict_function(ensemble, DIGITS)(variables, raw)
        np.testing.assert_allclose(_run(path, raw), want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert sorted(os.listdir(tmp_path)) == ["mixed.onnx", "stacked.onnx"]


def test_to_onnx_lowers_what_jnp_code_traces_to_under_a_symbolic_batch(tmp_path):
    """Indexing (a gather under a symbolic batch), squeeze, transpose, pad, reductions, where,
    clip, powers, argmax, log_softmax, round: each lowered op equals jax on two batch sizes."""
    def fn(x):
        f = x.astype(jnp.float32)
        return jnp.concatenate([
            jnp.squeeze(f[:, :1, :, :1] / 255.0, axis=(1, 3)),
            jnp.pad(jnp.transpose(f, (0, 2, 1, 3)).reshape(x.shape[0], -1)[:, 2:6], ((0, 0), (1, 2))),
            jnp.where(x[:, 0, :, 0] > 100, jnp.exp(-f[:, 0, :, 0] / 100.0), jnp.sqrt(f[:, 1, :, 0])),
            jnp.clip(f[:, 2, :, 0], 20.0, 200.0) ** 2,
            jnp.tanh(jnp.max(f, axis=(1, 2)) / 300.0) + jnp.min(f, axis=1).reshape(x.shape[0], -1)[:, :1],
            jax.nn.sigmoid(jnp.mean(f, axis=(1, 2, 3)))[:, None],
            jnp.argmax(x[:, 3, :, 0], axis=1)[:, None].astype(jnp.float32),
            jax.nn.log_softmax(f[:, 4, :, 0] / 50.0),
            jnp.round(f[:, 5, :, 0] / 7.0)], axis=1)

    path = tmp_path / "ops.onnx"
    ox.save_model(ox.to_onnx(fn, (8, 8, 1)), path)
    for n in (5, 2):
        x = np.random.default_rng(n).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
        np.testing.assert_allclose(_run(path, x), fn(x), rtol=1e-5, atol=1e-5)


def test_a_layer_onnx_cannot_express_is_named_and_nothing_is_written(tmp_path):
    model = get_model("cnn3", 10, width=0.25, dtype="bfloat16")
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    with pytest.raises(ox.OnnxExportError, match="bfloat16 arithmetic .* in layer 'CNN3'"):
        ox.export_float(model, variables, DIGITS, tmp_path / "m.onnx")
    with pytest.raises(ox.OnnxExportError, match="only the batch size may vary"):
        ox.to_onnx(lambda x: x.reshape(-1), (8, 8, 1))  # the flattened batch
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    """cnn_bn (BN) at half width on digits, 60 steps, then a one-shot 50% prune and the
    quantize stage (PTQ; it writes calibration.json): a trained, pruned, calibrated run."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "cnn_bn"
    c.model.width = 0.5
    c.batch_size = 64
    c.eval_batch_size = 120
    c.optimizer.name = "adam"
    c.optimizer.lr = 3e-3
    c.log_every = 60
    c.checkpoint_every = 60
    c.progress = False
    c.parallel.num_devices = 1
    c.stages = (stages.stage("train", "train", steps=60),
                stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.5}),
                stages.stage("quantize", "quantize", quant={"mode": "ptq"}))
    wd = str(tmp_path_factory.mktemp("onnx_run"))
    results = jaxaccel.train(c, wd)
    raw, labels = _split("test", len(data.get_source("digits", "test")))
    return dict(wd=wd, results=results, raw=raw, labels=labels)


# python -c PLAIN_ORT inputs.npz outputs.npz model.onnx...: only onnxruntime and numpy.
PLAIN_ORT = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort
    inputs = np.load(sys.argv[1])
    out = {}
    for k, path in enumerate(sys.argv[3:]):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for name in inputs.files:
            out[f"{k}:{name}"] = session.run(None, {"images": inputs[name]})[0]
    assert not any(m.split(".")[0] in ("jax", "jaxaccel") for m in sys.modules), "jax was imported"
    np.savez(sys.argv[2], **out)
""")


def _export(wd, out, capsys, *flags):
    assert cli.main(["compress", "export", wd, "--format", "onnx", "--out", str(out), *flags]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "as ONNX (opset 17)" in line, line
    assert "'images' uint8 (batch, 8, 8, 1)" in line and "(batch, 10) logits" in line, line
    return line


def test_trained_pruned_run_exports_onnx_that_plain_onnxruntime_runs(onnx_run, tmp_path, capsys):
    wd, raw, labels = onnx_run["wd"], onnx_run["raw"], onnx_run["labels"]
    paths = [tmp_path / "float.onnx", tmp_path / "int8.onnx"]
    _export(wd, paths[0], capsys)
    _export(wd, paths[1], capsys, "--int8")
    assert sorted(os.listdir(tmp_path)) == ["float.onnx", "int8.onnx"]
    inputs = {"all": raw, "b5": raw[:5]}  # two batch sizes through one file
    np.savez(tmp_path / "in.npz", **inputs)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", PLAIN_ORT, str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz"), *map(str, paths)], check=True, env=env, timeout=120)
    got = np.load(tmp_path / "out.npz")

    # float: predict of the run's final weights (the prune stage applied again, 50% zeros)
    run = loading.final_weights(wd)
    want = np.asarray(loading.predict_function(run.model, run.spec)(run.variables, raw))
    np.testing.assert_allclose(got["0:all"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["0:b5"], want[:5], rtol=1e-4, atol=1e-4)
    graph = onnx.load(str(paths[0])).graph
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    kernels = [onnx.numpy_helper.to_array(w) for w in graph.initializer if w.name in conv_weights]
    assert len(kernels) == 2 and all(0.4 < np.mean(k == 0) < 0.6 for k in kernels)

    # int8: jaxaccel's own int8 inference of the BN-folded weights with the run's calibration
    act, w_cfg, _ = q.load_calibration(os.path.join(wd, "calibration.json"))
    model, variables = fold.fold_bn(run.model, run.variables, input_shape=(1, 8, 8, 1))
    qm = i8.convert_int8(variables, act, weight_config=w_cfg)
    want8 = np.asarray(jax.jit(lambda m, x: i8.int8_apply(model, m, x))(qm, data.normalize(raw, DIGITS)))
    ort8 = got["1:all"]
    _assert_int8_close(ort8, want8)
    _assert_int8_close(got["1:b5"], want8[:5], agreement=1.0)
    agreement = np.mean(ort8.argmax(1) == want8.argmax(1))
    acc_ort, acc_jax = np.mean(ort8.argmax(1) == labels), np.mean(want8.argmax(1) == labels)
    reported = onnx_run["results"]["stages"][-1]["int8_test_accuracy"]  # the quantize stage's
    assert len(raw) == 360 and acc_jax > 0.7, acc_jax
    assert agreement >= 0.995 and abs(acc_ort - acc_jax) <= 0.001 and abs(acc_ort - reported) <= 0.001, \
        (agreement, acc_ort, acc_jax, reported)
    # --onnx-weights int8: kernel codes stored as int8 (ONNX Runtime's usual format, for VNNI)
    _export(wd, tmp_path / "int8w.onnx", capsys, "--int8", "--onnx-weights", "int8")
    stored = {i.name.rsplit("_", 1)[0]: i.data_type
              for i in onnx.load(str(tmp_path / "int8w.onnx")).graph.initializer}
    assert stored.get("w_int8") == onnx.TensorProto.INT8 and "w_uint8" not in stored, stored


@pytest.mark.parametrize("case", ["format", "fake_quant", "missing_dir", "no_calibration",
                                  "bfloat16", "onnx_weights", "onnx_weights_float"])
def test_bad_onnx_export_input_is_one_line_and_exit_2(case, onnx_run, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    wd, out = onnx_run["wd"], tmp_path / "out" / "m.onnx"
    out.parent.mkdir()

    def copy(config_change=None):
        dest = tmp_path / "w"
        shutil.copytree(wd, dest, ignore=shutil.ignore_patterns("calibration.json"))
        if config_change:
            record = json.loads((dest / "config.json").read_text())
            record["model"].update(config_change)
            (dest / "config.json").write_text(json.dumps(record))
        return str(dest)

    cases = {
        "format": lambda: ([wd, "--out", str(out), "--format", "tflite"],
                           ["--format 'tflite'", "stablehlo, onnx"]),
        "fake_quant": lambda: ([wd, "--out", str(out), "--format", "onnx", "--fake-quant"],
                               ["--fake-quant", "StableHLO only"]),
        "missing_dir": lambda: ([wd, "--out", str(tmp_path / "nope" / "m.onnx"), "--format", "onnx"],
                                ["nope", "does not exist"]),
        "no_calibration": lambda: ([copy(), "--out", str(out), "--format", "onnx", "--int8"],
                                   ["calibration.json", 'stage("quantize", "quantize"']),
        "bfloat16": lambda: ([copy({"dtype": "bfloat16"}), "--out", str(out), "--format", "onnx"],
                             ["cannot express bfloat16", "layer 'CNNBN"]),
        "onnx_weights": lambda: ([wd, "--out", str(out), "--format", "onnx", "--int8",
                                  "--onnx-weights", "int4"], ["--onnx-weights 'int4'", "uint8, int8"]),
        "onnx_weights_float": lambda: ([wd, "--out", str(out), "--format", "onnx",
                                        "--onnx-weights", "int8"], ["--format onnx --int8"]),
    }
    args, needles = cases[case]()
    assert cli.main(["compress", "export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert os.listdir(out.parent) == [] and not (tmp_path / "nope").exists()
