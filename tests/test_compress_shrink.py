"""Tests for jaxaccel.compress.shrink: shrunk models compute what masked models compute."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.compress import prune, shrink
from jaxaccel.models import get_model

CASES = {  # name -> (input shape HWC, model kwargs)
    "cnn3": ((16, 16, 3), {}),
    "lenet5": ((28, 28, 1), {}),
    "lenet300_100": ((28, 28, 1), {}),
    "cnn_bn": ((16, 16, 1), {}),
    "resnet20": ((8, 8, 3), {}),
    "dscnn_bn": ((12, 12, 1), {}),
}


def random_variables(model, shape, seed=0):
    """Random values (no initialiser compiles): biases, BN scale/bias/mean/var all nonzero,
    so a pruned channel's bias or BN shift would show up in the outputs."""
    abstract = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1,) + shape), train=False),
                              jax.random.key(0))
    rng = np.random.default_rng(seed)

    def sample(path, leaf):
        name = path.rsplit("/", 1)[-1]
        if name == "var":
            x = rng.uniform(0.5, 2.0, leaf.shape)
        elif name == "kernel":
            x = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            x = rng.normal(scale=0.5, size=leaf.shape) + (1.0 if name == "scale" else 0.0)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(lambda kp, leaf: sample(prune.path_str(kp), leaf), dict(abstract))


def n_params(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def fast_jit(fn):
    """jit compiled at XLA:CPU optimisation level 0: compiles several times faster, same
    values to float rounding (these tests compare at 1e-4)."""
    cache = {}

    def call(*args):
        key = jax.tree.structure(args), tuple(np.shape(a) for a in jax.tree.leaves(args))
        if key not in cache:
            cache[key] = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
        return cache[key](*args)

    return call


def forward(model, variables, x):
    return fast_jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_shrunk_model_equals_masked_model(name):
    shape, kwargs = CASES[name]
    model = get_model(name, 10, **kwargs)
    variables = random_variables(model, shape)
    params = variables["params"]

    @fast_jit  # one compile instead of an eager compile per op and leaf shape
    def prepare(params):
        masks = prune.magnitude_masks(params, 0.5, granularity="channel",
                                      filter_fn=shrink.shrinkable_filter(model))
        coupled = shrink.couple_channel_masks(model, masks)
        return masks, prune.apply_masks(params, coupled), prune.apply_masks(params, masks)

    masks, coupled_params, kernel_only_params = prepare(params)
    fwd = fast_jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4,) + shape), jnp.float32)
    masked_out = fwd(dict(variables, params=coupled_params), x)

    small_model, small_vars = shrink.shrink(model, variables, masks)
    small_out = forward(small_model, small_vars, x)
    np.testing.assert_allclose(np.asarray(small_out), np.asarray(masked_out), atol=1e-4, rtol=0)
    assert float(jnp.std(masked_out)) > 1e-2  # outputs are not trivially constant

    # the small variables are exactly what the small model expects
    expected = jax.eval_shape(lambda r: small_model.init(r, jnp.zeros((1,) + shape), train=False),
                              jax.random.key(0))
    assert jax.tree.map(np.shape, dict(expected)) == jax.tree.map(np.shape, small_vars)
    for g in shrink.channel_groups(model):
        before = dict(prune.named_leaves(params))[f"{g.producer}/kernel"].shape[-1]
        after = dict(prune.named_leaves(small_vars["params"]))[f"{g.producer}/kernel"].shape[-1]
        assert after == before - int(np.round(0.5 * before)), g
    assert n_params(small_vars["params"]) < 0.7 * n_params(params)
    assert shrink.flops(small_model, shape) < 0.7 * shrink.flops(model, shape)

    # kernel-only channel masks leave the bias / BN shift of pruned channels: not equal
    kernel_only = fwd(dict(variables, params=kernel_only_params), x)
    assert np.max(np.abs(np.asarray(kernel_only) - np.asarray(small_out))) > 1e-3


def test_couple_masks_zero_bias_and_bn_of_pruned_channels():
    model = get_model("cnn_bn", 10)
    params = random_variables(model, (16, 16, 1))["params"]
    masks, coupled = jax.jit(lambda p: (m := prune.magnitude_masks(
        p, 0.25, granularity="channel", filter_fn=shrink.shrinkable_filter(model)),
        shrink.couple_channel_masks(model, m)))(params)
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        pruned = ~np.asarray(masks[conv]["kernel"]).reshape(-1, np.shape(masks[conv]["kernel"])[-1]).any(0)
        assert pruned.sum() == round(0.25 * pruned.size)
        np.testing.assert_array_equal(np.asarray(coupled[bn]["scale"]), ~pruned)
        np.testing.assert_array_equal(np.asarray(coupled[bn]["bias"]), ~pruned)
        np.testing.assert_array_equal(np.asarray(coupled[conv]["kernel"]), np.asarray(masks[conv]["kernel"]))
    assert np.asarray(coupled["fc"]["bias"]).all()


def test_shrinkable_filter_selects_only_removable_widths():
    model = get_model("resnet20", 10)
    params = random_variables(model, (8, 8, 3))["params"]
    flags = {p for p, f in prune.named_leaves(shrink.shrinkable_filter(model)(params)) if f}
    assert flags == {f"stage{s}_block{b}/conv1/kernel" for s in (1, 2, 3) for b in (1, 2, 3)}
    lenet = get_model("lenet300_100", 10)
    lp = random_variables(lenet, (28, 28, 1))["params"]
    assert {p for p, f in prune.named_leaves(shrink.shrinkable_filter(lenet)(lp)) if f} == {
        "fc1/kernel", "fc2/kernel"}


def test_fully_pruned_layer_keeps_one_zero_channel_and_unstructured_zeros_survive():
    shape = (16, 16, 3)
    model = get_model("cnn3", 10, features=(8, 8, 8), hidden=16)
    variables = random_variables(model, shape, seed=3)
    params = variables["params"]

    @jax.jit
    def prepare(params):
        masks = prune.magnitude_masks(params, 0.3)  # unstructured everywhere
        masks["conv2"]["kernel"] = jnp.zeros_like(masks["conv2"]["kernel"])  # whole layer pruned
        return masks, prune.apply_masks(params, shrink.couple_channel_masks(model, masks))

    masks, coupled_params = prepare(params)
    small_model, small_vars = shrink.shrink(model, variables, masks)
    assert small_model.features[1] == 1
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2,) + shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(forward(small_model, small_vars, x)),
                               np.asarray(forward(model, dict(variables, params=coupled_params), x)),
                               atol=1e-4, rtol=0)
    fc2 = np.asarray(small_vars["params"]["fc2"]["kernel"])
    assert (fc2 == 0).sum() == (~np.asarray(masks["fc2"]["kernel"])).sum()


def test_dscnn_groups_carry_depthwise_channels_and_folded_form_shrinks():
    model = get_model("dscnn_bn", 10, features=(8, 16, 16))
    groups = shrink.channel_groups(model)
    assert [(g.producer, g.through, g.consumer, g.index, g.norms) for g in groups] == [
        ("conv1", ("dw1",), "pw1", 0, ("bn1", "bn_dw1")),
        ("pw1", ("dw2",), "pw2", 1, ("bn_pw1", "bn_dw2")),
        ("pw2", (), "fc", 2, ("bn_pw2",)),
    ]
    # BN folded (use_bn=False): the convs carry biases, the depthwise one's must go too.
    folded = model.clone(use_bn=False)
    assert all(g.norms == () for g in shrink.channel_groups(folded))
    shape = (8, 8, 1)
    variables = random_variables(folded, shape, seed=5)

    @fast_jit
    def prepare(params):
        masks = prune.magnitude_masks(params, 0.5, granularity="channel",
                                      filter_fn=shrink.shrinkable_filter(folded))
        coupled = shrink.couple_channel_masks(folded, masks)
        return masks, coupled, prune.apply_masks(params, coupled)

    masks, coupled, coupled_params = prepare(variables["params"])
    for g in groups[:2]:
        pruned = ~np.asarray(masks[g.producer]["kernel"]).reshape(-1, masks[g.producer]["kernel"].shape[-1]).any(0)
        assert pruned.sum() == pruned.size // 2
        dw = g.through[0]
        np.testing.assert_array_equal(np.asarray(coupled[dw]["bias"]), ~pruned)
        np.testing.assert_array_equal(np.asarray(coupled[dw]["kernel"]).reshape(9, -1).all(0), ~pruned)
        assert np.asarray(masks[dw]["kernel"]).all()  # the filter never selects depthwise kernels
    small_model, small_vars = shrink.shrink(folded, variables, masks)
    assert small_model.features == (4, 8, 8) and small_model.use_bn is False
    assert small_vars["params"]["dw2"]["kernel"].shape == (3, 3, 1, 8)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4,) + shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(forward(small_model, small_vars, x)),
                               np.asarray(forward(folded, dict(variables, params=coupled_params), x)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, shape, macs", [
    ("lenet300_100", (28, 28, 1), 266_200),  # PAPERS.md compute figures
    ("lenet5", (28, 28, 1), 2_293_000),
    ("cnn3", (32, 32, 3), 10_585_344),
    # conv1 28*28*9*32, (pool) dw1 14*14*9*32 + pw1 14*14*32*64, (pool) dw2 7*7*9*64 +
    # pw2 7*7*64*128, fc 128*10: a depthwise conv costs 9 MACs per output value, not 9*C.
    ("dscnn_bn", (28, 28, 1), 225_792 + 56_448 + 401_408 + 28_224 + 401_408 + 1_280),
])
def test_flops_counts_macs_analytically(name, shape, macs):
    model = get_model(name, 10)
    assert shrink.flops(model, shape) == macs
    assert shrink.flops(model, (4,) + shape) == 4 * macs


def test_flops_resnet20_close_to_paper():
    # 40.6M MACs in the paper (zero-padding shortcuts); our 1x1 projections add 2 x 131,072.
    macs = shrink.flops(get_model("resnet20", 10), (32, 32, 3))
    assert abs(macs - 262_144 - 40.6e6) < 0.05e6


def test_errors():
    class Other(nn.Module):
        pass

    with pytest.raises(ValueError, match=r"shrink does not know model 'Other'; supported: CNN3"):
        shrink.channel_groups(Other())
    model = get_model("cnn3", 10, features=(4, 4, 4), hidden=8)
    variables = random_variables(model, (8, 8, 3))
    masks = prune.mask_tree_like(variables["params"])
    del masks["fc1"]["bias"]
    with pytest.raises(ValueError, match=r"missing 'fc1/bias'"):
        shrink.shrink(model, variables, masks)
    with pytest.raises(ValueError, match=r"input_shape must be .* got \(8, 8\)"):
        shrink.flops(model, (8, 8))


def test_layer_matmul_shapes_are_positions_by_kernel_by_channels():
    model = get_model("cnn3", 10)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(lambda r, x: model.init(r, x, train=False), jax.random.key(0), x)
    shapes = dict(shrink.layer_matmul_shapes(model, variables, x))
    # conv1 runs on 8x8, conv2 on 4x4 after one pool, conv3 on 2x2; fc1 on the flattened 1x1x128.
    assert shapes == {"conv1": (2 * 8 * 8, 3 * 3 * 3, 32), "conv2": (2 * 4 * 4, 3 * 3 * 32, 64),
                      "conv3": (2 * 2 * 2, 3 * 3 * 64, 128), "fc1": (2, 128, 128), "fc2": (2, 128, 10)}
    assert sum(m * k * n for m, k, n in shapes.values()) == shrink.flops(model, (2, 8, 8, 3))
