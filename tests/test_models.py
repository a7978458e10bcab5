"""Tests for jaxaccel.models (the registry and the models it holds: cnn, lenet, resnet,
mobilenet): shapes, exact parameter counts, registry errors, dtypes, BN."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.models import MODELS, get_model, init_variables

KEY = jax.random.key(0)


def abstract(model, shape):
    """Variables' shapes without running (or compiling) the initialisers."""
    v = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1,) + shape), train=False), KEY)
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}


def n_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def apply(model, variables, x, train=False):
    if train:
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


@pytest.mark.parametrize(
    "name,shape,kwargs",
    [
        ("cnn3", (32, 32, 3), {}),
        ("cnn3", (28, 28, 1), {}),
        ("lenet300_100", (28, 28, 1), {}),
        ("lenet5", (28, 28, 1), {}),
        ("lenet5", (8, 8, 1), {"padding": "SAME"}),
        ("resnet20", (32, 32, 3), {}),
        ("cnn_bn", (28, 28, 1), {}),
        ("dscnn_bn", (28, 28, 1), {}),
    ],
)
def test_output_shape_and_dtype(name, shape, kwargs):
    model = get_model(name, 10, **kwargs)
    variables = init_variables(model, KEY, shape)
    assert set(variables) == {"params", "batch_stats"}
    x = jax.random.normal(KEY, (3,) + shape)
    y = apply(model, variables, x)
    assert y.shape == (3, 10) and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize(
    "name,shape,count",
    [
        ("cnn3", (32, 32, 3), 356_810),
        ("lenet300_100", (28, 28, 1), 266_610),
        ("lenet5", (28, 28, 1), 431_080),
        # Projection shortcuts (option B): 269,722 (option A, the paper's 0.27M) + 2,752.
        ("resnet20", (32, 32, 3), 272_474),
        ("cnn_bn", (28, 28, 1), 50_282),
        # conv1 9*32 + bn 2*32, dw1 9*32 + bn 2*32, pw1 32*64 + bn 2*64, dw2 9*64 + bn 2*64,
        # pw2 64*128 + bn 2*128, fc 128*10 + 10; global average pool: independent of H, W.
        ("dscnn_bn", (28, 28, 1), 13_322),
        ("dscnn_bn", (16, 16, 3), 13_322 + 2 * 9 * 32),  # conv1 reads 3 channels
    ],
)
def test_parameter_counts(name, shape, count):
    assert n_params(abstract(get_model(name, 10), shape)["params"]) == count


def test_init_variables_accepts_nhwc_and_rejects_bad_shape():
    model = get_model("cnn3", 10)
    a = init_variables(model, KEY, (32, 32, 3))
    b = init_variables(model, KEY, (4, 32, 32, 3))
    chex.assert_trees_all_equal(a, b)
    assert a["batch_stats"] == {}
    with pytest.raises(ValueError, match="input_shape"):
        init_variables(model, KEY, (32, 3))


def test_names_follow_contract():
    p = abstract(get_model("cnn3", 10), (32, 32, 3))["params"]
    assert sorted(p) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert p["conv2"]["kernel"].shape == (3, 3, 32, 64) and p["fc2"]["kernel"].shape == (128, 10)
    p = abstract(get_model("lenet300_100", 10), (28, 28, 1))["params"]
    assert sorted(p) == ["fc1", "fc2", "fc3"]
    p = abstract(get_model("lenet5", 10), (28, 28, 1))["params"]
    assert sorted(p) == ["conv1", "conv2", "fc1", "fc2"] and p["conv1"]["kernel"].shape == (5, 5, 1, 20)
    v = abstract(get_model("resnet20", 10), (32, 32, 3))
    blocks = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)]
    assert sorted(v["params"]) == sorted(["conv_init", "bn_init", "fc"] + blocks)
    for blk in blocks:
        has_proj = blk in ("stage2_block1", "stage3_block1")
        expected = {"conv1", "bn1", "conv2", "bn2"} | ({"proj_conv", "proj_bn"} if has_proj else set())
        assert set(v["params"][blk]) == expected
        assert set(v["batch_stats"][blk]["bn1"]) == {"mean", "var"}
    assert v["params"]["stage3_block1"]["proj_conv"]["kernel"].shape == (1, 1, 32, 64)
    assert "bias" not in v["params"]["stage1_block1"]["conv1"]
    p = abstract(get_model("cnn_bn", 10), (28, 28, 1))["params"]
    assert sorted(p) == ["bn1", "bn2", "conv1", "conv2", "fc"]
    v = abstract(get_model("dscnn_bn", 10), (28, 28, 1))
    assert sorted(v["params"]) == sorted(["conv1", "bn1", "dw1", "bn_dw1", "pw1", "bn_pw1",
                                          "dw2", "bn_dw2", "pw2", "bn_pw2", "fc"])
    assert sorted(v["batch_stats"]) == ["bn1", "bn_dw1", "bn_dw2", "bn_pw1", "bn_pw2"]
    p = v["params"]
    assert p["conv1"]["kernel"].shape == (3, 3, 1, 32)
    assert p["dw1"]["kernel"].shape == (3, 3, 1, 32) and p["dw2"]["kernel"].shape == (3, 3, 1, 64)  # depthwise
    assert p["pw1"]["kernel"].shape == (1, 1, 32, 64) and p["pw2"]["kernel"].shape == (1, 1, 64, 128)
    assert p["fc"]["kernel"].shape == (128, 10)
    assert all("bias" not in p[c] for c in ("conv1", "dw1", "pw1", "dw2", "pw2"))


def test_unknown_name_dtype_impl_field():
    with pytest.raises(ValueError, match=r"'vgg'.*cnn3.*resnet20"):
        get_model("vgg", 10)
    with pytest.raises(ValueError, match="'float64'"):
        get_model("cnn3", 10, dtype="float64")
    with pytest.raises(ValueError, match="'cudnn'"):
        get_model("cnn3", 10, conv_impl="cudnn")
    with pytest.raises(ValueError, match="bogus"):
        get_model("cnn3", 10, bogus=3)
    with pytest.raises(ValueError, match="width"):
        get_model("cnn3", 10, width=0.0)
    with pytest.raises(ValueError, match="inner_widths"):
        abstract(get_model("resnet20", 10, inner_widths=(4, 4)), (32, 32, 3))
    assert set(MODELS) == {"cnn3", "lenet300_100", "lenet5", "resnet20", "cnn_bn", "dscnn_bn"}
    with pytest.raises(ValueError, match=r"pool_after=\(0, 3\): \[3\] not in 0"):
        abstract(get_model("dscnn_bn", 10, pool_after=(0, 3)), (28, 28, 1))


# ResNet-20 variants run with -m slow: the dtype / batch-stats handling is the models' shared
# code (layers, batch_norm), covered by cnn3 / cnn_bn here; each ResNet-20 compile costs ~15 s.
@pytest.mark.parametrize("name,shape", [("cnn3", (16, 16, 3)),
                                        pytest.param("resnet20", (8, 8, 3), marks=pytest.mark.slow)])
def test_bfloat16_compute_float32_params_and_logits(name, shape):
    m32 = get_model(name, 10)
    m16 = get_model(name, 10, dtype="bfloat16")
    v = init_variables(m16, KEY, shape)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
    x = jax.random.normal(KEY, (2,) + shape)
    y16, y32 = apply(m16, v, x), apply(m32, v, x)
    assert y16.dtype == jnp.float32
    # Computed in bfloat16: close to, but not bit-identical with, the float32 result.
    assert not np.array_equal(np.asarray(y16), np.asarray(y32))
    np.testing.assert_allclose(y16, y32, atol=0.1 * float(jnp.abs(y32).max()) + 0.05)
    # The HLO really computes convs/dots in bfloat16.
    hlo = jax.jit(lambda v, x: m16.apply(v, x)).lower(v, x).as_text()
    assert "bf16" in hlo


@pytest.mark.parametrize("name,shape", [("cnn_bn", (28, 28, 1)), ("resnet20", (32, 32, 3)),
                                        ("dscnn_bn", (28, 28, 1))])
def test_use_bn_false_has_conv_biases_and_no_bn(name, shape):
    with_bn = abstract(get_model(name, 10), shape)
    without = init_variables(get_model(name, 10, use_bn=False), KEY, shape)
    assert without["batch_stats"] == {}
    flat_with = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(with_bn["params"])}
    flat_without = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(without["params"])}
    assert not any("bn" in p for p in flat_without)
    convs = {p.rsplit("/", 1)[0] for p in flat_with if p.endswith("kernel") and not p.startswith("fc")}
    assert convs
    for c in convs:
        assert f"{c}/kernel" in flat_without and f"{c}/bias" in flat_without
        assert f"{c}/bias" not in flat_with
    y = apply(get_model(name, 10, use_bn=False), without, jnp.ones((2,) + shape))
    assert y.shape == (2, 10)


def test_width_multiplier():
    p = abstract(get_model("cnn3", 10, width=0.5), (32, 32, 3))["params"]
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 16)
    assert p["conv3"]["kernel"].shape == (3, 3, 32, 64)
    assert p["fc1"]["kernel"].shape == (4 * 4 * 64, 64)
    p = abstract(get_model("lenet300_100", 10, width=0.001), (28, 28, 1))["params"]
    assert p["fc1"]["kernel"].shape == (784, 1)  # min width 1
    p = abstract(get_model("resnet20", 10, width=2.0), (32, 32, 3))["params"]
    assert p["stage3_block3"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    # Explicit fields win over the multiplier; inner widths are per block.
    inner = (4, 5, 6, 7, 8, 9, 10, 11, 12)
    p = abstract(get_model("resnet20", 10, width=2.0, inner_widths=inner), (32, 32, 3))["params"]
    assert p["stage2_block2"]["conv1"]["kernel"].shape == (3, 3, 64, 8)
    assert p["stage2_block2"]["conv2"]["kernel"].shape == (3, 3, 8, 64)
    p = abstract(get_model("cnn3", 10, width=0.5, features=(8, 8, 8)), (32, 32, 3))["params"]
    assert p["conv3"]["kernel"].shape == (3, 3, 8, 8) and p["fc1"]["kernel"].shape == (128, 64)
    # dscnn_bn: the depthwise convs follow the (scaled) widths of their inputs.
    p = abstract(get_model("dscnn_bn", 10, width=0.5), (28, 28, 1))["params"]
    assert p["conv1"]["kernel"].shape == (3, 3, 1, 16) and p["dw2"]["kernel"].shape == (3, 3, 1, 32)
    assert p["pw2"]["kernel"].shape == (1, 1, 32, 64) and p["fc"]["kernel"].shape == (64, 10)


@pytest.mark.parametrize("name,shape", [("cnn_bn", (12, 12, 1)),
                                        pytest.param("resnet20", (8, 8, 3), marks=pytest.mark.slow)])
def test_batch_stats_update_in_train_mode_only(name, shape):
    model = get_model(name, 10)
    v = init_variables(model, KEY, shape)
    x = 3.0 + 2.0 * jax.random.normal(KEY, (4,) + shape)
    y, updates = apply(model, v, x, train=True)
    assert y.shape == (4, 10)
    old, new = jax.tree.leaves(v["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
    assert len(old) == len(new) and all(not np.allclose(a, b) for a, b in zip(old, new))
    # Eval mode uses running statistics and is deterministic per example.
    y_eval = apply(model, v, x)
    y_eval_one = apply(model, v, x[:1])
    np.testing.assert_allclose(y_eval[:1], y_eval_one, rtol=1e-5, atol=1e-5)


def test_bn_axis_name_syncs_statistics_across_devices():
    model = get_model("cnn_bn", 10, bn_axis_name="batch")
    v = init_variables(model, KEY, (8, 8, 1))
    n = min(2, jax.local_device_count())
    x = jax.random.normal(KEY, (n, 4, 8, 8, 1)) + jnp.arange(n, dtype=jnp.float32)[:, None, None, None, None]
    _, upd = jax.pmap(lambda x: model.apply(v, x, train=True, mutable=["batch_stats"]), axis_name="batch")(x)
    means = upd["batch_stats"]["bn1"]["mean"]
    np.testing.assert_allclose(means[0], means[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,shape", [("cnn3", (32, 32, 3)), ("lenet5", (28, 28, 1)), ("cnn_bn", (16, 16, 1)),
                                        ("dscnn_bn", (12, 12, 1))])
def test_every_conv_impl_same_params_and_same_forward_and_grads(name, shape):
    from jaxaccel.models.conv_impls import CONV_IMPLS

    models = {impl: get_model(name, 10, conv_impl=impl) for impl in CONV_IMPLS}
    trees = {impl: abstract(m, shape) for impl, m in models.items()}
    for impl in CONV_IMPLS:
        assert trees[impl] == trees["xla"], impl  # checkpoints are interchangeable
    v = init_variables(models["xla"], KEY, shape)
    if name == "dscnn_bn":
        # BN shifts away from their init 0: with beta = 0 a BN scale whose channel goes through
        # ReLU, pooling and a depthwise conv into a train-mode BN is normalised away, so its
        # gradient is exactly 0 and only rounding noise would be compared.
        v["params"] = {k: dict(p, bias=p["bias"] + 0.1) if k.startswith("bn") else p for k, p in v["params"].items()}
    x = jax.random.normal(jax.random.key(1), (3,) + shape)
    labels = jnp.arange(3) % 10

    @jax.jit
    def all_impls(params, x):
        out = {}
        for impl, m in models.items():
            def loss(p, x, m=m):
                logits, _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                    mutable=["batch_stats"])
                return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels]), logits
            (g_p, g_x), logits = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            out[impl] = {"logits": logits, "grad_params": g_p, "grad_input": g_x}
        return out

    res = all_impls(v["params"], x)
    for impl in CONV_IMPLS:
        for a, e in zip(jax.tree.leaves(res[impl]), jax.tree.leaves(res["xla"])):
            a, e = np.asarray(a), np.asarray(e)
            assert np.abs(a - e).max() <= 1e-4 * np.abs(e).max(), impl


def test_resnet20_cpu_path_matches_xla():
    """Covers the 'cpu' path's strided, 1x1 and materialised-input native convs inside BN blocks."""
    shape = (8, 8, 3)
    models = {impl: get_model("resnet20", 10, conv_impl=impl) for impl in ("xla", "cpu")}
    v = init_variables(models["xla"], KEY, shape)
    x = jax.random.normal(jax.random.key(1), (4,) + shape)

    @jax.jit
    def both(params, x):
        out = {}
        for impl, m in models.items():
            def loss(p, x, m=m):
                logits, upd = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats"])
                return -jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, upd)
            out[impl] = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return out

    res = both(v["params"], x)
    for a, e in zip(jax.tree.leaves(res["cpu"]), jax.tree.leaves(res["xla"])):
        a, e = np.asarray(a), np.asarray(e)
        assert np.linalg.norm(a - e) <= 1e-4 * np.linalg.norm(e) + 1e-7


def test_microbatch_field_does_not_change_results():
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    base = get_model("cnn3", 10, conv_impl="cpu", microbatch=8)  # one micro-batch
    split = get_model("cnn3", 10, conv_impl="cpu", microbatch=2)  # four interleaved micro-batches
    v = init_variables(base, KEY, (16, 16, 3))

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)))(v["params"])

    def forward(m):
        return jax.jit(lambda v: m.apply(v, x))(v)

    np.testing.assert_allclose(forward(split), forward(base), rtol=1e-6, atol=1e-6)
    for a, e in zip(jax.tree.leaves(grads(split)), jax.tree.leaves(grads(base))):
        assert np.abs(np.asarray(a) - np.asarray(e)).max() <= 1e-5 * np.abs(np.asarray(e)).max()
    with pytest.raises(ValueError, match="microbatch"):
        get_model("cnn3", 10, conv_impl="cpu", microbatch=0).apply(v, x)
