"""Tests for jaxaccel.compress.quant: fake_quant, observers, PTQ calibration, QAT, and the
calibration files a quantize stage writes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from export_helpers import raw_images
from jaxaccel import data
from jaxaccel.compress import quant as q
from jaxaccel.models import get_model, init_variables

DIGITS = data.dataset_spec("digits")


# ------------------------------------------------------------------ fake_quant
def test_fake_quant_per_tensor_hand_values():
    x = jnp.array([-20.0, -0.26, -0.25, 0.0, 0.05, 0.15, 0.25, 0.35, 0.74, 20.0])
    # scale 0.1, zp 0, int4 [-8, 7]: codes round-half-even(x*10)
    got = q.fake_quant(x, 0.1, 0, -8, 7)
    want = np.array([-0.8, -0.3, -0.2, 0.0, 0.0, 0.2, 0.2, 0.4, 0.7, 0.7], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # affine: zp = 3 shifts the clamping window to [-1.1, 0.4]
    got = q.fake_quant(x, 0.1, 3, -8, 7)
    np.testing.assert_allclose(np.asarray(got)[[0, -1]], [-1.1, 0.4], atol=1e-6)


def test_fake_quant_per_channel_axis():
    x = jnp.arange(-6.0, 6.0).reshape(3, 4) / 4.0
    scale = jnp.array([0.5, 0.25, 1.0])
    zp = jnp.array([0, 1, -1])
    got = q.fake_quant(x, scale, zp, -4, 3, axis=0)
    for c in range(3):
        np.testing.assert_allclose(got[c], q.fake_quant(x[c], scale[c], zp[c], -4, 3))
    # negative axis works and equals transposed per-channel
    got_t = q.fake_quant(x.T, scale, zp, -4, 3, axis=-1)
    np.testing.assert_allclose(got_t, got.T)


def test_fake_quant_ste_gradient():
    x = jnp.array([-2.0, -0.79, -0.2, 0.0, 0.3, 0.69, 0.76, 2.0])
    g = jax.grad(lambda x: jnp.sum(q.fake_quant(x, 0.1, 0, -8, 7) * jnp.arange(1.0, 9.0)))(x)
    # inside [-0.8, 0.7] after rounding -> upstream gradient, outside -> 0
    np.testing.assert_array_equal(g, [0, 2, 3, 4, 5, 6, 0, 0])
    gs, gz = jax.grad(lambda s, z: q.fake_quant(x, s, z, -8, 7).sum(), argnums=(0, 1))(0.1, 0.0)
    assert gs == 0 and gz == 0


def test_fake_quant_bad_inputs():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="axis 2"):
        q.fake_quant(x, jnp.ones(3), jnp.zeros(3), -8, 7, axis=2)
    with pytest.raises(ValueError, match="shape"):
        q.fake_quant(x, jnp.ones(2), jnp.zeros(2), -8, 7, axis=1)
    with pytest.raises(ValueError, match="qmin"):
        q.fake_quant(x, 0.1, 0, 7, -8)
    with pytest.raises(ValueError, match="scalar"):
        q.fake_quant(x, jnp.ones(3), 0, -8, 7)


@pytest.mark.parametrize("bits", [1, 9, 0, 8.0, "8", True])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=repr(bits).replace("'", ".")):
        q.QuantConfig(bits=bits)


def test_config_validation():
    with pytest.raises(ValueError, match="histogram"):
        q.QuantConfig(observer="histogram")
    with pytest.raises(ValueError, match="percentile"):
        q.QuantConfig(percentile=0.0)
    with pytest.raises(ValueError, match="axis 3"):
        q.weight_qparams({"k": {"kernel": jnp.ones((2, 3))}}, q.QuantConfig(axis=3))


@pytest.mark.parametrize("bits,signed,narrow,want", [
    (8, True, False, (-128, 127)), (8, True, True, (-127, 127)), (8, False, False, (0, 255)),
    (4, True, False, (-8, 7)), (2, True, True, (-1, 1)), (3, False, False, (0, 7)),
])
def test_quant_range(bits, signed, narrow, want):
    assert q.quant_range(bits, signed, narrow) == want
    c = q.QuantConfig(bits=bits, signed=signed, narrow_range=narrow)
    assert (c.qmin, c.qmax) == want


# ------------------------------------------------------------------ observers
def test_qparams_symmetric_signed_and_unsigned():
    c = q.QuantConfig(per_channel=False)
    qp = q.calculate_qparams(jnp.float32(-0.5), jnp.float32(2.55), c)
    assert float(qp.scale) == pytest.approx(2.55 / 127.5) and int(qp.zero_point) == 0
    cu = q.QuantConfig(per_channel=False, signed=False)
    assert int(q.calculate_qparams(-1.0, 2.0, cu).zero_point) == 128  # PyTorch's uint8 default
    cu4 = q.QuantConfig(per_channel=False, signed=False, bits=4)
    assert int(q.calculate_qparams(-1.0, 2.0, cu4).zero_point) == 7  # (0 + 15) // 2
    cn = q.QuantConfig(per_channel=False, narrow_range=True)
    assert float(q.calculate_qparams(-3.0, 1.0, cn).scale) == pytest.approx(3.0 / 127)


def test_qparams_affine_includes_zero_and_eps():
    c = q.QuantConfig(per_channel=False, symmetric=False)
    qp = q.calculate_qparams(1.0, 3.0, c)  # range widened to [0, 3]
    assert float(qp.scale) == pytest.approx(3.0 / 255) and int(qp.zero_point) == -128
    qp = q.calculate_qparams(-2.0, -1.0, c)  # widened to [-2, 0]
    assert float(qp.scale) == pytest.approx(2.0 / 255) and int(qp.zero_point) == 127
    qp = q.calculate_qparams(-1.0, 3.0, c)
    assert int(qp.zero_point) == -128 - round(-1.0 / (4.0 / 255))
    qp = q.calculate_qparams(0.0, 0.0, c)  # all zeros: eps floor, no division by 0
    assert float(qp.scale) == pytest.approx(q.FLOAT32_EPS)
    empty = q.init_range()
    qp = q.calculate_qparams(empty.min, empty.max, c)  # never observed: PyTorch's (1, 0)
    assert float(qp.scale) == 1.0 and int(qp.zero_point) == 0


def test_per_channel_weight_qparams_last_axis():
    k = jnp.stack([jnp.linspace(-1, 1, 12).reshape(3, 4) * (c + 1) for c in range(5)], axis=-1)  # (3,4,5)
    qps = q.weight_qparams({"conv": {"kernel": k, "bias": jnp.ones(5)}})
    assert list(qps) == ["conv/kernel"]
    np.testing.assert_allclose(qps["conv/kernel"].scale, (np.arange(5) + 1) / 127.5, rtol=1e-6)
    assert qps["conv/kernel"].axis == 2


def test_ema_and_minmax_running_ranges():
    batches = [jnp.array([-1.0, 2.0]), jnp.array([-3.0, 1.0]), jnp.array([0.0, 4.0])]
    c_mm = q.QuantConfig(per_channel=False, observer="minmax")
    c_ema = q.QuantConfig(per_channel=False, observer="ema", averaging_constant=0.5)
    s_mm, s_ema = q.init_range(), q.init_range()
    for b in batches:
        s_mm = q.update_range(s_mm, *q.batch_range(b, c_mm), c_mm)
        s_ema = q.update_range(s_ema, *q.batch_range(b, c_ema), c_ema)
    assert (float(s_mm.min), float(s_mm.max)) == (-3.0, 4.0)
    # EMA: first batch sets it, then m += 0.5 * (x - m)
    assert float(s_ema.min) == pytest.approx(-1.0)  # -1 -> -2 -> -1
    assert float(s_ema.max) == pytest.approx(2.75)  # 2 -> 1.5 -> 2.75
    assert int(s_ema.count) == 3


def test_percentile_observer_clips_outliers():
    x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 10_000), jnp.array([100.0])])
    c = q.QuantConfig(per_channel=False, observer="percentile", percentile=99.0)
    lo, hi = q.batch_range(x, c)
    assert 0.9 < float(hi) < 1.01 and float(lo) == -float(hi)
    lo_a, hi_a = q.batch_range(x, q.QuantConfig(per_channel=False, symmetric=False, observer="percentile",
                                                percentile=99.0))
    assert -1.0 < float(lo_a) < -0.95 and 0.95 < float(hi_a) < 1.01


# ------------------------------------------------------------------ properties
_configs = st.builds(q.QuantConfig, bits=st.integers(2, 8), symmetric=st.booleans(), per_channel=st.booleans(),
                     signed=st.booleans(), narrow_range=st.booleans())


@settings(max_examples=15, deadline=None)
@given(config=_configs, seed=st.integers(0, 2**16), density=st.floats(0.05, 0.95))
def test_pruned_zeros_survive_quantization(config, seed, density):
    rng = np.random.default_rng(seed)  # numpy data: no per-example XLA compiles
    w = rng.standard_normal((3, 3, 4, 6)) * rng.uniform(0.01, 3.0, (6,))
    mask = rng.random(w.shape) < density
    w = jnp.asarray(np.where(mask, w, 0.0), jnp.float32)
    fq, qps = q.quantize_weights({"conv": {"kernel": w}}, config)
    out = fq["conv"]["kernel"]
    assert np.all(np.asarray(out)[~mask] == 0.0)
    # and the codes are exactly representable: error at most half a step inside the range
    qp = qps["conv/kernel"]
    scale = qp.scale if qp.axis is None else qp.scale.reshape(1, 1, 1, -1)
    lo = (qp.qmin - (qp.zero_point if qp.axis is None else qp.zero_point.reshape(1, 1, 1, -1))) * scale
    hi = (qp.qmax - (qp.zero_point if qp.axis is None else qp.zero_point.reshape(1, 1, 1, -1))) * scale
    inside = (w >= lo) & (w <= hi)
    err = jnp.abs(out - w)
    assert bool(jnp.all(jnp.where(inside, err <= scale / 2 + 1e-6, True)))


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_fake_quant_idempotent_and_on_grid(bits, signed, seed):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(64) * 3, jnp.float32)
    c = q.QuantConfig(bits=bits, signed=signed, symmetric=False, per_channel=False)
    qp = q.tensor_qparams(x, c)
    once = q.fake_quant_with(x, qp)
    np.testing.assert_array_equal(q.fake_quant_with(once, qp), once)
    codes = np.asarray(once / qp.scale) + int(qp.zero_point)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= c.qmin - 1e-3 and codes.max() <= c.qmax + 1e-3


# ------------------------------------------------------------------ PyTorch parity (optional)
def test_matches_pytorch_if_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 5, 6)) * 3).astype(np.float32)
    x.flat[:12] = np.arange(-6, 6, dtype=np.float32) * 0.25  # exact ties
    for s, z, lo, hi in [(0.25, 0, -128, 127), (0.1, 3, -8, 7), (0.05, 128, 0, 255)]:
        want = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), s, z, lo, hi).numpy()
        np.testing.assert_array_equal(np.asarray(q.fake_quant(jnp.asarray(x), s, z, lo, hi)), want)
    sc = rng.uniform(0.05, 0.5, 6).astype(np.float32)
    zp = rng.integers(-3, 4, 6).astype(np.int32)
    want = torch.fake_quantize_per_channel_affine(torch.from_numpy(x), torch.from_numpy(sc),
                                                  torch.from_numpy(zp), 2, -8, 7).numpy()
    np.testing.assert_array_equal(np.asarray(q.fake_quant(jnp.asarray(x), sc, zp, -8, 7, axis=2)), want)
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    data = (rng.standard_normal((8, 6)) + 0.3).astype(np.float32)
    for kw, cfg in [(dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric), q.QuantConfig(per_channel=False)),
                    (dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine),
                     q.QuantConfig(per_channel=False, symmetric=False, signed=False))]:
        obs = MinMaxObserver(**kw)
        obs(torch.from_numpy(data))
        s, z = obs.calculate_qparams()
        qp = q.tensor_qparams(jnp.asarray(data), cfg)
        np.testing.assert_allclose(float(qp.scale), float(s), rtol=1e-6)
        assert int(qp.zero_point) == int(z)
    obs = PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    obs(torch.from_numpy(data))
    s, z = obs.calculate_qparams()
    qp = q.tensor_qparams(jnp.asarray(data), q.QuantConfig())
    np.testing.assert_allclose(np.asarray(qp.scale), s.numpy(), rtol=1e-6)


# ------------------------------------------------------------------ PTQ on a model
@pytest.fixture(scope="module")
def cnn():
    model = get_model("cnn3", 10, width=0.25)
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    images = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
    return model, variables, images


def test_calibrate_keys_and_apply(cnn):
    model, variables, images = cnn
    aq = q.calibrate(model, variables, [images[:8], images[8:]], q.ACT_CONFIG)
    assert sorted(aq) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert all(a.scale.shape == () for a in aq.values())
    ref = model.apply(variables, images, train=False)
    out = jax.jit(lambda v, x: q.apply_fake_quant(model, v, x, aq))(variables, images)
    err = float(jnp.max(jnp.abs(out - ref)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(ref)))
    # 3-bit weights are much worse than 8-bit
    out3 = jax.jit(lambda v, x: q.apply_fake_quant(model, v, x, aq, weight_config=q.QuantConfig(bits=3)))(
        variables, images)
    assert float(jnp.max(jnp.abs(out3 - ref))) > 3 * err


def test_calibrate_skip_and_missing(cnn):
    model, variables, images = cnn
    aq = q.calibrate(model, variables, [images], skip=("conv1",))
    assert "conv1" not in aq
    q.apply_fake_quant(model, variables, images, aq, skip=("conv1",))
    with pytest.raises(ValueError, match="conv1"):
        q.apply_fake_quant(model, variables, images, aq)
    with pytest.raises(ValueError, match="empty"):
        q.calibrate(model, variables, [])


def test_calibrate_per_channel_and_observers(cnn):
    model, variables, images = cnn
    pc = q.calibrate(model, variables, [images], q.QuantConfig(per_channel=True, symmetric=False))
    assert pc["conv2"].scale.shape == (8,) and pc["fc1"].scale.shape == (32,)
    q.apply_fake_quant(model, variables, images, pc)
    mm = q.calibrate(model, variables, [images, 3 * images], q.QuantConfig(per_channel=False))
    ema = q.calibrate(model, variables, [images, 3 * images], q.QuantConfig(per_channel=False, observer="ema"))
    pct = q.calibrate(model, variables, [images], q.QuantConfig(per_channel=False, observer="percentile",
                                                                percentile=99.0))
    for k in mm:
        assert float(ema[k].scale) < float(mm[k].scale)
        assert float(pct[k].scale) <= float(mm[k].scale)


def test_weights_only_skip_leaves_layer_float(cnn):
    model, variables, _ = cnn
    fq, qps = q.quantize_weights(variables["params"], filter_fn=lambda p, x: p == "fc2/kernel")
    assert list(qps) == ["fc2/kernel"]
    chex.assert_trees_all_equal(fq["conv1"], variables["params"]["conv1"])
    assert not bool(jnp.all(fq["fc2"]["kernel"] == variables["params"]["fc2"]["kernel"]))


# ------------------------------------------------------------------ QAT
def test_qat_state_delay_and_gradient(cnn):
    model, variables, images = cnn
    cfg = q.QATConfig(delay=5)
    state = q.qat_init(model, variables, images, cfg)
    assert sorted(state) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    ref = model.apply(variables, images, train=False)
    f = jax.jit(lambda v, s, x, step: q.qat_apply(model, v, s, x, train=True, step=step, config=cfg))
    out, s1 = f(variables, state, images, 0)
    np.testing.assert_allclose(out, ref, atol=1e-5)  # before the delay: float, ranges tracked
    assert int(s1["conv2"].count) == 1 and float(s1["conv2"].max) > 0
    out, s2 = f(variables, s1, images, 5)
    assert float(jnp.max(jnp.abs(out - ref))) > 0
    assert int(s2["conv2"].count) == 2
    # eval does not touch the state
    _, s3 = q.qat_apply(model, variables, s2, images, train=False, step=10, config=cfg)
    chex.assert_trees_all_equal(s3, s2)

    def loss(params):
        logits, _ = q.qat_apply(model, {**variables, "params": params}, s2, images, train=True, step=10, config=cfg)
        return jnp.mean(logits ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert float(jnp.sum(jnp.abs(g))) > 0, path


def test_qat_missing_layer_state(cnn):
    model, variables, images = cnn
    with pytest.raises(ValueError, match="qat_init"):
        q.qat_apply(model, variables, {}, images, train=True, step=0)
    with pytest.raises(ValueError, match="delay"):
        q.QATConfig(delay=-1)


def test_qat_training_reduces_loss():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = jnp.asarray(digits.images[:512, :, :, None] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[:512])
    model = get_model("lenet300_100", 10, width=0.25)
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    cfg = q.QATConfig(weights=q.QuantConfig(bits=4), activations=q.QuantConfig(bits=4, per_channel=False,
                                                                                 symmetric=False, observer="ema"))
    state = q.qat_init(model, variables, x, cfg)
    tx = optax.adam(3e-3)
    opt = tx.init(variables["params"])

    @jax.jit
    def step(params, opt, state, i):
        def loss_fn(p):
            logits, new_state = q.qat_apply(model, {"params": p}, state, x, train=True, step=i, config=cfg)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state
        (loss, new_state), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, new_state, loss

    params = variables["params"]
    losses = []
    for i in range(30):
        params, opt, state, loss = step(params, opt, state, i)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------ sharding
def _shardings(tree, mesh, fsdp: bool):
    def one(x):
        if fsdp and x.ndim >= 2 and x.shape[-1] % mesh.size == 0:
            return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "d"))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, tree)


@pytest.mark.parametrize("fsdp", [False, True])
def test_sharded_params(fsdp):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    model = get_model("cnn3", 10, features=(8, 16, 32), hidden=32)
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    images = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
    aq = q.calibrate(model, variables, [images])
    ref = q.apply_fake_quant(model, variables, images, aq)
    sharded = jax.device_put(variables, _shardings(variables, mesh, fsdp))
    if fsdp:
        assert sharded["params"]["conv3"]["kernel"].sharding.spec[-1] == "d"
    aq_s = q.calibrate(model, sharded, [images])
    chex.assert_trees_all_close(aq_s, aq, rtol=1e-6)
    out = jax.jit(lambda v, x: q.apply_fake_quant(model, v, x, aq_s))(sharded, images)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    fq, _ = jax.jit(q.quantize_weights)(sharded["params"])
    assert fq["conv3"]["kernel"].sharding.is_equivalent_to(sharded["params"]["conv3"]["kernel"].sharding, 4)


# ------------------------------------------------------------------ calibration files
def test_calibration_file_round_trips_exactly(tmp_path):
    model = get_model("cnn3", 10, features=(8, 16, 32), hidden=32, conv_impl="xla")
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    x = data.normalize(raw_images(1, 32), DIGITS)
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
