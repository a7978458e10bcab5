"""jaxaccel.kernels.int8: the AVX2 int8 conv kernel equals XLA's integer conv, exactly, on any
shape; int8 inference of cnn3 runs every layer in it (pooling fused), per device when the
batch is sharded."""
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

from jaxaccel.compress import int8 as i8
from jaxaccel.compress import quant as q
from jaxaccel.kernels import int8 as K
from jaxaccel.kernels import build
from jaxaccel.kernels.build import compiler
from jaxaccel.models import get_model, init_variables
from jaxaccel.models.conv_impls import microbatch_count, resolve_conv_impl
from ties import assert_equal_up_to_ties

AVX2_HOST = platform.machine().lower() in ("x86_64", "amd64") and " avx2" in Path("/proc/cpuinfo").read_text()


needs_kernel = pytest.mark.skipif(not AVX2_HOST or compiler() is None,
                                  reason="needs an x86 CPU with AVX2 and a C++ compiler")


def _reference(x, kernel, strides, pool):
    """int32 VALID conv (+ 2x2 max-pool) by XLA, in int32 so nothing can overflow."""
    y = lax.conv_general_dilated(x.astype(jnp.int32), kernel.astype(jnp.int32), strides, "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if pool == 2:
        n, h, w, c = y.shape
        y = y[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    return np.asarray(y)


@needs_kernel
def test_kernel_builds_and_registers_on_an_avx2_host():
    assert K.unavailable_reason() is None
    assert K.available()
    path = K.KERNEL.library().path()
    assert path.exists() and str(path).startswith(os.environ["JAXACCEL_KERNEL_CACHE"])


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), cin=st.integers(1, 40),
       cout=st.integers(1, 40), kh=st.integers(1, 3), kw=st.integers(1, 3), sh=st.integers(1, 2),
       sw=st.integers(1, 2), unsigned=st.booleans(), pool=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_conv_equals_xla_integer_conv(n, h, w, cin, cout, kh, kw, sh, sw, unsigned, pool, seed):
    """Any shape (K odd or even, channels not a multiple of 16, strided, pooled): exact, extreme codes included."""
    h, w = max(h, kh), max(w, kw)
    if pool == 2 and ((h - kh) // sh + 1 < 2 or (w - kw) // sw + 1 < 2):
        pool = 1
    rng = np.random.default_rng(seed)
    lo = 0 if unsigned else -128
    x = rng.integers(lo, lo + 256, (n, h, w, cin)).astype(np.uint8 if unsigned else np.int8)
    x.flat[0] = lo + 255  # the largest products: 255 * -128 (uint8) overflow int16 pairs, not int32
    kernel = rng.integers(-128, 128, (kh, kw, cin, cout)).astype(np.int8)
    kernel.flat[0] = -128
    got = jax.jit(K.conv_acc, static_argnums=(2, 3))(jnp.asarray(x), jnp.asarray(kernel), (sh, sw), pool)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), _reference(x, kernel, (sh, sw), pool))


SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")  # Debian/Ubuntu libsimde-dev (`make test` installs it)


def _skip_unless_runnable(isa):
    if isa.endswith("_simde"):
        if not AVX2_HOST or compiler() is None or not SIMDE_HEADER.exists():
            pytest.skip(f"the emulated AVX-512 VNNI path needs AVX2, a C++ compiler and {SIMDE_HEADER} (libsimde-dev)")
    elif not build.cpu_has(build.ISAS[isa].cpu_flags) or compiler() is None:
        pytest.skip(f"this CPU lacks {isa} ({build.vector_features() or 'no x86 vector flags'})")


# Kernel paths the host's default may not take: K odd / not a multiple of 4 (quads padding),
# channels off the 16-blocks, strides, fused pooling, Winograd, 1x1; both code types.
ISA_CASES = [  # n, h, w, cin, cout, kh, kw, sh, sw, unsigned, pool
    (2, 7, 9, 3, 8, 3, 3, 1, 1, True, 1), (1, 9, 8, 5, 20, 2, 3, 2, 1, False, 2),
    (2, 6, 7, 16, 32, 3, 3, 1, 1, False, 1), (2, 8, 7, 32, 16, 3, 3, 1, 1, True, 2),
    (1, 5, 5, 37, 19, 1, 1, 1, 1, False, 1), (3, 6, 5, 7, 33, 3, 2, 1, 2, False, 2),
]


@pytest.mark.parametrize("isa", ["avx512", "avx512_vnni", "avx512_vnni_simde"])
def test_every_isa_equals_the_portable_avx2_path(isa):
    """The AVX-512 (vpmaddwd on zmm) and AVX-512 VNNI (vpdpbusd quads, int8 codes shifted by 128;
    vpdpwssd Winograd) libraries give the AVX2 library's integers, exactly, extreme codes included.
    Each runs natively where the CPU has it; the VNNI code also runs everywhere under SIMDe."""
    _skip_unless_runnable(isa)
    assert K.KERNEL.unavailable_reason(isa) is None
    conv = jax.jit(K.conv_acc, static_argnums=(2, 3, 4))
    for i, (n, h, w, cin, cout, kh, kw, sh, sw, unsigned, pool) in enumerate(ISA_CASES):
        rng = np.random.default_rng(i)
        lo = 0 if unsigned else -128
        x = rng.integers(lo, lo + 256, (n, h, w, cin)).astype(np.uint8 if unsigned else np.int8)
        x.flat[:2] = lo, lo + 255
        kernel = rng.integers(-128, 128, (kh, kw, cin, cout)).astype(np.int8)
        kernel.flat[:2] = -128, 127
        args = (jnp.asarray(x), jnp.asarray(kernel), (sh, sw), pool)
        got = np.asarray(conv(*args, isa))
        np.testing.assert_array_equal(got, _reference(x, kernel, (sh, sw), pool), err_msg=str(ISA_CASES[i]))
        if AVX2_HOST:
            np.testing.assert_array_equal(got, np.asarray(conv(*args, "avx2")))
        kind = "winograd" if K.winograd_ok(x.shape, kernel.shape, (sh, sw)) else "conv"
        assert f"@{K.target(kind, isa)}(" in conv.lower(*args, isa).as_text()
    x = rng.integers(-128, 128, (3, 41)).astype(np.int8)
    w = rng.integers(-128, 128, (41, 18)).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(jax.jit(K.matmul_acc, static_argnums=2)(x, w, isa)),
                                  x.astype(np.int64) @ w.astype(np.int64))


@needs_kernel
def test_matmul_keeps_leading_dims_and_is_exact():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 5, 37)).astype(np.uint8)
    w = rng.integers(-128, 128, (37, 19)).astype(np.int8)
    got = np.asarray(jax.jit(K.matmul_acc)(jnp.asarray(x), jnp.asarray(w)))
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64))


@needs_kernel
def test_bad_operands_name_the_value():
    x = jnp.zeros((1, 4, 4, 3), jnp.int8)
    k = jnp.zeros((3, 3, 3, 8), jnp.int8)
    with pytest.raises(ValueError, match="float32"):
        K.conv_acc(x.astype(jnp.float32), k)
    with pytest.raises(ValueError, match="max_pool must be 1 or 2, got 3"):
        K.conv_acc(x, k, max_pool=3)
    with pytest.raises(ValueError, match="5x5 is larger than the input 4x4"):
        K.conv_acc(x, jnp.zeros((5, 5, 3, 8), jnp.int8))
    with pytest.raises(ValueError, match=r"\(1, 4, 4, 3\), \(3, 3, 2, 8\)"):
        K.conv_acc(x, jnp.zeros((3, 3, 2, 8), jnp.int8))


@needs_kernel
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(4, 12), w=st.integers(4, 12), c16=st.integers(1, 4),
       k16=st.integers(1, 3), unsigned=st.booleans(), pool=st.sampled_from([1, 2]), extreme=st.booleans(),
       seed=st.integers(0, 2**16))
def test_winograd_convs_are_exact(n, h, w, c16, k16, unsigned, pool, extreme, seed):
    """3x3 stride-1 convs with channels multiples of 16 run as integer Winograd: still exact, for
    odd sizes (partial tiles) and the largest codes and weights (no int16/int32 overflow)."""
    cin, cout = 16 * c16, 16 * k16
    rng = np.random.default_rng(seed)
    lo = 0 if unsigned else -128
    x = rng.integers(lo, lo + 256, (n, h, w, cin)).astype(np.uint8 if unsigned else np.int8)
    kernel = rng.integers(-128, 128, (3, 3, cin, cout)).astype(np.int8)
    if extreme:  # alternating extremes: the transforms' largest magnitudes
        x = np.where(np.indices(x.shape).sum(0) % 2 == 0, lo, lo + 255).astype(x.dtype)
        kernel = np.where(np.indices(kernel.shape).sum(0) % 3 == 0, 127, -128).astype(np.int8)
    assert K.winograd_ok(x.shape, kernel.shape, (1, 1))
    got = jax.jit(K.conv_acc, static_argnums=(2, 3))(jnp.asarray(x), jnp.asarray(kernel), (1, 1), pool)
    assert f"@{K.target('winograd')}(" in jax.jit(K.conv_acc, static_argnums=(2, 3)).lower(
        jnp.asarray(x), jnp.asarray(kernel), (1, 1), pool).as_text()
    np.testing.assert_array_equal(np.asarray(got), _reference(x, kernel, (1, 1), pool))
    assert not K.winograd_ok(x.shape, (3, 3, 208, 16), (1, 1))  # > 192 inputs could overflow int32
    assert not K.winograd_ok(x.shape, kernel.shape, (2, 2))


@needs_kernel
def test_cnn3_int8_runs_every_layer_in_the_kernel_with_pooling_fused():
    """conv+pool (Conv.max_pooled) and dense layers all become kernel calls; results equal im2col's."""
    model = get_model("cnn3", 10, features=(8, 16, 32), hidden=16)
    variables = init_variables(model, jax.random.key(0), (16, 16, 3))
    x = jax.random.normal(jax.random.key(1), (64, 16, 16, 3))
    act = q.calibrate(model, variables, [x])
    qm = i8.convert_int8(variables, act)
    run = {low: jax.jit(lambda m, x, low=low: i8.int8_apply(model, m, x, conv_lowering=low))
           for low in ("cpu_kernel", "im2col")}
    hlo = run["cpu_kernel"].lower(qm, x).as_text().splitlines()
    calls = [line for line in hlo if f"@{K.target()}(" in line or f"@{K.target('winograd')}(" in line]
    groups = microbatch_count(64, resolve_conv_impl(model.conv_impl, model.AUTO_CPU_CONV_IMPL))
    assert len(calls) == 3 * groups + 2  # each micro-batch's 3 convs, then fc1 and fc2
    assert sum("max_pool = 2" in line for line in calls) == 3 * groups  # every conv's pool is in the kernel
    # conv3 (16 -> 32 channels, 3x3) is an integer Winograd call; conv1/conv2 (3 and 8 inputs) direct
    assert sum(f"@{K.target('winograd')}(" in line for line in calls) == groups
    out = np.asarray(run["cpu_kernel"](qm, x))
    assert_equal_up_to_ties(out, np.asarray(run["im2col"](qm, x)))
    fq = np.asarray(jax.jit(lambda v, x: q.apply_fake_quant(model, v, x, act))(variables, x))
    assert_equal_up_to_ties(out, fq, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_batch_sharded_call_runs_per_device_without_gathering():
    """On a `data` mesh each device convolves its own examples (no all-gather); results are exact."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 10, 10, 8)).astype(np.uint8)
    k = rng.integers(-128, 128, (3, 3, 8, 24)).astype(np.int8)
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    f = jax.jit(K.conv_acc, static_argnums=(2, 3))
    hlo = f.lower(xs, jnp.asarray(k), (1, 1), 2).compile().as_text()
    assert "all-gather" not in hlo
    assert "s32[2,4,4,24]" in hlo and K.target() in hlo  # the per-device call: 16 / 8 examples
    out = f(xs, jnp.asarray(k), (1, 1), 2)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(out), _reference(x, k, (1, 1), 2))
    pm = jax.pmap(lambda x: K.conv_acc(x, jnp.asarray(k), (1, 1), 2))(x.reshape(8, 2, 10, 10, 8))
    np.testing.assert_array_equal(np.asarray(pm).reshape(16, 4, 4, 24), _reference(x, k, (1, 1), 2))
