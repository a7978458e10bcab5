"""Tests for jaxaccel.compress.prune: exact counts, N:M, monotonicity, jit, sharding, optimizer."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxaccel.compress import prune

SETTINGS = settings(max_examples=15, deadline=None)


@functools.lru_cache(maxsize=None)
def _jitted(items):
    kwargs = dict(items)
    return jax.jit(lambda p, s, prior=None: prune.magnitude_masks(p, s, prior_masks=prior, **kwargs))


DEFAULTS = dict(scope="layer", granularity="unstructured", norm=1, distribution="uniform", n=2, m=4)


def masks_jit(params, sparsity, prior_masks=None, **kwargs):
    """magnitude_masks compiled once per keyword set (shapes are fixed), so examples are cheap."""
    return _jitted(tuple(sorted({**DEFAULTS, **kwargs}.items())))(params, sparsity, prior_masks)


def expected_pruned(sparsity, size):
    return int(np.round(np.float32(sparsity) * np.float32(size)))


def make_params(seed=0, ties=False, cin=8):
    """A small conv+dense tree shaped like the project's models (with bias/BN leaves)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        x = rng.integers(-3, 4, size=shape) if ties else rng.normal(size=shape)
        return jnp.asarray(x, jnp.float32)

    return {
        "conv1": {"kernel": w(3, 3, cin, 8), "bias": w(8)},
        "bn1": {"scale": w(8), "bias": w(8)},
        "conv2": {"kernel": w(3, 3, 8, 16), "bias": w(16)},
        "fc1": {"kernel": w(64, 16), "bias": w(16)},
        "fc2": {"kernel": w(16, 8), "bias": w(8)},
    }


KERNELS = ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"]


def leaves(tree):
    return dict(prune.named_leaves(tree))


def pruned_count(mask):
    return int(np.size(mask) - np.count_nonzero(np.asarray(mask)))


# ----------------------------------------------------------------------------- counts


@SETTINGS
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.0, 0.99), ties=st.booleans())
def test_unstructured_layer_exact_count_and_smallest(seed, sparsity, ties):
    params = make_params(seed, ties)
    masks = leaves(masks_jit(params, sparsity))
    for path, w in leaves(params).items():
        mk = np.asarray(masks[path])
        assert mk.dtype == bool and mk.shape == w.shape
        if path in KERNELS:
            assert pruned_count(mk) == expected_pruned(sparsity, w.size), path
            a = np.abs(np.asarray(w))
            if mk.any() and (~mk).any():
                assert a[~mk].max() <= a[mk].min()
        else:
            assert mk.all(), path


@SETTINGS
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.0, 0.99), ties=st.booleans())
def test_unstructured_global_exact_count_and_threshold(seed, sparsity, ties):
    params = make_params(seed, ties)
    masks = leaves(masks_jit(params, sparsity, scope="global"))
    ws = leaves(params)
    total = sum(ws[p].size for p in KERNELS)
    assert sum(pruned_count(masks[p]) for p in KERNELS) == expected_pruned(sparsity, total)
    a = np.concatenate([np.abs(np.asarray(ws[p])).ravel() for p in KERNELS])
    mk = np.concatenate([np.asarray(masks[p]).ravel() for p in KERNELS])
    if mk.any() and (~mk).any():
        assert a[~mk].max() <= a[mk].min()
    assert all(np.asarray(masks[p]).all() for p in ws if p not in KERNELS)


@SETTINGS
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.0, 0.99), norm=st.sampled_from([1, 2]),
       ties=st.booleans())
def test_channel_exact_count_whole_channels_by_norm(seed, sparsity, norm, ties):
    params = make_params(seed, ties)
    masks = leaves(masks_jit(params, sparsity, granularity="channel", norm=norm))
    for path in KERNELS:
        w = np.asarray(leaves(params)[path])
        mk = np.asarray(masks[path]).reshape(-1, w.shape[-1])
        kept = mk.all(0)
        assert (kept | ~mk.any(0)).all(), "channels are all-kept or all-pruned"
        assert int((~kept).sum()) == expected_pruned(sparsity, w.shape[-1])
        flat = w.reshape(-1, w.shape[-1])
        score = np.abs(flat).sum(0) if norm == 1 else np.sqrt((flat ** 2).sum(0))
        if kept.any() and (~kept).any():
            assert score[~kept].max() <= score[kept].min() + 1e-5


def test_channel_norm_choice_matters():
    # channel 0: L1 = 4 (four 1s), L2 = 2; channel 1: L1 = 3, L2 = 3 (one 3).
    k = jnp.asarray([[1.0, 3.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    params = {"fc1": {"kernel": k}}
    m1 = prune.magnitude_masks(params, 0.5, granularity="channel", norm=1)["fc1"]["kernel"]
    m2 = prune.magnitude_masks(params, 0.5, granularity="channel", norm=2)["fc1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(m1).all(0), [True, False])
    np.testing.assert_array_equal(np.asarray(m2).all(0), [False, True])


@SETTINGS
@given(seed=st.integers(0, 10_000), nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (4, 4)]), ties=st.booleans())
def test_nm_invariant_in_every_group(seed, nm, ties):
    n, m = nm
    params = make_params(seed, ties)
    masks = leaves(masks_jit(params, None, granularity="n:m", n=n, m=m))
    for path in KERNELS:
        w = np.asarray(leaves(params)[path])
        mk = np.asarray(masks[path])
        groups_mask = mk.reshape(w.shape[:-2] + (w.shape[-2] // m, m, w.shape[-1]))
        assert (groups_mask.sum(-2) == n).all(), path
        groups_w = np.abs(w).reshape(groups_mask.shape)
        kept_min = np.where(groups_mask, groups_w, np.inf).min(-2)
        pruned_max = np.where(groups_mask, -np.inf, groups_w).max(-2)
        assert (pruned_max <= kept_min).all()


def test_nm_groups_run_along_input_axis():
    # 1:2 on a (4, 1) dense kernel: groups are rows {0,1} and {2,3}.
    k = jnp.asarray([[1.0], [2.0], [4.0], [3.0]])
    mk = prune.magnitude_masks({"fc1": {"kernel": k}}, 0.5, granularity="n:m", n=1, m=2)
    np.testing.assert_array_equal(np.asarray(mk["fc1"]["kernel"])[:, 0], [False, True, True, False])


# ----------------------------------------------------------------------------- monotone


@SETTINGS
@given(seed=st.integers(0, 10_000), s1=st.floats(0.0, 0.99), s2=st.floats(0.0, 0.99),
       ties=st.booleans(),
       kind=st.sampled_from([("layer", "unstructured"), ("global", "unstructured"),
                             ("layer", "channel")]))
def test_masks_are_monotone_in_sparsity(seed, s1, s2, ties, kind):
    lo, hi = sorted((s1, s2))
    params = make_params(seed, ties)
    scope, gran = kind
    m_lo = masks_jit(params, lo, scope=scope, granularity=gran)
    m_hi = masks_jit(params, hi, scope=scope, granularity=gran)
    for a, b in zip(jax.tree.leaves(m_hi), jax.tree.leaves(m_lo)):
        assert not np.any(np.asarray(a) & ~np.asarray(b))


@SETTINGS
@given(seed=st.integers(0, 10_000), s1=st.floats(0.0, 0.9), s2=st.floats(0.0, 0.9),
       gran=st.sampled_from(["unstructured", "channel"]))
def test_prior_masks_give_subset_and_exact_count(seed, s1, s2, gran):
    params = make_params(seed)
    prior = masks_jit(params, s1, granularity=gran)
    # perturb weights so the new ranking differs from the prior one
    moved = jax.tree.map(lambda w: w + 0.5 * jnp.sin(w * 7.0), params)
    new = masks_jit(moved, s2, prior, granularity=gran)
    for path in KERNELS:
        a, b = np.asarray(leaves(new)[path]), np.asarray(leaves(prior)[path])
        assert not np.any(a & ~b)
        size = a.size if gran == "unstructured" else a.shape[-1]
        units = pruned_count(a) if gran == "unstructured" else int((~a.reshape(-1, a.shape[-1]).all(0)).sum())
        prior_units = pruned_count(b) if gran == "unstructured" else int((~b.reshape(-1, b.shape[-1]).all(0)).sum())
        assert units == max(expected_pruned(s2, size), prior_units)


# ----------------------------------------------------------------------------- distributions


def test_erk_hits_target_and_follows_formula():
    params = make_params(1)
    target = 0.8
    masks = leaves(masks_jit(params, target, distribution="erk"))
    ws = leaves(params)
    sizes = np.array([ws[p].size for p in KERNELS])
    kept = np.array([np.count_nonzero(np.asarray(masks[p])) for p in KERNELS])
    assert abs(1 - kept.sum() / sizes.sum() - target) < 2e-3 * len(KERNELS)
    density = kept / sizes
    raw = np.array([sum(ws[p].shape) / ws[p].size for p in KERNELS])
    free = density < 1
    ratio = density[free] / raw[free]
    np.testing.assert_allclose(ratio, ratio[0], rtol=0.05)
    assert density.max() <= 1.0
    # fc2 (16x8, few params per dim) is kept denser than conv2 (3x3x8x16)
    assert density[3] > 3 * density[1]


def test_erk_makes_small_layers_dense_and_rescales_the_rest():
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((64, 64))}}
    masks = masks_jit(params, 0.5, distribution="erk")
    assert np.asarray(masks["a"]["kernel"]).all()
    kept = 4 + np.count_nonzero(np.asarray(masks["b"]["kernel"]))
    assert abs(kept - 0.5 * (4 + 64 * 64)) <= 1


def test_per_layer_overrides_and_unknown_path_error():
    params = make_params(2)
    masks = leaves(prune.magnitude_masks(params, 0.5, per_layer={"fc2/kernel": 0.25}))
    assert pruned_count(masks["fc2/kernel"]) == expected_pruned(0.25, 16 * 8)
    assert pruned_count(masks["fc1/kernel"]) == expected_pruned(0.5, 64 * 16)
    with pytest.raises(ValueError, match=r"'fc3/kernel'.*valid:.*conv1/kernel"):
        prune.magnitude_masks(params, 0.5, per_layer={"fc3/kernel": 0.1})
    with pytest.raises(ValueError, match=r"'conv1/bias'"):
        prune.magnitude_masks(params, 0.5, per_layer={"conv1/bias": 0.1})
    with pytest.raises(ValueError, match=r"per_layer\['fc2/kernel'\]=1.5"):
        prune.magnitude_masks(params, 0.5, per_layer={"fc2/kernel": 1.5})


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), r"sparsity=1.0 outside \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity=-0.1"),
    (dict(sparsity=float("nan")), r"sparsity=nan"),
    (dict(sparsity=0.5, scope="local"), r"scope='local'.*'layer', 'global'"),
    (dict(sparsity=0.5, granularity="block"), r"granularity='block'.*'unstructured', 'channel', 'n:m'"),
    (dict(sparsity=0.5, distribution="er"), r"distribution='er'.*'uniform', 'erk'"),
    (dict(sparsity=0.5, norm=3), r"norm=3"),
    (dict(sparsity=None, granularity="n:m", n=5, m=4), r"n=5, m=4"),
    (dict(sparsity=None, granularity="n:m", n=0, m=4), r"n=0"),
    (dict(sparsity=0.9, granularity="n:m", n=2, m=4), r"sparsity=0.9"),
    (dict(sparsity=None, granularity="n:m", n=2, m=4, distribution="erk"), r"distribution='erk'"),
    (dict(sparsity=0.5, scope="global", granularity="channel"), r"scope='global'"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune.magnitude_masks(make_params(), **kwargs)


def test_nm_indivisible_input_dim_names_leaf():
    with pytest.raises(ValueError, match=r"'conv1/kernel'.*input dim 3"):
        prune.magnitude_masks(make_params(cin=3), None, granularity="n:m")
    # excluding the first layer makes it work
    masks = prune.magnitude_masks(make_params(cin=3), None, granularity="n:m",
                                  filter_fn=prune.default_filter(skip_first=True))
    assert np.asarray(masks["conv1"]["kernel"]).all()


def test_mask_tree_mismatch_raises():
    params = make_params()
    masks = prune.mask_tree_like(params)
    del masks["fc2"]["kernel"]
    with pytest.raises(ValueError, match=r"missing 'fc2/kernel'"):
        prune.apply_masks(params, masks)
    masks = prune.mask_tree_like(params)
    masks["fc2"]["kernel"] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match=r"masks\['fc2/kernel'\] has shape \(3, 3\)"):
        prune.apply_masks(params, masks)
    with pytest.raises(ValueError, match=r"prior_masks.*'fc2/kernel'"):
        prune.magnitude_masks(params, 0.5, prior_masks=masks)


# ----------------------------------------------------------------------------- filters


MODEL_TREES = {  # top-level names of the project's models -> (first, last)
    "cnn3": (["conv1", "conv2", "conv3", "fc1", "fc2"], "conv1", "fc2"),
    "lenet300_100": (["fc1", "fc2", "fc3"], "fc1", "fc3"),
    "lenet5": (["conv1", "conv2", "fc1", "fc2"], "conv1", "fc2"),
    "cnn_bn": (["conv1", "bn1", "conv2", "bn2", "fc"], "conv1", "fc"),
    "resnet20": (["conv_init", "bn_init", "stage1_block1", "stage3_block3", "fc"], "conv_init", "fc"),
    "dscnn_bn": (["conv1", "bn1", "dw1", "bn_dw1", "pw1", "bn_pw1", "dw2", "bn_dw2", "pw2", "bn_pw2", "fc"],
                 "conv1", "fc"),
}


def skeleton(names):
    tree = {}
    for name in names:
        if name.startswith("bn"):
            tree[name] = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
        elif name.startswith("stage"):
            tree[name] = {"conv1": {"kernel": jnp.ones((3, 3, 4, 4))}, "bn1": {"scale": jnp.ones(4)},
                          "conv2": {"kernel": jnp.ones((3, 3, 4, 4))}}
        else:
            tree[name] = {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}
    return tree


@pytest.mark.parametrize("model", sorted(MODEL_TREES))
def test_default_filter_first_last_by_name(model):
    names, first, last = MODEL_TREES[model]
    params = skeleton(names)
    every = leaves(prune.default_filter()(params))
    assert {p for p, f in every.items() if f} == {p for p in every if p.endswith("kernel")}
    for skip_first, skip_last in [(True, False), (False, True), (True, True)]:
        flags = leaves(prune.default_filter(skip_first=skip_first, skip_last=skip_last)(params))
        off = {p for p, f in every.items() if f and not flags[p]}
        want = ({f"{first}/kernel"} if skip_first else set()) | ({f"{last}/kernel"} if skip_last else set())
        assert off == want


def test_default_filter_unknown_names_need_layer_order():
    params = {"enc": {"kernel": jnp.ones((4, 4))}, "dec": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match="first layer.*layer_order"):
        prune.default_filter(skip_first=True)(params)
    flags = prune.default_filter(skip_first=True, layer_order=["enc", "dec"])(params)
    assert flags == {"enc": {"kernel": False}, "dec": {"kernel": True}}
    with pytest.raises(ValueError, match=r"'mid/kernel'.*valid"):
        prune.default_filter(skip_last=True, layer_order=["enc", "mid"])(params)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="mm")(x)


class _Backwards(nn.Module):
    """Names sort opposite to call order, and a layer sits inside a submodule."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6, name="zz_in")(x)
        x = nn.LayerNorm(name="norm")(x)
        x = _Block(name="block")(x)
        return nn.Dense(3, name="aa_out")(x)


def test_execution_order_follows_calls_not_names():
    model = _Backwards()
    x = jnp.ones((2, 4))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    order = prune.execution_order(model, variables, x, train=False)
    assert order == ["zz_in", "block/mm", "aa_out"]
    flags = leaves(prune.default_filter(skip_first=True, skip_last=True, layer_order=order)(variables["params"]))
    assert [p for p, f in flags.items() if f] == ["block/mm/kernel"]


def test_default_filter_on_dscnn_matches_execution_order_and_prunes_depthwise_channels():
    from jaxaccel.models import get_model

    model = get_model("dscnn_bn", 10, features=(8, 16, 16))
    x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    order = prune.execution_order(model, variables, x, train=False)
    assert order == ["conv1", "dw1", "pw1", "dw2", "pw2", "fc"]
    by_name = leaves(prune.default_filter(skip_first=True, skip_last=True)(variables["params"]))
    by_order = leaves(prune.default_filter(skip_first=True, skip_last=True, layer_order=order)(variables["params"]))
    assert by_name == by_order
    assert {p for p, f in by_name.items() if f} == {"dw1/kernel", "pw1/kernel", "dw2/kernel", "pw2/kernel"}
    # channel granularity on a depthwise kernel (3, 3, 1, C): whole 9-tap channels
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), variables["params"])
    dw = masks_jit(params, 0.25, granularity="channel")["dw2"]["kernel"]
    per_channel = np.asarray(dw).reshape(9, 16)
    assert (per_channel.all(0) | ~per_channel.any(0)).all() and (~per_channel.any(0)).sum() == 4


# ----------------------------------------------------------------------------- jit + sharding


def sharded_cases():
    mesh = Mesh(np.array(jax.devices()), ("data",))

    def fsdp(x):  # shard the largest dim divisible by the device count, like an FSDP rule
        dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % 8 == 0]
        spec = [None] * x.ndim
        if dims:
            spec[int(dims[0])] = "data"
        return NamedSharding(mesh, P(*spec))

    return {"data": lambda x: NamedSharding(mesh, P()), "fsdp": fsdp}


@pytest.mark.parametrize("strategy, kwargs", [
    ("data", dict()), ("data", dict(distribution="erk")), ("fsdp", dict()),
    ("fsdp", dict(scope="global")), ("fsdp", dict(granularity="channel", norm=2)),
    ("fsdp", dict(granularity="n:m", sparsity=None))])
def test_sharded_jitted_masks_equal_eager_and_follow_param_sharding(strategy, kwargs):
    """jit with a traced sparsity on sharded params == eager on unsharded params (ties too)."""
    assert jax.device_count() == 8
    params = make_params(4, ties=True)
    shardings = jax.tree.map(sharded_cases()[strategy], params)
    sharded = jax.device_put(params, shardings)
    kwargs = dict(kwargs)
    s = kwargs.pop("sparsity", 0.6)
    fn = jax.jit(lambda p, s: prune.magnitude_masks(p, s, **kwargs))
    out = fn(sharded, s)
    chex.assert_trees_all_equal(out, masks_jit(params, s, **kwargs))
    for path, mk in leaves(out).items():
        want = leaves(shardings)[path]
        assert mk.sharding.is_equivalent_to(want, mk.ndim), (path, mk.sharding, want)
    if strategy == "fsdp":  # something really was sharded
        assert any(not m.sharding.is_fully_replicated for m in jax.tree.leaves(out))


def test_sharded_masks_outside_jit_follow_param_sharding():
    params = make_params(4)
    shardings = jax.tree.map(sharded_cases()["fsdp"], params)
    sharded = jax.device_put(params, shardings)
    masks = prune.magnitude_masks(sharded, 0.6)
    chex.assert_trees_all_equal(masks, prune.magnitude_masks(params, 0.6))
    chex.assert_trees_all_equal(masks, masks_jit(params, 0.6))  # eager == jit with traced sparsity
    initial = jax.jit(prune.masked(optax.sgd(0.1)).init)(sharded).masks  # all-True, same layout
    for path, mk in leaves(masks).items():
        assert mk.sharding.is_equivalent_to(leaves(shardings)[path], mk.ndim), path
        assert leaves(initial)[path].sharding.is_equivalent_to(leaves(shardings)[path], mk.ndim), path


# ----------------------------------------------------------------------------- helpers


def test_apply_masks_summary_and_mask_tree_like():
    params = make_params(5)
    masks = prune.magnitude_masks(params, 0.5)
    pruned = prune.apply_masks(params, masks)
    for path, w in leaves(pruned).items():
        mk = np.asarray(leaves(masks)[path])
        assert (np.asarray(w)[~mk] == 0).all()
        np.testing.assert_array_equal(np.asarray(w)[mk], np.asarray(leaves(params)[path])[mk])
        assert w.dtype == leaves(params)[path].dtype
    summary = prune.sparsity_summary(params, masks)
    row = summary["leaves"]["fc1/kernel"]
    assert row == {"size": 1024, "nonzeros": 512, "sparsity": 0.5}
    assert summary["leaves"]["fc1/bias"]["sparsity"] == 0.0
    size = sum(np.size(x) for x in jax.tree.leaves(params))
    assert summary["total"]["size"] == size
    assert summary["total"]["nonzeros"] == size - sum(pruned_count(m) for m in jax.tree.leaves(masks))
    assert prune.sparsity_summary(params)["total"]["sparsity"] == 0.0
    ones = prune.mask_tree_like(params)
    zeros = prune.mask_tree_like(params, False)
    assert all(np.asarray(x).all() and x.dtype == bool for x in jax.tree.leaves(ones))
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(zeros))
    chex.assert_trees_all_equal_shapes(ones, params)


# ----------------------------------------------------------------------------- optimizer


def mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {"fc1": {"kernel": f32(12, 16), "bias": f32(16)},
            "fc2": {"kernel": f32(16, 4), "bias": jnp.zeros(4)}}


OPTIMIZERS = {
    "sgd_nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_optimizer_keeps_pruned_exactly_zero(name):
    params = mlp_params()
    masks = prune.magnitude_masks(params, 0.7)
    tx, ref_tx = prune.masked(OPTIMIZERS[name]()), OPTIMIZERS[name]()

    def step(i, carry):
        params, state, ref_params, ref_state, worst = carry
        key = jax.random.fold_in(jax.random.key(1), i)
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
        updates, state = tx.update(grads, state, params)
        ref_updates, ref_state = ref_tx.update(prune.apply_masks(grads, masks), ref_state, ref_params)
        params = optax.apply_updates(params, updates)
        for p, mk in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
            worst = jnp.maximum(worst, jnp.max(jnp.where(mk, 0.0, jnp.abs(p))))
        return params, state, optax.apply_updates(ref_params, ref_updates), ref_state, worst

    init = (params, prune.set_masks(tx.init(params), masks), params, ref_tx.init(params), jnp.float32(0))
    # (compiled at XLA:CPU optimisation level 0: a fraction of the compile time, same ops)
    run = jax.jit(lambda c: jax.lax.fori_loop(0, 100, step, c)).lower(init).compile(
        {"xla_backend_optimization_level": 0})
    params, state, ref_params, ref_state, worst = run(init)
    assert float(worst) == 0.0, "a pruned weight was nonzero after some step"
    for p, r, mk in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), jax.tree.leaves(masks)):
        mk = np.asarray(mk)
        assert (np.asarray(p)[~mk] == 0.0).all()
        # same values up to float rounding differences between the two fused programs
        np.testing.assert_allclose(np.asarray(p)[mk], np.asarray(r)[mk], rtol=1e-5, atol=1e-5)
    # the inner optimizer saw masked gradients (its moments equal the reference's)
    chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-5, atol=1e-6)
    # the reference's pruned entries did move (weight decay/momentum), so the test can fail
    assert any(np.any(np.asarray(r)[~np.asarray(mk)] != 0)
               for r, mk in zip(jax.tree.leaves(ref_params), jax.tree.leaves(masks)))


def test_get_set_masks_find_state_in_nested_chain():
    params = mlp_params()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.inject_hyperparams(lambda lr: prune.masked(optax.adam(lr)))(lr=1e-3))
    state = tx.init(params)
    assert all(np.asarray(m).all() for m in jax.tree.leaves(prune.get_masks(state)))
    masks = prune.magnitude_masks(params, 0.5)
    state2 = prune.set_masks(state, masks)
    chex.assert_trees_all_equal(prune.get_masks(state2), masks)
    assert jax.tree.structure(state2) == jax.tree.structure(state)
    with pytest.raises(ValueError, match="found 0"):
        prune.get_masks(optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="missing 'fc1/bias'"):
        prune.set_masks(state, {"fc1": {"kernel": masks["fc1"]["kernel"]}, "fc2": masks["fc2"]})
    with pytest.raises(ValueError, match="needs params"):
        prune.masked(optax.sgd(0.1)).update(params, state[1].inner_state)


def test_masked_state_round_trips_through_orbax(tmp_path):
    import orbax.checkpoint as ocp

    params = mlp_params()
    state = prune.set_masks(prune.masked(optax.adam(1e-3)).init(params), prune.magnitude_masks(params, 0.5))
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True)) as mgr:
        mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        mgr.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = mgr.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    assert isinstance(restored, prune.MaskedState)
    chex.assert_trees_all_equal(restored, state)


def test_masks_recomputed_inside_jitted_step_with_schedule_value():
    params = mlp_params(2)
    tx = prune.masked(optax.sgd(0.1))

    @jax.jit
    def step(params, state, sparsity):
        state = prune.set_masks(state, prune.magnitude_masks(params, sparsity))
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for s in (0.25, 0.5):
        params, state = step(params, state, jnp.float32(s))
    kernels = params["fc1"]["kernel"]
    assert int(jnp.sum(kernels == 0)) == expected_pruned(0.5, kernels.size)
