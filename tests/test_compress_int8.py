"""Tests for jaxaccel.compress.int8: integer inference equals the fake-quant simulation;
which conv lowering runs (the CPU kernel where it can, never in an exported program)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxaccel.compress import int8 as i8
from jaxaccel.compress import quant as q
from jaxaccel.compress.fold import fold_bn
from jaxaccel.kernels import int8 as int8_cpu
from jaxaccel.models import get_model, init_variables
from jaxaccel.models.conv_impls import conv
from ties import assert_equal_up_to_ties


def _digits():
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    d = load_digits()
    x = (d.images[..., None] / 16.0).astype(np.float32)
    return x[:1200], d.target[:1200], x[1200:], d.target[1200:]


@pytest.fixture(scope="module")
def trained():
    """cnn3 (narrow) trained ~100 Adam steps on 8x8 digits, with calibrated activations."""
    xtr, ytr, xte, yte = _digits()
    model = get_model("cnn3", 10, features=(16, 32, 64), hidden=64)
    params = init_variables(model, jax.random.key(0), (8, 8, 1))["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
        g = jax.grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    rng = np.random.default_rng(0)
    for _ in range(100):
        idx = rng.integers(0, len(xtr), 64)
        params, opt = step(params, opt, xtr[idx], ytr[idx])
    variables = {"params": params}
    act = q.calibrate(model, variables, [xtr[:256], xtr[256:512]], q.ACT_CONFIG)
    return model, variables, act, jnp.asarray(xte), np.asarray(yte)


def _acc(logits, y):
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y)) * 100


@pytest.mark.parametrize("skip", [(), ("conv1",)])
def test_int8_matches_fake_quant_on_trained_model(trained, skip):
    model, variables, act, x, y = trained
    fq = jax.jit(lambda v, x: q.apply_fake_quant(model, v, x, act, skip=skip))(variables, x)
    qm = i8.convert_int8(variables, act, skip=skip)
    out = jax.jit(lambda m, x: i8.int8_apply(model, m, x))(qm, x)
    assert _acc(fq, y) > 80  # the model did learn
    assert abs(_acc(out, y) - _acc(fq, y)) <= 0.1
    # logits: equal up to float summation order (rare one-code flips at rounding ties)
    diff = np.abs(np.asarray(out) - np.asarray(fq))
    scale = float(np.mean(np.abs(np.asarray(fq))))
    assert float(np.mean(diff)) < 1e-3 * scale
    assert float(np.quantile(diff, 0.99)) < 1e-4 * scale + 1e-5
    if skip:
        ref = jax.jit(model.apply)(variables, x)
        assert float(np.mean(np.abs(np.asarray(fq) - np.asarray(ref)))) > 20 * float(np.mean(diff))
    else:
        # fused hand-offs (plain flax layers: int8 codes through ReLU / max-pool): same numbers
        plain = model.clone(conv_impl="xla")
        fused = jax.jit(lambda m, x: i8.int8_apply(plain, m, x, fuse=True))(qm, x)
        assert_equal_up_to_ties(fused, out)  # fused XLA vs kernel: a tie may flip one code


def test_int8_kernels_are_int8_and_float_copy_dropped(trained):
    model, variables, act, x, _ = trained
    qm = i8.convert_int8(variables, act, skip=("conv1",))
    assert sorted(qm.layers) == ["conv2", "conv3", "fc1", "fc2"]
    for layer in qm.layers.values():
        assert layer.kernel.dtype == jnp.int8
        assert int(jnp.max(jnp.abs(layer.kernel.astype(jnp.int32)))) >= 100  # the int8 range is used
    assert set(qm.variables["params"]) == {"conv1"}  # only the float layer keeps float weights
    float_bytes = sum(a.nbytes for a in jax.tree.leaves(variables))
    assert i8.int8_size_bytes(qm) < 0.35 * float_bytes


class _Single(nn.Module):
    """One conv (SAME, stride 2), one depthwise conv (the models' conv module, SAME) or one
    dense layer: no cascading rounding, so equality is tight."""
    kind: str

    @nn.compact
    def __call__(self, x, train=False):
        if self.kind == "conv":
            return nn.Conv(6, (3, 3), strides=2, padding="SAME", name="layer")(x)
        if self.kind == "depthwise":
            c = x.shape[-1]
            return conv(c, 3, padding="SAME", feature_group_count=c, conv_impl="cpu", name="layer")(x)
        return nn.Dense(6, name="layer")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("kind,act_config", [
    ("conv", q.ACT_CONFIG),                                                      # int8 affine
    ("conv", q.QuantConfig(per_channel=False, symmetric=False, signed=False)),   # uint8 affine
    ("depthwise", q.ACT_CONFIG),                                                 # zero-point padding
    ("depthwise", q.QuantConfig(per_channel=False)),                             # int8 symmetric
    ("dense", q.QuantConfig(per_channel=False)),                                 # int8 symmetric
    ("dense", q.QuantConfig(bits=4, per_channel=False, symmetric=False)),        # 4-bit affine
])
def test_single_layer_exact(kind, act_config):
    model = _Single(kind)
    x = jax.random.normal(jax.random.key(1), (4, 7, 7, 3)) + 0.7  # affine zero point != 0
    variables = jax.jit(model.init)(jax.random.key(0), x)
    act = q.calibrate(model, variables, [x], act_config)
    fq = jax.jit(lambda v, x: q.apply_fake_quant(model, v, x, act))(variables, x)
    out = jax.jit(lambda m, x: i8.int8_apply(model, m, x))(i8.convert_int8(variables, act), x)
    np.testing.assert_allclose(out, fq, rtol=1e-5, atol=1e-5)


def test_pruned_zeros_stay_zero_in_int8(trained):
    model, variables, act, x, _ = trained
    params = jax.tree.map(lambda w: jnp.where(jnp.abs(w) < jnp.quantile(jnp.abs(w), 0.7), 0.0, w)
                          if w.ndim >= 2 else w, variables["params"])
    qm = i8.convert_int8({"params": params}, act)
    for name, layer in qm.layers.items():
        zero = np.asarray(params[name]["kernel"]) == 0
        assert np.all(np.asarray(layer.kernel)[zero] == 0)
        assert np.mean(np.asarray(layer.kernel) == 0) >= 0.69


@pytest.mark.parametrize("name", ["cnn_bn", "dscnn_bn", pytest.param("resnet20", marks=pytest.mark.slow)])
def test_int8_on_folded_bn_model(name):
    model = get_model(name, 10, width=0.25)
    variables = init_variables(model, jax.random.key(0), (8, 8, 3))
    fmodel, fvars = fold_bn(model, variables, input_shape=(1, 8, 8, 3))
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
    act = q.calibrate(fmodel, fvars, [x])
    assert len(act) == {"cnn_bn": 3, "dscnn_bn": 6, "resnet20": 22}[name]
    fq = jax.jit(lambda v, x: q.apply_fake_quant(fmodel, v, x, act))(fvars, x)
    out = jax.jit(lambda m, x: i8.int8_apply(fmodel, m, x))(i8.convert_int8(fvars, act), x)
    assert float(jnp.mean(jnp.abs(out - fq))) < 1e-3 * float(jnp.mean(jnp.abs(fq)))


def test_convert_rejects_unsupported(trained):
    model, variables, act, _, _ = trained
    with pytest.raises(ValueError, match="symmetric"):
        i8.convert_int8(variables, act, weight_config=q.QuantConfig(symmetric=False))
    pc = {k: q.QParams(jnp.ones(3), jnp.zeros(3, jnp.int32), -128, 127, -1) for k in act}
    with pytest.raises(ValueError, match="per-tensor"):
        i8.convert_int8(variables, pc)
    with pytest.raises(ValueError, match="fc1"):
        i8.convert_int8(variables, {k: v for k, v in act.items() if k != "fc1"})


@pytest.mark.parametrize("fsdp", [False, True])
def test_int8_sharded_params(trained, fsdp):
    model, variables, act, x, _ = trained
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def spec(a):
        if fsdp and a.ndim >= 2 and a.shape[-1] % 8 == 0:
            return NamedSharding(mesh, P(*([None] * (a.ndim - 1)), "d"))
        return NamedSharding(mesh, P())

    sharded = jax.device_put(variables, jax.tree.map(spec, variables))
    run = jax.jit(lambda m, x: i8.int8_apply(model, m, x))
    want = run(i8.convert_int8(variables, act), x[:16])
    qm = i8.convert_int8(sharded, act)
    if fsdp:
        assert qm.layers["conv3"].kernel.sharding.spec[-1] == "d"
    got = run(qm, x[:16])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fusion_plan_follows_dataflow(trained):
    model, variables, act, x, _ = trained
    qm = i8.convert_int8(variables, act, skip=("conv1",))
    # plain flax layers: ReLU / max-pool / flatten between all layers, every hand-off fuses
    plain = model.clone(conv_impl="xla")
    assert i8.fusion_plan(plain, qm, x[:2]) == {"conv2": "conv3", "conv3": "fc1", "fc1": "fc2"}  # conv1 is float
    res = get_model("resnet20", 10, width=0.25, use_bn=False)
    rx = jnp.ones((2, 8, 8, 3))
    rv = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), jax.eval_shape(res.init, jax.random.key(0), rx))
    layer_names = {"/".join(str(k.key) for k in path[:-1])
                   for path, _ in jax.tree_util.tree_flatten_with_path(rv["params"])[0]}
    unit = {k: q.QParams(jnp.float32(0.1), jnp.int32(0), -128, 127) for k in layer_names}  # no calibration
    plan = i8.fusion_plan(res, i8.convert_int8(rv, unit), rx)
    # residual adds are not monotone in the codes: only conv1 -> relu -> conv2 inside blocks fuse
    assert plan["stage2_block1/conv1"] == "stage2_block1/conv2"
    assert "stage2_block1/conv2" not in plan and "conv_init" not in plan and "fc" not in plan
    assert len(plan) == 9


class _Mixed(nn.Module):
    """Hand-offs that must not be fused: a scale, an average pool, ReLU6."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), name="c1")(x) * 2.0
        x = nn.avg_pool(nn.Conv(4, (3, 3), name="c2")(x), (2, 2), (2, 2))
        x = jnp.minimum(nn.relu(nn.Conv(4, (3, 3), name="c3")(x)), 6.0)
        x = nn.relu(nn.Conv(4, (3, 3), name="c4")(x))
        return nn.Dense(3, name="d")(x.reshape(x.shape[0], -1))


def test_no_fusion_through_non_monotone_ops():
    model = _Mixed()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    act = q.calibrate(model, variables, [x])
    qm = i8.convert_int8(variables, act)
    assert i8.fusion_plan(model, qm, x) == {"c4": "d"}
    fq = jax.jit(lambda v, x: q.apply_fake_quant(model, v, x, act))(variables, x)
    out = jax.jit(lambda m, x: i8.int8_apply(model, m, x, fuse=True))(qm, x)
    assert_equal_up_to_ties(out, fq, rtol=1e-4, atol=1e-4)


class _Conv(nn.Module):
    strides: int
    padding: object
    kernel: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(5, (self.kernel, self.kernel), strides=self.strides, padding=self.padding, name="layer")(x)


@pytest.mark.parametrize("strides,padding,kernel", [
    (1, "SAME", 3), (2, "SAME", 3), (1, "VALID", 3), (2, "VALID", 1), (1, ((2, 0), (1, 1)), 3), (2, "SAME", 4),
])
@pytest.mark.parametrize("act_config", [q.ACT_CONFIG, q.QuantConfig(per_channel=False)])  # zp != 0, zp == 0
def test_int8_conv_lowerings_agree_exactly(strides, padding, kernel, act_config):
    """Integer arithmetic: every lowering gives the same outputs (K = 27, not a multiple of 16)."""
    model = _Conv(strides, padding, kernel)
    x = jax.random.normal(jax.random.key(1), (3, 9, 8, 3)) + 0.7
    variables = jax.jit(model.init)(jax.random.key(0), x)
    act = q.calibrate(model, variables, [x], act_config)
    qm = i8.convert_int8(variables, act)
    assert (qm.layers["layer"].zero_point != 0) == (act_config is q.ACT_CONFIG)
    lowerings = ("im2col", "native") + (("cpu_kernel",) if int8_cpu.available() else ())
    outs = {low: np.asarray(jax.jit(lambda m, x: i8.int8_apply(model, m, x, conv_lowering=low))(qm, x))
            for low in lowerings}
    for low in lowerings:  # same int32 accumulators; the float epilogue may round a last bit differently
        np.testing.assert_allclose(outs[low], outs["native"], rtol=1e-6, atol=1e-6, err_msg=low)
    fq = jax.jit(lambda v, x: q.apply_fake_quant(model, v, x, act))(variables, x)
    np.testing.assert_allclose(outs["im2col"], fq, rtol=1e-5, atol=1e-5)


def test_unknown_conv_lowering_names_the_choices(trained):
    model, variables, act, x, _ = trained
    with pytest.raises(ValueError, match="winograd.*im2col, native"):
        i8.int8_apply(model, i8.convert_int8(variables, act), x, conv_lowering="winograd")
    # The tests run on CPU: "auto" is the AVX2 kernel where it builds, else im2col; never the
    # kernel for an exported (portable) program.
    assert i8.resolve_conv_lowering("auto") == ("cpu_kernel" if int8_cpu.available() else "im2col")
    assert i8.resolve_conv_lowering("auto", portable=True) == "im2col"


def test_auto_falls_back_and_explicit_kernel_explains_why(monkeypatch):
    monkeypatch.setattr(int8_cpu, "available", lambda: False)
    monkeypatch.setattr(int8_cpu, "unavailable_reason", lambda: "no C++ compiler (c++, g++ or clang++; or set CXX)")
    assert i8.resolve_conv_lowering("auto") == "im2col"
    with pytest.raises(ValueError, match=r"'cpu_kernel' cannot run here \(no C\+\+ compiler.*im2col, native"):
        i8.resolve_conv_lowering("cpu_kernel")


def test_exported_programs_never_use_the_kernel():
    assert i8.resolve_conv_lowering("auto", portable=True) in ("im2col", "native")
    with pytest.raises(ValueError, match="cannot be exported"):
        i8.resolve_conv_lowering("cpu_kernel", portable=True)
