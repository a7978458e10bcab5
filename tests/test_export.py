"""Tests for jaxaccel.compress.export: artifacts run in a fresh Python that has only jax/numpy."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxaccel.compress import export as ex
from jaxaccel.compress import int8 as i8
from jaxaccel.compress import quant as q
from jaxaccel.models import get_model, init_variables

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
    calib = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
    act = q.calibrate(model, variables, [calib])
    skip = ("conv1",)
    paths = {k: str(tmp_path / f"{k}.jaxexport") for k in ("float", "fake_quant", "int8")}
    ex.export_float(model, variables, (8, 8, 1), paths["float"])
    ex.export_fake_quant(model, variables, act, (8, 8, 1), paths["fake_quant"], skip=skip)
    ex.export_int8(model, i8.convert_int8(variables, act, skip=skip), (8, 8, 1), paths["int8"])
    # int8 kernels are stored as int8 constants (+ HLO text; the CPU default's im2col patches add
    # some, so the size check uses the native int8 conv, whose HLO is as short as the float one's)
    native = str(tmp_path / "int8_native.jaxexport")
    ex.export_int8(model, i8.convert_int8(variables, act, skip=skip), (8, 8, 1), native, conv_lowering="native")
    assert os.path.getsize(native) < 0.6 * os.path.getsize(paths["float"])
    with pytest.raises(ValueError, match="winograd"):
        ex.export_int8(model, i8.convert_int8(variables, act, skip=skip), (8, 8, 1), native,
                       conv_lowering="winograd")
    assert all(os.path.getsize(p) > 0 for p in paths.values())

    inputs = {"b5": np.asarray(jax.random.normal(jax.random.key(2), (5, 8, 8, 1))),
              "b16": np.asarray(calib)}  # two batch sizes: the batch dim is symbolic
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
        for name, x in inputs.items():
            np.testing.assert_allclose(got[f"{path}:{name}"], np.asarray(jax.jit(want[kind])(x)),
                                       rtol=1e-5, atol=1e-5, err_msg=f"{kind} {name}")
    assert not np.allclose(got[f"{paths['float']}:b16"], got[f"{paths['int8']}:b16"])


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
    x = np.asarray(jax.random.normal(jax.random.key(1), (64, 8, 8, 1)))
    act = q.calibrate(model, variables, [x])
    exp = ex.export_int8(model, i8.convert_int8(variables, act), (8, 8, 1), tmp_path / "i8", batch_size=64)
    got = ex.load_exported(tmp_path / "i8").call(x)
    qm = i8.convert_int8(variables, act)
    np.testing.assert_allclose(got, jax.jit(lambda m, x: i8.int8_apply(model, m, x))(qm, x), rtol=1e-5, atol=1e-5)
    assert exp.in_avals[0].shape == (64, 8, 8, 1)
    # the float model's "auto" runs conv2/conv3 in jaxaccel's Winograd CPU kernel in this process;
    # its export must not carry that process-local custom call (it exports as "winograd")
    fexp = ex.export_float(model, variables, (8, 8, 1), tmp_path / "f32", batch_size=64)
    assert "custom_call" not in fexp.mlir_module()
    np.testing.assert_allclose(ex.load_exported(tmp_path / "f32").call(x), model.apply(variables, x),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        ex.export_float(model, variables, (8, 8, 1), tmp_path / "f", batch_size=0)
