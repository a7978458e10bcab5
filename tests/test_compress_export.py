"""jaxaccel.compress.export: StableHLO artifacts take raw uint8 images (normalisation inside)
and run in a fresh Python that has only jax/numpy; symbolic or fixed batch; never a
process-local CPU kernel."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from export_helpers import LOADER, foreign_calls, raw_images
from jaxaccel import data
from jaxaccel.compress import export as ex
from jaxaccel.compress import int8 as i8
from jaxaccel.compress import quant as q
from jaxaccel.models import get_model, init_variables
from ties import assert_equal_up_to_ties

DIGITS = data.dataset_spec("digits")  # (8, 8, 1), mean 0.305, std 0.376


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
    calib = raw_images(1, 16)
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
    inputs = {"b5": raw_images(2, 5), "b16": calib}
    in_file, out_file = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(in_file, **inputs)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run([sys.executable, "-c", LOADER, str(in_file), str(out_file), *paths.values()],
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
    raw = raw_images(1, 64)
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
    np.testing.assert_allclose(ex.load_exported(tmp_path / "f32").call(raw),
                               jax.jit(model.apply)(variables, x), rtol=1e-4, atol=1e-4)
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
    assert not foreign_calls(exp)
    apply = jax.jit(model.apply)  # one compile per batch size, not one per op
    for n in (1, 7, 96):
        raw = raw_images(n, n)
        np.testing.assert_allclose(exp.call(raw), apply(variables, data.normalize(raw, DIGITS)),
                                   rtol=1e-4, atol=1e-4, err_msg=f"batch {n}")
