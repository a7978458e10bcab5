"""Tests for jaxaccel.compress.fold: BatchNorm folding into the preceding conv."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxaccel.compress.fold import find_conv_bn_pairs, fold_bn, fold_conv_bn
from jaxaccel.models import get_model, init_variables


def _trained_like(variables, seed=0):
    """Give BN non-trivial scale/bias and running statistics, as after training."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name and name.endswith("['var']"):
            x = jax.random.uniform(k, x.shape, minval=0.2, maxval=3.0)
        elif "batch_stats" in name:
            x = 0.5 * jax.random.normal(k, x.shape)
        elif "bn" in name:
            x = x + 0.3 * jax.random.normal(k, x.shape)
        out.append(x)
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize("name,kwargs", [("cnn_bn", dict(features=(8, 16))), ("resnet20", dict(width=0.25)),
                                         ("dscnn_bn", dict(features=(8, 16, 16)))])
def test_fold_eval_equivalence(name, kwargs):
    model = get_model(name, 10, **kwargs)
    variables = _trained_like(init_variables(model, jax.random.key(0), (8, 8, 3)))
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    folded_model, folded = fold_bn(model, variables, input_shape=(1, 8, 8, 3))
    assert folded_model.use_bn is False
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    got = folded_model.apply(folded, images, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # same tree as a fresh use_bn=False model, no BN leaves, no batch stats left (its shapes:
    # initialised abstractly, nothing compiled)
    fresh = jax.eval_shape(lambda r: folded_model.init(r, jnp.zeros((1, 8, 8, 3)), train=False),
                           jax.random.key(0))
    chex.assert_trees_all_equal_shapes(folded["params"], fresh["params"])
    assert jax.tree.leaves(folded["batch_stats"]) == []


def test_pairs_of_resnet():
    pairs = find_conv_bn_pairs(get_model("resnet20", 10, width=0.25), (1, 8, 8, 3))
    got = {"/".join(p["conv"]): "/".join(p["bn"]) for p in pairs}
    assert len(got) == 1 + 9 * 2 + 2  # init conv, 2 per block, 2 projections
    assert got["conv_init"] == "bn_init"
    assert got["stage2_block1/proj_conv"] == "stage2_block1/proj_bn"
    assert got["stage3_block3/conv2"] == "stage3_block3/bn2"


def test_pairs_and_depthwise_fold_of_dscnn():
    """Every conv of dscnn_bn is paired with its BN; a depthwise kernel (3, 3, 1, C) is scaled
    along its last axis, one factor per channel (= per input channel)."""
    model = get_model("dscnn_bn", 10, features=(8, 16, 16))
    pairs = find_conv_bn_pairs(model, (1, 8, 8, 1))
    got = {"/".join(p["conv"]): "/".join(p["bn"]) for p in pairs}
    assert got == {"conv1": "bn1", "dw1": "bn_dw1", "pw1": "bn_pw1", "dw2": "bn_dw2", "pw2": "bn_pw2"}
    variables = _trained_like(init_variables(model, jax.random.key(0), (8, 8, 1)), seed=1)
    folded_model, folded = fold_bn(model, variables, input_shape=(1, 8, 8, 1))
    kernel = variables["params"]["dw2"]["kernel"]
    assert kernel.shape == (3, 3, 1, 16)
    bn, stats = variables["params"]["bn_dw2"], variables["batch_stats"]["bn_dw2"]
    factor = bn["scale"] / jnp.sqrt(stats["var"] + 1e-5)
    np.testing.assert_allclose(folded["params"]["dw2"]["kernel"], kernel * factor, rtol=1e-6)
    np.testing.assert_allclose(folded["params"]["dw2"]["bias"], bn["bias"] - stats["mean"] * factor,
                               rtol=1e-5, atol=1e-6)
    assert sorted(folded["params"]) == ["conv1", "dw1", "dw2", "fc", "pw1", "pw2"]


def test_fold_conv_bn_formula():
    k = jnp.arange(24.0).reshape(1, 2, 3, 4)
    scale, bias = jnp.array([1.0, 2.0, -1.0, 0.5]), jnp.array([0.1, 0.2, 0.3, 0.4])
    mean, var = jnp.array([1.0, -1.0, 0.0, 2.0]), jnp.array([3.0, 0.0, 1.0, 15.0])
    nk, nb = fold_conv_bn(k, None, scale, bias, mean, var, 1.0)
    f = scale / jnp.sqrt(var + 1.0)
    np.testing.assert_allclose(nk, k * f, rtol=1e-6)
    np.testing.assert_allclose(nb, bias - mean * f, rtol=1e-6)
    nk2, nb2 = fold_conv_bn(k, jnp.ones(4), None, None, mean, var, 1.0)  # conv bias, BN w/o affine
    np.testing.assert_allclose(nb2, (1.0 - mean) / jnp.sqrt(var + 1.0), rtol=1e-6)


def test_model_without_bn_unchanged():
    model = get_model("cnn3", 10, width=0.25)
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    m2, v2 = fold_bn(model, variables, input_shape=(1, 8, 8, 1))
    assert m2 is model
    chex.assert_trees_all_equal(v2, variables)


class _BNAfterReLU(nn.Module):
    use_bn: bool = True

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        return nn.BatchNorm(use_running_average=not train, name="bn")(x)


def test_unfoldable_bn_raises():
    with pytest.raises(ValueError, match="bn"):
        fold_bn(_BNAfterReLU(), {"params": {}, "batch_stats": {}}, input_shape=(1, 4, 4, 1))


def test_fold_sharded_params():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    model = get_model("cnn_bn", 10, features=(8, 16))
    variables = _trained_like(init_variables(model, jax.random.key(0), (8, 8, 1)), seed=3)
    images = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)

    def fsdp(x):  # shard the last (output-channel) dim of kernels, replicate the rest
        spec = P(*([None] * (x.ndim - 1)), "d") if x.ndim >= 2 and x.shape[-1] % 8 == 0 else P()
        return NamedSharding(mesh, spec)

    for shard in (lambda x: NamedSharding(mesh, P()), fsdp):
        sharded = jax.device_put(variables, jax.tree.map(shard, variables))
        fm, fv = fold_bn(model, sharded, input_shape=(1, 8, 8, 1))
        got = jax.jit(lambda v, x: fm.apply(v, x, train=False))(fv, images)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert fv["params"]["conv2"]["kernel"].sharding.spec[-1] == "d"
