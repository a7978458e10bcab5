"""Tests for jaxaccel.kernels.winograd and conv_impl "cpu_kernel": the float32 Winograd CPU
kernel equals XLA's conv (values and both gradients) on every shape it takes."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

from jaxaccel.kernels import winograd as W
from jaxaccel.kernels import build
from jaxaccel.kernels.build import compiler, cpu_has
from jaxaccel.models import conv_impls, get_model, init_variables

needs_kernel = pytest.mark.skipif(not cpu_has(("avx2", "fma")) or compiler() is None,
                                  reason="needs an x86 CPU with AVX2 and FMA and a C++ compiler")
SAME = ((1, 1), (1, 1))


def _conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), SAME, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _close(got, want, rtol=2e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.abs(got - want).max() <= rtol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("bt, g, at", [(W.BT, W.G, W.AT), (W.BT4, W.G4, W.AT4)], ids=["F(2x2,3x3)", "F(4x4,3x3)"])
def test_transform_matrices_compute_the_3x3_correlation(bt, g, at):
    """Y = A^T [(G k G^T) * (B^T d B)] A is the "VALID" 3x3 correlation of the input tile d with k."""
    rng = np.random.default_rng(0)
    n = bt.shape[0]
    m = n - 2
    for _ in range(5):
        d, k = rng.standard_normal((n, n)), rng.standard_normal((3, 3))
        want = np.array([[np.sum(d[i:i + 3, j:j + 3] * k) for j in range(m)] for i in range(m)])
        got = at.astype(np.float64) @ ((g @ k @ g.T) * (bt.astype(np.float64) @ d @ bt.T)) @ at.T
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@needs_kernel
def test_kernel_builds_into_the_cache_and_registers():
    assert W.unavailable_reason() is None and W.available()
    path = W.KERNEL.library().path()
    assert path.exists() and str(path).startswith(os.environ["JAXACCEL_KERNEL_CACHE"])


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "avx512_vnni_simde"])
def test_the_avx512_build_computes_the_avx2_builds_floats(isa):
    """The AVX-512 library (zmm register tiles) runs the same FMAs in the same order per output as
    the AVX2 one: conv, conv + pool and the filter gradient are bitwise equal. Natively where the
    CPU has AVX-512; everywhere under SIMDe (libsimde-dev, which `make test` installs)."""
    if isa.endswith("_simde") and not Path("/usr/include/simde/x86/avx512.h").exists():
        pytest.skip("the emulated AVX-512 path needs /usr/include/simde (libsimde-dev)")
    if not isa.endswith("_simde") and not cpu_has(build.ISAS[isa].cpu_flags):
        pytest.skip(f"this CPU lacks {isa} ({build.vector_features()})")
    assert W.KERNEL.unavailable_reason(isa) is None
    rng = np.random.default_rng(0)
    for n, h, w, c, k in [(2, 6, 8, 8, 16), (1, 5, 7, 24, 48)]:
        x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, c, k)), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((n, h, w, k)), jnp.float32)
        runs = {i: (W.conv(x, kernel, i), W.filter_grad(x, dy, i)) for i in ("avx2", isa)}
        if h % 2 == 0 and w % 2 == 0:
            runs = {i: (*r, *W.conv_max_pool(x, kernel, i)) for i, r in runs.items()}
        for got, want in zip(runs[isa], runs["avx2"]):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        _close(runs[isa][0], _conv(x, kernel))
    assert f"@{W.target('conv', isa)}(" in jax.jit(W.conv, static_argnums=2).lower(x, kernel, isa).as_text()


@needs_kernel
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 11), w=st.integers(1, 11), c8=st.integers(1, 3),
       k16=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_conv_and_filter_grad_equal_xla_on_any_shape(n, h, w, c8, k16, seed):
    """Odd and even sizes (partial tiles at the edges), 1x1 images, several channel panels."""
    c, k = 8 * c8, 16 * k16
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, k)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((n, h, w, k)), jnp.float32)
    _close(jax.jit(W.conv)(x, kernel), _conv(x, kernel))
    _close(jax.jit(W.filter_grad)(x, dy), jax.vjp(lambda kk: _conv(x, kk), kernel)[1](dy)[0])


@needs_kernel
@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 3), h2=st.integers(1, 5), w2=st.integers(1, 5), c8=st.integers(1, 2),
       k16=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_fused_max_pool_equals_pooling_the_conv_and_routes_gradients_alike(n, h2, w2, c8, k16, seed):
    """Pooled values, first-maximum positions (ties: the earlier one, as select-and-scatter) and
    both gradients of conv_impls' fused conv + pool equal max_pool_2d of XLA's conv."""
    h, w, c, k = 2 * h2, 2 * w2, 8 * c8, 16 * k16
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    x[0] = 0.0  # an all-zero image: every window's four entries tie (at 0)
    x, kernel = jnp.asarray(x), jnp.asarray(rng.standard_normal((3, 3, c, k)), jnp.float32)
    pooled, first = jax.jit(W.conv_max_pool)(x, kernel)
    y = np.asarray(_conv(x, kernel)).reshape(n, h // 2, 2, w // 2, 2, k).transpose(0, 1, 3, 5, 2, 4)
    y = y.reshape(n, h // 2, w // 2, k, 4)
    _close(pooled, y.max(-1))
    assert first.dtype == jnp.int8 and not np.asarray(first)[0].any()  # ties go to the first position
    near = np.sort(y, -1)[..., -1] - np.sort(y, -1)[..., -2] < 1e-4 * np.abs(y).max()  # rounding could swap
    np.testing.assert_array_equal(np.asarray(first)[~near], y.argmax(-1)[~near])
    g = jnp.asarray(rng.standard_normal(pooled.shape), jnp.float32)
    # the models' conv + 2x2 pool under "cpu_kernel" (Conv.max_pooled): one fused kernel call
    layer = conv_impls.conv(k, 3, use_bias=False, conv_impl="cpu_kernel")

    def fused_pool(x, kk):
        return layer.apply({"params": {"kernel": kk}}, x, 2, method="max_pooled")[0]

    assert jax.jit(fused_pool).lower(x, kernel).as_text().count(f"@{W.target('pool')}(") == 1
    fused = jax.grad(lambda x, kk: jnp.sum(fused_pool(x, kk) * g), (0, 1))(x, kernel)
    plain = jax.grad(lambda x, k: jnp.sum(conv_impls.max_pool_2d(_conv(x, k), 2) * g), (0, 1))(x, kernel)
    for a, e in zip(fused, plain):
        _close(a, e, 1e-4)


@needs_kernel
@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 2), h2=st.integers(1, 5), w2=st.integers(1, 5), c16=st.integers(1, 2),
       k16=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_unpooled_gradients_equal_the_kernels_on_the_written_out_gradient(n, h2, w2, c16, k16, seed):
    """unpool_conv / unpool_filter_grad read the pooled gradient routed to each window's first
    maximum: bitwise what conv / filter_grad compute on the routed gradient written out
    (odd pooled sizes leave half-empty 4x4 tiles)."""
    h, w, c, k = 2 * h2, 2 * w2, 16 * c16, 16 * k16
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, h2, w2, k)), jnp.float32)
    first = jnp.asarray(rng.integers(0, 4, (n, h2, w2, k)), jnp.int8)
    kernel = jnp.asarray(rng.standard_normal((3, 3, k, c)), jnp.float32)
    dy = conv_impls._route_to_first(first, g, 2, (n, h, w, k))
    np.testing.assert_array_equal(np.asarray(jax.jit(W.unpool_conv)(g, first, kernel)),
                                  np.asarray(jax.jit(W.conv)(dy, kernel)))
    np.testing.assert_array_equal(np.asarray(jax.jit(W.unpool_filter_grad)(x, g, first)),
                                  np.asarray(jax.jit(W.filter_grad)(x, dy)))


@needs_kernel
def test_filter_gradient_is_bit_reproducible():
    """Threads take the filter gradient's slices in any order; the sum must not depend on it
    (exact resume and reproducible runs need bit-identical gradients)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 16, 16, 32)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((32, 16, 16, 64)), jnp.float32)
    f = jax.jit(W.filter_grad)
    first = np.asarray(f(x, dy))
    for _ in range(10):
        np.testing.assert_array_equal(np.asarray(f(x, dy)), first)


@needs_kernel
def test_unsupported_inputs_are_refused_with_the_shapes():
    x, k = jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 8, 16))
    assert W.supports(x.shape, k.shape, SAME, jnp.float32)
    for xs, ks, pad, dt in (((1, 4, 4, 6), (3, 3, 6, 16), SAME, jnp.float32),     # C % 8
                            ((1, 4, 4, 8), (3, 3, 8, 24), SAME, jnp.float32),     # K % 16
                            ((1, 4, 4, 8), (5, 5, 8, 16), SAME, jnp.float32),     # not 3x3
                            ((1, 4, 4, 8), (3, 3, 8, 16), ((0, 0), (0, 0)), jnp.float32),  # VALID
                            ((1, 4, 4, 8), (3, 3, 8, 16), SAME, jnp.bfloat16)):
        assert not W.supports(xs, ks, pad, dt)
    with pytest.raises(ValueError, match=r"float32\[1, 4, 4, 6\], float32\[3, 3, 6, 16\]"):
        W.conv(jnp.zeros((1, 4, 4, 6)), jnp.zeros((3, 3, 6, 16)))
    with pytest.raises(ValueError, match=r"bfloat16\[1, 4, 4, 8\]"):
        W.conv(x.astype(jnp.bfloat16), k)
    with pytest.raises(ValueError, match=r"float32\[1, 4, 4, 8\], float32\[1, 4, 4, 24\]"):
        W.filter_grad(x, jnp.zeros((1, 4, 4, 24)))
    with pytest.raises(ValueError, match=r"even height and width, got \[1, 5, 4, 8\]"):
        W.conv_max_pool(jnp.zeros((1, 5, 4, 8)), k)


@needs_kernel
@pytest.mark.parametrize("features", [(32, 64, 128), (24, 40, 8)])
def test_cpu_kernel_impl_runs_every_wide_conv_in_the_kernel(features):
    """cnn3 under "cpu_kernel": every conv's forward (with its 2x2 max-pool) and filter gradient
    and conv2/conv3's input gradients are kernel calls — the first layer's 3 input channels
    zero-padded to 8, and widths that are not multiples of 16 (a shrunk model's) padded to
    them — and the gradients match the plain Flax model's."""
    model = get_model("cnn3", 10, features=features, conv_impl="cpu_kernel", microbatch=8)
    plain = get_model("cnn3", 10, features=features, conv_impl="xla")
    v = init_variables(plain, jax.random.key(0), (16, 16, 3))
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, x) ** 2)

    grad = jax.jit(jax.grad(loss(model)))
    hlo = grad.lower(v["params"]).as_text()
    assert hlo.count(f"@{W.target('pool')}(") == 3  # conv1-3 forward, each with its 2x2 max-pool
    # conv2/conv3's input gradients (conv1's is not needed) and every filter gradient, all reading
    # the pooled gradient unpooled: no plain conv or filter-gradient call
    assert hlo.count(f"@{W.target('unpool')}(") == 2 and hlo.count(f"@{W.target('unpool_grad')}(") == 3
    assert f"@{W.target()}(" not in hlo and f"@{W.target('grad')}(" not in hlo
    for a, e in zip(jax.tree.leaves(grad(v["params"])), jax.tree.leaves(jax.grad(loss(plain))(v["params"]))):
        assert np.abs(np.asarray(a) - np.asarray(e)).max() <= 1e-4 * np.abs(np.asarray(e)).max()


@needs_kernel
def test_batch_sharded_step_runs_per_device_and_sums_the_filter_gradient():
    """On an 8-device `data` mesh: no all-gather of activations, one all-reduce per filter gradient,
    the same gradients as on one device; pmap runs the kernel per device too."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6, 6, 16)).astype(np.float32)
    k = rng.standard_normal((3, 3, 16, 32)).astype(np.float32)

    def loss(k, x):
        return jnp.sum(conv_impls.winograd_conv(x, k, SAME, use_kernel=True) ** 2)

    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    hlo = f.lower(k, xs).compile().as_text()
    assert "all-gather" not in hlo
    assert hlo.count(f'custom_call_target="{W.target()}"') == 2 and W.target("grad") in hlo
    assert "f32[2,6,6,32]{3,2,1,0} custom-call(" in hlo  # the forward per device: 16 / 8 examples
    (val, (dk, dx)), (val1, (dk1, dx1)) = f(k, xs), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(k, x)
    assert dx.sharding.spec[0] == "data"
    _close(val, val1, 1e-5)  # the loss too, not only its gradients
    _close(dk, dk1, 1e-5)
    _close(dx, dx1, 1e-5)
    pm = jax.pmap(lambda x: W.conv(x, jnp.asarray(k)))(x.reshape(8, 2, 6, 6, 16))
    _close(pm.reshape(16, 6, 6, 32), _conv(jnp.asarray(x), jnp.asarray(k)))

    def pooled_loss(k, x):  # conv + pool: its gradients read the pooled gradient per device too
        return jnp.sum(conv_impls._winograd_conv_max_pool(x, k) ** 2)

    f = jax.jit(jax.grad(pooled_loss, argnums=(0, 1)))
    hlo = f.lower(k, xs).compile().as_text()
    assert "all-gather" not in hlo and W.target("unpool") in hlo and W.target("unpool_grad") in hlo
    for a, e in zip(f(k, xs), jax.jit(jax.grad(pooled_loss, argnums=(0, 1)))(k, x)):
        _close(a, e, 1e-5)


def test_auto_falls_back_to_winograd_and_explicit_kernel_explains_why(monkeypatch):
    monkeypatch.setattr(W, "available", lambda: False)
    monkeypatch.setattr(W, "unavailable_reason", lambda: "no C++ compiler (c++, g++ or clang++; or set CXX)")
    on_cpu = jax.default_backend() == "cpu"
    assert conv_impls.resolve_conv_impl("auto", "cpu_kernel") == ("winograd" if on_cpu else "xla")
    with pytest.raises(ValueError, match=r"'cpu_kernel' cannot run here \(no C\+\+ compiler.*xla, im2col, cpu, winograd$"):
        conv_impls.resolve_conv_impl("cpu_kernel")


@needs_kernel
def test_vmapped_over_kernels_like_a_vectorized_sweep():
    """vmap (vsweep's hyperparameter axis) runs one kernel call per point: same as unbatched."""
    model = get_model("cnn3", 10, features=(8, 16, 32), hidden=16, conv_impl="cpu_kernel")
    v = init_variables(model, jax.random.key(0), (8, 8, 3))
    points = jax.tree.map(lambda a: jnp.stack([a, 1.5 * a]), v)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))

    def grad(v):
        return jax.grad(lambda v: jnp.sum(model.apply(v, x, train=True) ** 2))(v)

    batched = jax.jit(jax.vmap(grad))(points)
    for i in range(2):
        one = grad(jax.tree.map(lambda a: a[i], points))
        for a, e in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
            _close(a[i], e, 1e-5)
