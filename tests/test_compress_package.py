"""Compressed checkpoints: sparse int codes + bit-masks + scales, rebuilt for inference."""
import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxaccel import data, models
from jaxaccel.compress import package, prune, quant

SHAPES = {"lenet300_100": (28, 28, 1), "cnn3": (32, 32, 3)}
SPECS = {"lenet300_100": data.dataset_spec("mnist"), "cnn3": data.dataset_spec("cifar10")}
TOY = data.DatasetSpec("toy", 10, (8, 8, 3), (0.25, 0.5, 0.75), (0.2, 0.3, 0.4), "folder",
                       class_names=tuple(f"class_{i}" for i in range(10)))
_masks_at = jax.jit(lambda params, s: prune.magnitude_masks(params, s))


@pytest.fixture(scope="module")
def sparse_models():
    """{name: (model, variables, 90% masks)} with random init weights (no training needed)."""
    out = {}
    for name, shape in SHAPES.items():
        model = models.get_model(name, 10)
        variables = models.init_variables(model, jax.random.key(0), shape)
        out[name] = (model, variables, _masks_at(variables["params"], 0.9))
    return out


@functools.partial(jax.jit, static_argnames=("bits", "per_channel"))
def fake_quant_reference(params, masks, bits, per_channel=True):
    """What the package promises: the masked kernels fake-quantized as the PTQ stage does."""
    masked = prune.apply_masks(params, masks)
    return quant.quantize_weights(masked, package.weight_config(bits, per_channel))[0]


@functools.partial(jax.jit, static_argnums=0)
def logits(model, variables, images):
    return model.apply(variables, images, train=False)


@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_is_fake_quant_and_15x_smaller(name, sparse_models, tmp_path):
    model, variables, masks = sparse_models[name]
    path = tmp_path / "model.npz"
    info = package.save_compressed(path, model, variables, masks, spec=SPECS[name], bits=8)
    pkg = package.load_compressed(path)
    model2, loaded = pkg.model, pkg.variables
    assert model2 == model and pkg.spec == SPECS[name]
    expected = fake_quant_reference(variables["params"], masks, 8)
    chex.assert_trees_all_equal(loaded["params"], expected)  # bit for bit
    # Zeros stay zero and nothing pruned comes back.
    for (p, w), (_, mk) in zip(prune.named_leaves(loaded["params"]), prune.named_leaves(masks)):
        assert not np.any(np.asarray(w)[~np.asarray(mk)]), p
    images = jax.random.normal(jax.random.key(1), (4,) + SHAPES[name])
    fq_logits = logits(model, {**variables, "params": expected}, images)
    chex.assert_trees_all_close(logits(model2, loaded, images), fq_logits,
                                atol=1e-5, rtol=1e-5)
    # The target: a 90%-sparse int8 model >= 15x smaller than float32 dense.
    dense = 4 * sum(np.size(x) for x in jax.tree.leaves(variables))
    assert info["dense_float32_bytes"] == dense
    assert info["package_file_bytes"] == path.stat().st_size
    assert info["ratio"] >= 15, info
    assert info["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_no_float_copy_and_sizes_match_formula(sparse_models):
    model, variables, masks = sparse_models["cnn3"]
    arrays, records = package.encode(variables, masks, bits=8)
    for i, r in enumerate(records):
        mine = {k: a for k, a in arrays.items() if k.split(".")[0] == str(i)}
        if r["encoding"] == "sparse_int":
            assert set(mine) == {f"{i}.mask", f"{i}.codes", f"{i}.scale"}, r["path"]
            assert mine[f"{i}.codes"].dtype == np.int8 and mine[f"{i}.codes"].size == r["nonzeros"]
            assert mine[f"{i}.mask"].dtype == np.uint8
            size = int(np.prod(r["shape"]))
            assert sum(a.nbytes for a in mine.values()) == package.kernel_bytes(
                size, r["nonzeros"], r["shape"][-1], 8), r["path"]
        else:
            assert not r["path"].endswith("kernel")
    assert not any(a.dtype == np.float32 and a.size > 128 for a in arrays.values())


@pytest.mark.parametrize("bits,per_channel,float_dtype", [(4, True, "float32"),
                                                           (2, False, "float32"),
                                                           (6, True, "float16")])
def test_low_bits_per_tensor_float16(bits, per_channel, float_dtype, sparse_models, tmp_path):
    model, variables, masks = sparse_models["lenet300_100"]
    path = tmp_path / "m.npz"
    spec = SPECS["lenet300_100"]
    info8 = package.save_compressed(tmp_path / "m8.npz", model, variables, masks, spec=spec, bits=8)
    info = package.save_compressed(path, model, variables, masks, spec=spec, bits=bits,
                                   per_channel=per_channel, float_dtype=float_dtype)
    assert info["packed_bytes"] < info8["packed_bytes"]
    loaded = package.load_compressed(path).variables
    expected = fake_quant_reference(variables["params"], masks, bits, per_channel)
    kernels = lambda t: {p: w for p, w in prune.named_leaves(t) if p.endswith("kernel")}  # noqa: E731
    if float_dtype == "float32":
        chex.assert_trees_all_equal(kernels(loaded["params"]), kernels(expected))
    else:  # float16 scales: same codes, scales rounded to float16
        chex.assert_trees_all_close(kernels(loaded["params"]), kernels(expected), rtol=1e-3)
        chex.assert_trees_all_close(loaded["params"]["fc1"]["bias"],
                                    variables["params"]["fc1"]["bias"], atol=1e-3)
    assert all(w.dtype == jnp.float32 for w in jax.tree.leaves(loaded))


def test_batchnorm_model_keeps_stats_and_fields(tmp_path):
    model = models.get_model("cnn_bn", 10, width=0.25)
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
    variables["batch_stats"] = jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])
    path = tmp_path / "bn.npz"
    package.save_compressed(path, model, variables, spec=TOY, bits=8, extra={"step": 5})
    pkg = package.load_compressed(path)
    model2, loaded = pkg.model, pkg.variables
    assert pkg.step == 5
    assert model2.features == model.features == (8, 16)
    chex.assert_trees_all_equal(loaded["batch_stats"], variables["batch_stats"])
    chex.assert_trees_all_equal(loaded["params"]["bn1"], variables["params"]["bn1"])
    meta, _ = package.read_package(path)
    assert meta["extra"] == {"step": 5}
    assert meta["model"]["name"] == "cnn_bn"


def test_depthwise_model_round_trip(tmp_path):
    """dscnn_bn (depthwise kernels (3, 3, 1, C), BN) comes back with its fields, stats and
    the fake-quant kernels, per-channel along the depthwise kernel's last axis."""
    model = models.get_model("dscnn_bn", 10, features=(8, 16, 16), pool_after=(1,))
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
    variables["batch_stats"] = jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])
    masks = _masks_at(variables["params"], 0.5)
    path = tmp_path / "ds.npz"
    package.save_compressed(path, model, variables, masks, spec=data.dataset_spec("digits"), bits=4)
    pkg = package.load_compressed(path)
    model2, loaded = pkg.model, pkg.variables
    assert model2 == model and model2.pool_after == (1,) and model2.features == (8, 16, 16)
    assert package.read_package(path)[0]["model"]["name"] == "dscnn_bn"
    expected = fake_quant_reference(variables["params"], masks, 4)
    chex.assert_trees_all_equal(loaded["params"], expected)
    chex.assert_trees_all_equal(loaded["batch_stats"], variables["batch_stats"])
    assert loaded["params"]["dw2"]["kernel"].shape == (3, 3, 1, 16)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    chex.assert_trees_all_close(logits(model2, loaded, images),
                                logits(model, {**variables, "params": expected}, images), atol=1e-5, rtol=1e-5)


def test_dense_kernel_stores_no_mask():
    variables = {"params": {"fc": {"kernel": np.arange(1, 13, dtype=np.float32).reshape(3, 4),
                                   "bias": np.zeros(4, np.float32)}}}
    arrays, records = package.encode(variables, bits=8)
    assert "0.mask" not in arrays and records[1]["nonzeros"] == 12
    out = package.decode(arrays, records, ["params"])
    want = fake_quant_reference(variables["params"],
                                jax.tree.map(lambda x: x == x, variables["params"]), 8)
    chex.assert_trees_all_equal(out["params"], jax.device_get(want))


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_pack_codes_round_trip(bits, data):
    qmin, qmax = quant.quant_range(bits, narrow_range=True)
    codes = np.asarray(data.draw(st.lists(st.integers(qmin, qmax), max_size=40)), np.int32)
    packed = package.pack_codes(codes, bits, qmin)
    assert packed.nbytes == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(package.unpack_codes(packed, codes.size, bits, qmin), codes)


@pytest.mark.parametrize("bits", [1, 9, 16, 32, 8.0, True])
def test_bits_outside_2_to_8(bits, sparse_models, tmp_path):
    model, variables, masks = sparse_models["lenet300_100"]
    with pytest.raises(ValueError, match=f"bits.*{bits!r}"):
        package.save_compressed(tmp_path / "x.npz", model, variables, masks, spec=SPECS["lenet300_100"],
                                bits=bits)
    assert not (tmp_path / "x.npz").exists()


def test_bad_masks_and_values_name_the_leaf(sparse_models, tmp_path):
    model, variables, masks = sparse_models["lenet300_100"]
    out = tmp_path / "x.npz"
    save = functools.partial(package.save_compressed, spec=SPECS["lenet300_100"])
    wrong = jax.tree.map(lambda m: m, masks)
    wrong["fc2"]["kernel"] = np.ones((100, 300), bool)
    with pytest.raises(ValueError, match=r"fc2/kernel.*\(100, 300\)"):
        save(out, model, variables, wrong)
    missing = {k: v for k, v in masks.items() if k != "fc3"}
    with pytest.raises(ValueError, match="fc3"):
        save(out, model, variables, missing)
    fuzzy = jax.tree.map(lambda m: m, masks)
    fuzzy["fc1"]["kernel"] = np.full((784, 300), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"fc1/kernel.*0\.5"):
        save(out, model, variables, fuzzy)
    params = jax.tree.map(np.array, variables["params"])
    params["fc2"]["bias"][7] = np.nan
    with pytest.raises(ValueError, match=r"fc2/bias.*nan.*\(7,\)"):
        save(out, model, {"params": params}, masks)
    with pytest.raises(ValueError, match="float_dtype='bfloat16'"):
        save(out, model, variables, masks, float_dtype="bfloat16")
    assert not out.exists()


def test_not_a_package(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a jaxaccel compressed package"):
        package.load_compressed(bad)
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(ValueError, match="something-else"):
        package.load_compressed(other)
    with pytest.raises(FileNotFoundError):
        package.load_compressed(tmp_path / "missing.npz")


def test_unregistered_model_is_refused(tmp_path):
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2)(x)

    variables = {"params": {"Dense_0": {"kernel": np.ones((3, 2), np.float32),
                                        "bias": np.zeros(2, np.float32)}}}
    with pytest.raises(ValueError, match="Tiny.*registered"):
        package.save_compressed(tmp_path / "t.npz", Tiny(), variables, spec=TOY)


@jax.jit
def _reference_predict(variables, images):
    """What a package's predict must equal: the dequantized model on normalised input."""
    return models.get_model("cnn_bn", 10, width=0.25).apply(
        variables, data.normalize(images, TOY), train=False)


def test_predict_takes_raw_pixels_normalisation_inside(tmp_path):
    model = models.get_model("cnn_bn", 10, width=0.25)
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
    path = tmp_path / "m.npz"
    package.save_compressed(path, model, variables, spec=TOY, bits=8)
    pkg = package.load_compressed(path)
    assert pkg.spec == TOY and package.read_package(path)[0]["version"] == package.VERSION
    raw = np.asarray(jax.random.randint(jax.random.key(1), (6, 8, 8, 3), 0, 256), np.uint8)
    want = _reference_predict(pkg.variables, raw)
    chex.assert_trees_all_close(pkg.predict(raw), want, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(pkg.predict(raw.astype(np.float32)), want, atol=1e-6, rtol=1e-6)
    # the bare network expects normalised input: raw pixels there give other logits
    bare = logits(pkg.model, pkg.variables, raw.astype(np.float32))
    assert not np.allclose(bare, want, atol=1e-2)


def test_spec_that_does_not_fit_the_model_is_refused(tmp_path):
    model = models.get_model("cnn_bn", 10, width=0.25)
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
    out = tmp_path / "x.npz"
    with pytest.raises(ValueError, match="10 classes but dataset 'cifar100' has 100"):
        package.save_compressed(out, model, variables, spec=data.dataset_spec("cifar100"))
    lenet, lvars = models.get_model("lenet300_100", 10), None
    lvars = models.init_variables(lenet, jax.random.key(0), (28, 28, 1))
    with pytest.raises(ValueError, match=r"shape \(8, 8, 1\)"):
        package.save_compressed(out, lenet, lvars, spec=data.dataset_spec("digits"))
    bad_std = dataclasses.replace(TOY, std=(0.2, 0.0, 0.4))
    with pytest.raises(ValueError, match="std"):
        package.save_compressed(out, model, variables, spec=bad_std)
    with pytest.raises(ValueError, match="DatasetSpec"):
        package.save_compressed(out, model, variables, spec="toy")
    assert not out.exists()


def test_version_1_package_says_to_repackage(tmp_path):
    model = models.get_model("cnn_bn", 10, width=0.25)
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
    path = tmp_path / "v2.npz"
    package.save_compressed(path, model, variables, spec=TOY)
    meta, arrays = package.read_package(path)
    del meta["dataset"]
    meta["version"] = 1  # what jaxaccel wrote before packages recorded their normalisation
    old = tmp_path / "v1.npz"
    np.savez(old, **arrays, meta=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match=r"version-1 package.*re-run `jaxaccel compress package"):
        package.load_compressed(old)
