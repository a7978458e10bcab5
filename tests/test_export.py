"""Tests for jaxaccel.compress.export and `jaxaccel compress export`: artifacts take raw uint8
images (normalisation inside) and run in a fresh Python that has only jax/numpy."""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxaccel
from jaxaccel.compress import sections
from jaxaccel import cli, config as config_lib, data, stages
from jaxaccel.compress import export as ex
from jaxaccel.compress import fold
from jaxaccel.compress import int8 as i8
from jaxaccel.compress import quant as q
from jaxaccel.models import get_model, init_variables
from ties import assert_equal_up_to_ties

DIGITS = data.dataset_spec("digits")  # (8, 8, 1), mean 0.305, std 0.376


def _foreign_calls(exp) -> set[str]:
    """Custom-call targets of an artifact other than jax.export's own shape checks: the
    process-local CPU kernels must never be among them."""
    return set(re.findall(r"custom_call @(\w+)", exp.mlir_module())) - {"shape_assertion"}


def _raw(key: int, n: int, shape=(8, 8, 1)) -> np.ndarray:
    """Random raw pixels, uint8 as a dataset gives them."""
    return np.asarray(jax.random.randint(jax.random.key(key), (n,) + shape, 0, 256), np.uint8)

_LOADER = textwrap.dedent("""
    import sys
    import numpy as np
    from jax import export
    inputs = np.load(sys.argv[1])
    out = {}
    for path in sys.argv[3:]:
        with open(path, "rb") as f:
            exp = export.deserialize(bytearray(f.read()))
        for name in inputs.files:
            out[f"{path}:{name}"] = np.asarray(exp.call(inputs[name]))
    assert not any(m.startswith("jaxaccel") for m in sys.modules), "jaxaccel was imported"
    np.savez(sys.argv[2], **out)
""")


def test_exported_artifacts_run_in_fresh_process(tmp_path):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    # plain flax lowering: the CPU lowering's micro-batching branches on the batch size, which a
    # symbolic batch dim cannot answer (see test_fixed_batch_export_of_default_model)
    model = get_model("cnn3", 10, features=(8, 16, 32), hidden=32, conv_impl="xla")
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    # fsdp-like sharding of the last kernel dim: export gathers to the host
    variables = jax.device_put(variables, jax.tree.map(
        lambda a: NamedSharding(mesh, P(*([None] * (a.ndim - 1)), "d") if a.ndim >= 2 and a.shape[-1] % 8 == 0
                                else P()), variables))
    calib = _raw(1, 16)
    act = q.calibrate(model, variables, [data.normalize(calib, DIGITS)])
    skip = ("conv1",)
    paths = {k: str(tmp_path / f"{k}.jaxexport") for k in ("float", "fake_quant", "int8")}
    ex.export_float(model, variables, DIGITS, paths["float"])
    ex.export_fake_quant(model, variables, act, DIGITS, paths["fake_quant"], skip=skip)
    ex.export_int8(model, i8.convert_int8(variables, act, skip=skip), DIGITS, paths["int8"])
    # int8 kernels are stored as int8 constants (+ HLO text; the CPU default's im2col patches add
    # some, so the size check uses the native int8 conv, whose HLO is as short as the float one's)
    native = str(tmp_path / "int8_native.jaxexport")
    ex.export_int8(model, i8.convert_int8(variables, act, skip=skip), DIGITS, native, conv_lowering="native")
    assert os.path.getsize(native) < 0.6 * os.path.getsize(paths["float"])
    with pytest.raises(ValueError, match="winograd"):
        ex.export_int8(model, i8.convert_int8(variables, act, skip=skip), DIGITS, native,
                       conv_lowering="winograd")
    assert all(os.path.getsize(p) > 0 for p in paths.values())

    # raw uint8 pixels, two batch sizes (the batch dim is symbolic)
    inputs = {"b5": _raw(2, 5), "b16": calib}
    in_file, out_file = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(in_file, **inputs)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run([sys.executable, "-c", _LOADER, str(in_file), str(out_file), *paths.values()],
                   check=True, env=env, cwd=tmp_path, timeout=120)
    got = np.load(out_file)

    qm = i8.convert_int8(variables, act, skip=skip)
    want = {
        "float": lambda x: model.apply(variables, x, train=False),
        "fake_quant": lambda x: q.apply_fake_quant(model, variables, x, act, skip=skip),
        "int8": lambda x: i8.int8_apply(model, qm, x),
    }
    for kind, path in paths.items():
        assert ex.load_exported(path).in_avals[0].dtype == jnp.uint8
        for name, x in inputs.items():
            normalised = data.normalize(x, DIGITS)  # the artifact normalises inside
            reference = np.asarray(jax.jit(want[kind])(normalised))
            if kind == "float":
                np.testing.assert_allclose(got[f"{path}:{name}"], reference, rtol=1e-5,
                                           atol=1e-5, err_msg=f"{kind} {name}")
            else:  # another lowering of the quantized network: a tie may flip one code
                assert_equal_up_to_ties(got[f"{path}:{name}"], reference)
    assert not np.allclose(got[f"{paths['float']}:b16"], got[f"{paths['int8']}:b16"])
    raw_as_float = np.asarray(jax.jit(want["float"])(calib.astype(np.float32)))
    assert not np.allclose(got[f"{paths['float']}:b16"], raw_as_float, atol=1e-2)


def test_load_exported_and_bad_shape(tmp_path):
    path = tmp_path / "f.jaxexport"
    ex.export_inference(lambda x: jnp.sum(x, axis=(1, 2)), (4, 4, 2), path)
    exp = ex.load_exported(path)
    np.testing.assert_allclose(exp.call(np.ones((3, 4, 4, 2), np.float32)), np.full((3, 2), 16.0))
    with pytest.raises(ValueError, match="input_shape"):
        ex.export_inference(lambda x: x, (0, 4), path)


def test_fixed_batch_export_of_default_model(tmp_path):
    model = get_model("cnn3", 10, features=(8, 16, 32), hidden=32)
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    raw = _raw(1, 64)
    x = data.normalize(raw, DIGITS)
    act = q.calibrate(model, variables, [x])
    exp = ex.export_int8(model, i8.convert_int8(variables, act), DIGITS, tmp_path / "i8", batch_size=64)
    got = ex.load_exported(tmp_path / "i8").call(raw)
    qm = i8.convert_int8(variables, act)
    # the artifact's portable im2col vs this process's "auto" (the CPU kernel): ties may flip
    assert_equal_up_to_ties(got, jax.jit(lambda m, x: i8.int8_apply(model, m, x))(qm, x))
    assert exp.in_avals[0].shape == (64, 8, 8, 1) and exp.in_avals[0].dtype == jnp.uint8
    # the float model's "auto" runs conv2/conv3 in jaxaccel's Winograd CPU kernel in this process;
    # its export must not carry that process-local custom call (it exports as "winograd")
    fexp = ex.export_float(model, variables, DIGITS, tmp_path / "f32", batch_size=64)
    assert "custom_call" not in fexp.mlir_module()
    np.testing.assert_allclose(ex.load_exported(tmp_path / "f32").call(raw), model.apply(variables, x),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        ex.export_float(model, variables, DIGITS, tmp_path / "f", batch_size=0)
    with pytest.raises(ValueError, match="DatasetSpec"):
        ex.export_float(model, variables, (8, 8, 1), tmp_path / "f")
    assert sorted(os.listdir(tmp_path)) == ["f32", "i8"]  # nothing half-written


def test_symbolic_batch_export_of_micro_batching_model(tmp_path):
    """A model that runs its conv stack in micro-batches on CPU (count from the batch size)
    still exports with a symbolic batch: any batch size, raw pixels in."""
    model = get_model("cnn3", 10, features=(8, 16, 32), hidden=32, conv_impl="winograd")
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    exp = ex.export_float(model, variables, DIGITS, tmp_path / "f32")
    assert not _foreign_calls(exp)
    for n in (1, 7, 96):
        raw = _raw(n, n)
        np.testing.assert_allclose(exp.call(raw), model.apply(variables, data.normalize(raw, DIGITS)),
                                   rtol=1e-4, atol=1e-4, err_msg=f"batch {n}")


# --------------------------------------------------------------------------- calibration files


def test_calibration_file_round_trips_exactly(tmp_path):
    model = get_model("cnn3", 10, features=(8, 16, 32), hidden=32, conv_impl="xla")
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    x = data.normalize(_raw(1, 32), DIGITS)
    w_cfg = q.QuantConfig(bits=4, symmetric=True, per_channel=True, narrow_range=True)
    act = q.calibrate(model, variables, [x], q.QuantConfig(symmetric=False, per_channel=False,
                                                          observer="percentile", percentile=99.5))
    act["fc2"] = q.calibrate(model, variables, [x], q.QuantConfig(per_channel=True))["fc2"]  # 1-D
    path = tmp_path / "calibration.json"
    q.save_calibration(path, act, w_cfg, meta={"step": 7, "stage": "quantize"})
    got, got_cfg, meta = q.load_calibration(path)
    assert got_cfg == w_cfg and meta == {"step": 7, "stage": "quantize"}
    chex.assert_trees_all_equal(got, act)  # float32 scales bit for bit, static ranges and axes
    assert got["fc2"].axis == act["fc2"].axis == -1 and got["fc2"].scale.shape == (32,)
    assert got["conv1"].scale.dtype == jnp.float32 and got["conv1"].zero_point.dtype == jnp.int32


def test_bad_calibration_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        q.load_calibration(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    for text, needle in [("{not json", "not a jaxaccel calibration"),
                         ('{"format": "other"}', "other"),
                         ('{"format": "jaxaccel-calibration", "version": 9}', "version 9"),
                         ('{"format": "jaxaccel-calibration", "version": 1, "weight_config": {"bits": 9},'
                          ' "activations": {}}', "bits"),
                         ('{"format": "jaxaccel-calibration", "version": 1, "weight_config": {},'
                          ' "activations": {"c": {"scale": -1.0, "zero_point": 0, "qmin": -128,'
                          ' "qmax": 127, "axis": null}}}', "'c'")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=needle) as e:
            q.load_calibration(bad)
        assert "bad.json" in str(e.value)
    nan = {"c": q.QParams(scale=jnp.float32(np.nan), zero_point=jnp.int32(0), qmin=-128, qmax=127)}
    with pytest.raises(ValueError, match="'c'.*finite"):
        q.save_calibration(tmp_path / "nan.json", nan, q.WEIGHT_CONFIG)
    assert not (tmp_path / "nan.json").exists()


# --------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (cnn3 width 0.25 on 8x8 digits, 40 steps) with the calibration file
    its quantize stage would write: BN folded, activations calibrated on normalised train
    images with the stage's default PTQ configs."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "cnn3"
    c.model.width = 0.25
    c.batch_size = 64
    c.eval_batch_size = 120
    c.log_every = 20
    c.checkpoint_every = 40
    c.progress = False
    c.parallel.num_devices = 1
    c.stages = (stages.stage("train", "train", steps=40),)
    wd = str(tmp_path_factory.mktemp("export_run"))
    jaxaccel.train(c, wd)
    loaded = jaxaccel.load(wd)
    train_images, _ = data.read_arrays(data.get_source("digits", "train"), np.arange(256))
    raw, labels = data.read_arrays(data.get_source("digits", "test"), np.arange(360))
    model, variables = fold.fold_bn(loaded.model, loaded.variables, input_shape=(1, 8, 8, 1))
    w_cfg, a_cfg = sections.ptq_configs(stages.stage("q", "quantize", quant={"mode": "ptq"}).quant)
    act = q.calibrate(model, variables, [data.normalize(train_images, DIGITS)], a_cfg)
    q.save_calibration(os.path.join(wd, "calibration.json"), act, w_cfg,
                       meta={"step": int(loaded.step), "stage": "quantize"})
    return dict(wd=wd, loaded=loaded, raw=raw, labels=labels, model=model, variables=variables,
                act=act, w_cfg=w_cfg)


def _export(run, tmp_path, capsys, *flags):
    out = tmp_path / "model.stablehlo"
    assert cli.main(["compress", "export", run["wd"], "--out", str(out), *flags]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "uint8 (b, 8, 8, 1)" in line
    assert f"{out.stat().st_size:,} bytes" in line
    exp = ex.load_exported(out)
    assert exp.in_avals[0].dtype == jnp.uint8 and exp.in_avals[0].shape[1:] == (8, 8, 1)
    assert not isinstance(exp.in_avals[0].shape[0], int)  # symbolic batch
    assert not _foreign_calls(exp)  # no process-local CPU kernels
    assert os.listdir(tmp_path) == ["model.stablehlo"]
    return out, exp


def test_float_export_of_a_run_equals_predict(run, tmp_path, capsys):
    out, exp = _export(run, tmp_path, capsys)
    raw = run["raw"]
    np.testing.assert_allclose(exp.call(raw), run["loaded"].predict(raw), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exp.call(raw[:3]), run["loaded"].predict(raw[:3]), rtol=1e-5, atol=1e-5)


def test_fake_quant_export_equals_in_process_ptq(run, tmp_path, capsys):
    out, exp = _export(run, tmp_path, capsys, "--fake-quant")
    raw = run["raw"]
    want = jax.jit(lambda v, x: q.apply_fake_quant(run["model"], v, x, run["act"],
                                                   weight_config=run["w_cfg"]))(
        run["variables"], data.normalize(raw, DIGITS))
    assert_equal_up_to_ties(exp.call(raw), want)
    # quantization changed the function: the float logits differ
    assert not np.allclose(exp.call(raw), run["loaded"].predict(raw), atol=1e-4)


def test_int8_export_equals_in_process_int8(run, tmp_path, capsys):
    out, exp = _export(run, tmp_path, capsys, "--int8")
    raw = run["raw"]
    qm = i8.convert_int8(run["variables"], run["act"], weight_config=run["w_cfg"])
    want = jax.jit(lambda m, x: i8.int8_apply(run["model"], m, x))(qm, data.normalize(raw, DIGITS))
    assert_equal_up_to_ties(exp.call(raw), want)
    # and in a fresh Python that never imports jaxaccel, raw uint8 in
    in_file, out_file = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(in_file, raw=raw)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run([sys.executable, "-c", _LOADER, str(in_file), str(out_file), str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=120)
    assert_equal_up_to_ties(np.load(out_file)[f"{out}:raw"], want)


def _copy_run(run, dest, calibration=None):
    """The run's workdir copied to `dest`, with `calibration` (None: no calibration.json)."""
    shutil.copytree(run["wd"], dest, ignore=shutil.ignore_patterns("calibration.json"))
    if calibration is not None:
        act, w_cfg, meta = calibration
        q.save_calibration(os.path.join(dest, "calibration.json"), act, w_cfg, meta=meta)
    return str(dest)


@pytest.mark.parametrize("case", ["both", "out_dir", "missing_dir", "no_calibration_int8",
                                  "no_calibration_fq", "other_step", "4bit_int8", "no_workdir",
                                  "bad_step"])
def test_bad_export_input_is_one_line_and_exit_2(case, run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    wd, out = run["wd"], str(tmp_path / "out" / "m.stablehlo")
    (tmp_path / "out").mkdir()
    act, w_cfg = run["act"], run["w_cfg"]
    cases = {  # lazily: some copy the workdir
        "both": lambda: ([wd, "--out", out, "--int8", "--fake-quant"], ["--int8", "--fake-quant"]),
        "out_dir": lambda: ([wd, "--out", str(tmp_path / "out")], ["is a directory"]),
        "missing_dir": lambda: ([wd, "--out", str(tmp_path / "nope" / "m.stablehlo")],
                                ["nope", "does not exist"]),
        "no_calibration_int8": lambda: (
            [_copy_run(run, tmp_path / "w"), "--out", out, "--int8"],
            ["calibration.json", 'stage("quantize", "quantize", quant={"mode": "ptq"})']),
        "no_calibration_fq": lambda: ([_copy_run(run, tmp_path / "w"), "--out", out, "--fake-quant"],
                                      ["--fake-quant", "calibration.json", "quantize"]),
        "other_step": lambda: (
            [_copy_run(run, tmp_path / "w", (act, w_cfg, {"step": 3})), "--out", out, "--int8"],
            ["step 3", "step 40"]),
        "4bit_int8": lambda: (
            [_copy_run(run, tmp_path / "w", (act, dataclasses.replace(w_cfg, bits=4), {})),
             "--out", out, "--int8"], ["8-bit", "--fake-quant"]),
        "no_workdir": lambda: ([str(tmp_path / "missing"), "--out", out], ["missing"]),
        "bad_step": lambda: ([wd, "--out", out, "--step", "3"], ["step=3"]),
    }
    args, needles = cases[case]()
    assert cli.main(["compress", "export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert os.listdir(tmp_path / "out") == []  # nothing written, not even a temporary file
    assert not (tmp_path / "nope").exists()
