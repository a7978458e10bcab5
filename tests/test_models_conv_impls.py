"""jaxaccel.models.conv_impls: every conv_impl's conv and max-pool equal plain XLA (values and
gradients); resolution of the names, micro-batches, the Winograd conv."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxaccel.kernels import winograd
from jaxaccel.models import conv_impls
from jaxaccel.models.conv_impls import CONV_IMPLS, conv, max_pool, max_pool_2d, resolve_conv_impl

FAST_IMPLS = [i for i in CONV_IMPLS if i not in ("auto", "xla")]
RTOL = 1e-4


def assert_rel_close(actual, expected, rtol=RTOL):
    """max |a - e| <= rtol * max |e|, leaf by leaf."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        scale = max(np.abs(e).max(), 1e-30)
        assert np.abs(a - e).max() <= rtol * scale, (np.abs(a - e).max(), scale)


def check_all_impls_match_xla(x, kernel, features, padding, strides=1, use_bias=True, groups=1):
    """Values and grads (kernel, bias, input) of every fast impl vs "xla", in one compiled program."""
    layers_by_impl = {
        impl: conv(features, kernel, padding=padding, strides=strides, use_bias=use_bias, conv_impl=impl,
                   feature_group_count=groups)
        for impl in ["xla"] + FAST_IMPLS
    }
    shapes = {impl: jax.eval_shape(l.init, jax.random.key(1), x)["params"] for impl, l in layers_by_impl.items()}
    for impl in FAST_IMPLS:  # identical parameter trees
        assert shapes[impl] == shapes["xla"], impl
    keys = iter(jax.random.split(jax.random.key(1), 8))
    params = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape), shapes["xla"])
    cot = jax.random.normal(jax.random.key(2), jax.eval_shape(layers_by_impl["xla"].apply, {"params": params}, x).shape)

    @jax.jit
    def all_results(p, x):
        out = {}
        for impl, layer in layers_by_impl.items():
            def f(p, x, layer=layer):
                y = layer.apply({"params": p}, x)
                return jnp.sum(y * cot), y
            grads, y = jax.grad(f, argnums=(0, 1), has_aux=True)(p, x)
            out[impl] = (y, grads)
        return out

    results = all_results(params, x)
    for impl in FAST_IMPLS:
        assert_rel_close(results[impl], results["xla"])
    return results["xla"][0]


@pytest.mark.parametrize(
    "shape,kernel,features,padding",
    [
        ((3, 8, 8, 1), 3, 4, "SAME"),
        ((2, 9, 7, 3), 3, 5, "SAME"),  # odd, non-square
        ((2, 9, 7, 3), 3, 5, "VALID"),
        ((2, 6, 6, 32), 3, 8, "SAME"),
        ((2, 11, 11, 1), 5, 6, "VALID"),  # lenet5-like
        ((2, 7, 7, 3), 1, 4, "VALID"),
        ((2, 7, 7, 2), 3, 4, ((2, 0), (1, 1))),  # explicit asymmetric padding
    ],
)
def test_conv_matches_xla_values_and_grads(shape, kernel, features, padding):
    x = jax.random.normal(jax.random.key(0), shape)
    check_all_impls_match_xla(x, kernel, features, padding)


@pytest.mark.parametrize("strides,kernel", [(2, 3), (2, 1)])
def test_conv_strided_falls_back_and_matches(strides, kernel):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    y = check_all_impls_match_xla(x, kernel, 6, "SAME", strides=strides, use_bias=False)
    assert y.shape == (2, 4, 4, 6)


def test_im2col_patches_layout_matches_kernel_order():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    p = conv_impls.im2col_patches(x, (3, 3), ((1, 1), (1, 1)))
    assert p.shape == (2 * 5 * 6, 27)
    y = (p @ k.reshape(27, 4)).reshape(2, 5, 6, 4)
    ref = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert_rel_close(y, ref)


def test_fast_conv_compiles_to_no_native_conv_for_small_patches():
    """The im2col path really replaces the conv: the compiled parameter gradient has no convolution."""
    x = jnp.ones((2, 8, 8, 3))
    for impl, has_conv in (("xla", True), ("im2col", False), ("cpu", False)):
        layer = conv(4, 3, conv_impl=impl)
        p = layer.init(jax.random.key(0), x)["params"]
        hlo = jax.jit(jax.grad(lambda p: layer.apply({"params": p}, x).sum())).lower(p).compile().as_text()
        assert ("convolution(" in hlo) == has_conv, impl


def test_depthwise_conv_compiles_to_no_native_conv_on_fast_paths():
    """Stride-1 depthwise convs run as shifted multiply-adds (forward and gradients)."""
    x = jnp.ones((2, 8, 8, 4))
    for impl, has_conv in (("xla", True), ("im2col", False), ("cpu", False)):
        layer = conv(4, 3, feature_group_count=4, conv_impl=impl)
        p = layer.init(jax.random.key(0), x)["params"]
        grad = jax.grad(lambda p, x: layer.apply({"params": p}, x).sum(), argnums=(0, 1))
        hlo = jax.jit(grad).lower(p, x).compile().as_text()
        assert ("convolution(" in hlo) == has_conv, impl


def xla_pool(window):
    return lambda x: nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")


@functools.lru_cache(maxsize=None)
def pool_value_and_grad(impl: str, window: int):
    """Jitted (x, cot) -> (pool(x), d<pool(x), cot>/dx), cached so hypothesis examples reuse compiles."""
    fn = xla_pool(window) if impl == "xla" else (lambda x: max_pool_2d(x, window))

    def f(x, cot):
        y = fn(x)
        return jnp.sum(y * cot), y

    grad = jax.jit(jax.grad(f, has_aux=True))

    def run(x):
        cot = jax.random.normal(jax.random.key(3), jax.eval_shape(fn, x).shape, x.dtype)
        g, y = grad(x, cot)
        return y, g

    return run


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (3, 5, 5, 1), (2, 16, 16, 32)])
@pytest.mark.parametrize("window", [2, 3])
def test_max_pool_matches_nn_max_pool_on_random_data(shape, window):
    x = jax.random.normal(jax.random.key(0), shape)
    y_ref, g_ref = pool_value_and_grad("xla", window)(x)
    y, g = pool_value_and_grad("fast", window)(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(g, g_ref)
    # Cropped rows/columns of odd sizes get no gradient.
    h, w = shape[1:3]
    assert not np.any(np.asarray(g)[:, (h // window) * window:]) and not np.any(np.asarray(g)[:, :, (w // window) * window:])


@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(st.integers(0, 2), min_size=2 * 6 * 5 * 2, max_size=2 * 6 * 5 * 2),
    window=st.sampled_from([2, 3]),
)
def test_max_pool_ties_route_gradient_like_nn_max_pool(data, window):
    """Many exact ties (values in {0,1,2}, also relu-style zeros): same first-maximum routing."""
    x = jnp.asarray(np.array(data, np.float32).reshape(2, 6, 5, 2))
    y_ref, g_ref = pool_value_and_grad("xla", window)(x)
    y, g = pool_value_and_grad("fast", window)(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(g, g_ref)


def test_max_pool_all_equal_window_gives_whole_gradient_to_first_element():
    x = jnp.zeros((1, 2, 2, 1))
    g = jax.grad(lambda x: max_pool_2d(x, 2).sum())(x)
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_max_pool_bfloat16():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)).astype(jnp.bfloat16)
    y, g = pool_value_and_grad("fast", 2)(x)
    y_ref, g_ref = pool_value_and_grad("xla", 2)(x)
    np.testing.assert_array_equal(np.asarray(max_pool(x, 2, conv_impl="cpu"), np.float32), np.asarray(y, np.float32))
    assert y.dtype == g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))


@pytest.mark.parametrize("channels,features,groups,strides", [
    (6, 6, 6, 1),   # depthwise (dscnn_bn's dw convs)
    (4, 8, 2, 1),   # grouped, two output channels per input channel
    (6, 6, 6, 2),   # strided depthwise
])
def test_grouped_conv_matches_xla_values_and_grads(channels, features, groups, strides):
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, channels))
    y = check_all_impls_match_xla(x, 3, features, "SAME", strides=strides, use_bias=False, groups=groups)
    out = -(-7 // strides)  # SAME: ceil(7 / strides)
    assert y.shape == (2, out, out, features)


def test_grouped_conv_module_matches_nn_conv_params_and_rejects_bad_groups():
    """A depthwise `Conv` has nn.Conv's kernel (3, 3, 1, C), same init values and outputs."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    ref = nn.Conv(4, (3, 3), padding="SAME", feature_group_count=4)
    mine = conv(4, 3, padding="SAME", feature_group_count=4, conv_impl="cpu")
    assert isinstance(mine, conv_impls.Conv) and isinstance(conv(4, 3, feature_group_count=4, conv_impl="xla"), nn.Conv)
    p_ref = ref.init(jax.random.key(7), x)
    p = mine.init(jax.random.key(7), x)
    assert p["params"]["kernel"].shape == (3, 3, 1, 4)
    jax.tree.map(np.testing.assert_array_equal, p, p_ref)
    assert_rel_close(mine.apply(p, x), ref.apply(p_ref, x))
    with pytest.raises(ValueError, match="feature_group_count=3"):
        conv(4, 3, feature_group_count=3, conv_impl="cpu").init(jax.random.key(0), x)


def test_conv_impl_names_and_resolution():
    assert set(CONV_IMPLS) >= {"auto", "xla", "im2col", "cpu", "winograd"}
    assert resolve_conv_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")
    assert resolve_conv_impl("xla") == "xla"
    with pytest.raises(ValueError, match="'fft'.*xla.*winograd"):
        resolve_conv_impl("fft")


def test_conv_module_matches_nn_conv_params_and_values():
    """`Conv` (fast paths) declares exactly nn.Conv's params — same RNG stream, same values."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    ref = nn.Conv(5, (3, 3), padding="SAME")
    mine = conv(5, 3, padding="SAME", conv_impl="cpu")
    assert all(isinstance(conv(5, 3, conv_impl=impl), conv_impls.Conv) for impl in FAST_IMPLS)
    p_ref = ref.init(jax.random.key(7), x)
    p = mine.init(jax.random.key(7), x)
    jax.tree.map(np.testing.assert_array_equal, p, p_ref)
    y_ref = ref.apply(p_ref, x)
    assert_rel_close(mine.apply(p, x), y_ref)
    y, bias = mine.apply(p, x, add_bias=False)
    assert_rel_close(y + bias, y_ref)
    assert isinstance(conv(5, 3, conv_impl="xla"), nn.Conv)


@pytest.mark.parametrize("act", [None, nn.relu])
def test_conv_act_pool_matches_pool_of_activation(act):
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
    layer = {impl: conv(4, 3, padding="SAME", conv_impl=impl) for impl in CONV_IMPLS}
    p = jax.jit(layer["xla"].init)(jax.random.key(1), x)
    cot = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))

    @jax.jit
    def run(p, x):
        out = {}
        for impl, lyr in layer.items():
            f = lambda p, x, lyr=lyr, impl=impl: jnp.sum(conv_impls.conv_act_pool(lyr.bind(p), x, act, 2, impl) * cot)
            out[impl] = jax.grad(f, argnums=(0, 1))(p, x)
        return out

    res = run(p, x)
    for impl in CONV_IMPLS:
        assert_rel_close(res[impl], res["xla"])


def test_microbatched_reassembles_in_order_and_counts():
    x = jnp.arange(12.0).reshape(12, 1)
    seen = []

    def f(v):
        seen.append(v.shape[0])
        return v * 2.0

    np.testing.assert_array_equal(conv_impls.microbatched(f, x, 3), x * 2.0)
    assert seen == [4, 4, 4]
    np.testing.assert_array_equal(conv_impls.microbatched(lambda v: v + 1.0, x, 1), x + 1.0)
    assert conv_impls.microbatch_count(128, "cpu") == 128 // conv_impls.CPU_MICROBATCH
    assert conv_impls.microbatch_count(128, "xla") == 1
    assert conv_impls.microbatch_count(100, "cpu", 32) == 2  # largest divisor of 100 not above 100 // 32
    assert conv_impls.microbatch_count(7, "xla", 2) == 1  # prime batch: no even split
    assert conv_impls.microbatch_count(1, "cpu") == 1
    if winograd.available():  # whole batches to train, micro-batches at inference
        assert conv_impls.microbatch_count(128, "cpu_kernel", train=True) == 1
        assert conv_impls.microbatch_count(256, "cpu_kernel") == 256 // conv_impls.KERNEL_MICROBATCH
        assert conv_impls.microbatch_count(128, "cpu_kernel", 64, train=True) == 2  # an explicit size is honoured
    with pytest.raises(ValueError, match="microbatch"):
        conv_impls.microbatch_count(8, "cpu", 0)


def test_native_convs_of_cpu_path_read_a_materialised_input():
    """The 'cpu' path's native convs take their filter gradient from a materialised input."""
    x = jnp.ones((2, 8, 8, 16))
    layer = conv(8, 3, conv_impl="cpu")
    p = layer.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(layer.apply(p, jnp.tanh(x)))))(p))
    assert "cond[" in jaxpr
    xla_layer = conv(8, 3, conv_impl="xla")
    assert "cond[" not in str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(xla_layer.apply(p, jnp.tanh(x)))))(p))


# ----------------------------------------------------------------------------- Winograd

def _lax_conv(x, k, padding):
    return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.jit, static_argnames="pads")
def _winograd_and_lax_vjps(x, k, kc, pads):
    """Values and both gradients of the Winograd and the lax conv, in one compiled program (one
    compile per example instead of an eager compile of each of their many ops)."""
    y, vjp = jax.vjp(lambda x, k: conv_impls.winograd_conv(x, k, pads), x, k)
    y_ref, vjp_ref = jax.vjp(lambda x, k: _lax_conv(x, k, pads), x, k)
    cot = jax.random.normal(kc, y_ref.shape)
    return (y, vjp(cot)), (y_ref, vjp_ref(cot))


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(3, 11), w=st.integers(3, 11), cin=st.integers(1, 9),
       cout=st.integers(1, 9), pads=st.sampled_from([((1, 1), (1, 1)), ((0, 0), (0, 0)), ((2, 0), (1, 2))]))
def test_winograd_conv_matches_lax_conv_values_and_both_grads(n, h, w, cin, cout, pads):
    """Winograd F(2x2, 3x3) filter gradient over odd and even sizes and paddings (and values, input gradient)."""
    kx, kk, kc = jax.random.split(jax.random.key(h * 100 + w * 10 + cin), 3)
    x = jax.random.normal(kx, (n, h, w, cin))
    k = jax.random.normal(kk, (3, 3, cin, cout))
    got, want = _winograd_and_lax_vjps(x, k, kc, pads)
    assert_rel_close(got, want, rtol=2e-6)


def test_winograd_conv_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match=r"3x3 kernel, got \(5, 5\)"):
        conv_impls.winograd_conv(jnp.ones((1, 8, 8, 2)), jnp.ones((5, 5, 2, 3)), ((2, 2), (2, 2)))


def _has_winograd_matmuls(fn, *args) -> bool:
    """Whether the gradient of `fn` has a dot_general batched over the 16 Winograd tile positions."""
    grad = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2))
    return "dimension_numbers=(([1], [1]), ([0], [0]))" in str(jax.make_jaxpr(grad)(*args))


def test_winograd_impl_runs_wide_3x3_convs_as_winograd_and_is_cnn3s_auto_on_cpu():
    from jaxaccel.models import get_model, init_variables

    x = jnp.ones((2, 8, 8, 16))
    layer = {impl: conv(8, 3, conv_impl=impl) for impl in ("winograd", "cpu")}
    p = layer["cpu"].init(jax.random.key(0), x)
    assert _has_winograd_matmuls(lambda p: layer["winograd"].apply(p, x), p)
    assert not _has_winograd_matmuls(lambda p: layer["cpu"].apply(p, x), p)
    # a first layer (patch 3*3*3 <= CPU_IM2COL_MAX_PATCH) stays im2col under "winograd"
    x3 = jnp.ones((2, 8, 8, 3))
    p3 = layer["cpu"].init(jax.random.key(0), x3)
    assert not _has_winograd_matmuls(lambda p: layer["winograd"].apply(p, x3), p3)
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_conv_impl("auto", "winograd") == ("winograd" if on_cpu else "xla")
    assert resolve_conv_impl("cpu", "winograd") == "cpu"  # explicit names are honoured
    assert conv_impls.portable_conv_impl("cpu_kernel") == "winograd"  # exports never carry the kernel
    assert conv_impls.portable_conv_impl("auto", "cpu_kernel") == ("winograd" if on_cpu else "xla")
    with pytest.raises(ValueError, match="'fft'"):
        resolve_conv_impl("auto", "fft")
    # cnn3's "auto" on CPU is "cpu_kernel" (its Winograd runs inside the kernel), else "winograd"
    auto_xla_winograd = on_cpu and not winograd.available()
    for impl, expected in (("auto", auto_xla_winograd), ("winograd", True), ("cpu", False), ("xla", False)):
        model = get_model("cnn3", 10, conv_impl=impl)
        v = init_variables(model, jax.random.key(0), (16, 16, 3))
        assert _has_winograd_matmuls(lambda v: model.apply(v, jnp.ones((2, 16, 16, 3))), v) == expected, impl
