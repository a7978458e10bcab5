"""Winograd F(2x2, 3x3) float32 conv kernels for XLA:CPU (AVX2 + FMA), as XLA FFI custom calls.

Used by `conv_impl="cpu_kernel"` (`layers`) for stride-1 "SAME" 3x3 convs, in all three passes:
`conv` (the forward and the input gradient, a conv of dy with the flipped kernel),
`conv_max_pool` (the forward fused with the models' 2x2 max-pool) and `filter_grad`.
XLA:CPU's direct convs ran at ~20-30 G multiply-adds/s on cnn3's shapes on the 2-core dev
machine, and the same Winograd expressed as XLA ops spent more time in its tile transforms
than in its matmuls. The kernels (`winograd_kernel.cc`) transform input tiles (and output-
gradient tiles) into a per-thread buffer, run the 16 matmuls of each chunk of tiles in a 6x16
FMA register tile, and transform the results straight into the output: no transformed tensor
is ever written to memory, and 16 multiplies per 2x2 outputs instead of 36. The 3x3 kernel's
own transform (`transform_kernel`, 16 x C x K numbers) is plain JAX.

`available()` says whether they can run here (CPU backend, an x86 CPU with AVX2 and FMA, a C++
compiler); the first call compiles `winograd_kernel.cc` (see `jaxaccel.cpu_kernels`: cached in
`$JAXACCEL_KERNEL_CACHE`), so later processes only load it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxaccel import cpu_kernels

SOURCE = Path(__file__).with_name("winograd_kernel.cc")
TARGET = "jaxaccel_winograd_conv"
POOL_TARGET = "jaxaccel_winograd_conv_pool"
GRAD_TARGET = "jaxaccel_winograd_filter_grad"
CXX_FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w")  # -w: jaxlib header warnings
PADDING = ((1, 1), (1, 1))  # the only padding the kernel does: "SAME" for a 3x3 window



@functools.cache
def unavailable_reason() -> str | None:
    """None if the kernel can run in this process, else why not (one line)."""
    return cpu_kernels.unavailable_reason(("avx2", "fma"), _register, "convs use XLA's")


def available() -> bool:
    """Whether `conv` can run here (builds and registers the kernel once)."""
    return unavailable_reason() is None


def kernel_path() -> Path:
    """The compiled library's path (see `cpu_kernels.library_path`)."""
    return cpu_kernels.library_path(SOURCE, CXX_FLAGS)


@functools.cache
def _register() -> None:
    library = cpu_kernels.build(SOURCE, CXX_FLAGS)
    cpu_kernels.register(library, "JaxaccelWinogradConv", TARGET)
    cpu_kernels.register(library, "JaxaccelWinogradConvPool", POOL_TARGET)
    cpu_kernels.register(library, "JaxaccelWinogradFilterGrad", GRAD_TARGET)


def supports(x_shape: Sequence[int], kernel_shape: Sequence[int], padding: Sequence[Sequence[int]],
             dtype: Any) -> bool:
    """Whether `conv` computes this stride-1 NHWC/HWIO conv: a float32 3x3 "SAME" (pad 1) window,
    input channels a multiple of 8, output channels a multiple of 16."""
    return (len(x_shape) == 4 and tuple(kernel_shape[:2]) == (3, 3) and kernel_shape[2] == x_shape[3]
            and tuple(tuple(int(v) for v in p) for p in padding) == PADDING and jnp.dtype(dtype) == jnp.float32
            and x_shape[3] % 8 == 0 and kernel_shape[3] % 16 == 0)


def g_along(t: jax.Array, axis: int, doubled: bool = False) -> jax.Array:
    """G of F(2x2, 3x3) (4x3: rows 1 0 0 / .5 .5 .5 / .5 -.5 .5 / 0 0 1) applied along `axis`
    (length 3) of `t`; `doubled`: 2G, integer for integer `t` (the int8 kernel's exact Winograd).
    Arithmetic, no array constants: it runs inside `custom_partitioning` functions, which may
    not close over any."""
    g0, g1, g2 = (jnp.take(t, i, axis=axis) for i in range(3))
    plus, minus = g0 + g1 + g2, g0 - g1 + g2
    if doubled:
        return jnp.stack([2 * g0, plus, minus, 2 * g2], axis=axis)
    return jnp.stack([g0, 0.5 * plus, 0.5 * minus, g2], axis=axis)


def _gt_along(t: jax.Array, axis: int) -> jax.Array:
    """G^T (3x4) applied along `axis` (length 4) of `t`: the transpose of `g_along`."""
    t0, t1, t2, t3 = (jnp.take(t, i, axis=axis) for i in range(4))
    return jnp.stack([t0 + 0.5 * (t1 + t2), 0.5 * (t1 - t2), 0.5 * (t1 + t2) + t3], axis=axis)


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO 3x3 `kernel` (C, K channels) -> U = G k G^T packed as the kernel reads it: [16, K/16, C, 16]."""
    c, k = kernel.shape[2:]
    u = g_along(g_along(kernel, 0), 1)  # (4, 4, C, K)
    return u.reshape(16, c, k // 16, 16).transpose(0, 2, 1, 3)


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 "SAME" conv of NHWC float32 `x` with a 3x3 HWIO `kernel` (see `supports`).

    Differentiable only through `conv_impl="cpu_kernel"`'s custom VJP in `layers` (the custom
    call itself has no derivative rule).
    """
    _check_conv(x, kernel)
    return _conv_call(x, kernel)


def _check_conv(x: jax.Array, kernel: jax.Array) -> None:
    if not supports(x.shape, kernel.shape, PADDING, x.dtype) or kernel.dtype != jnp.float32:
        raise ValueError(f"winograd kernel needs float32 NHWC x (C % 8 == 0) and a 3x3 HWIO kernel "
                         f"(K % 16 == 0) with matching channels, got {x.dtype}{list(x.shape)}, "
                         f"{kernel.dtype}{list(kernel.shape)}")
    if not available():
        raise ValueError(f"the winograd CPU kernel cannot run here ({unavailable_reason()})")


def conv_max_pool(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`conv(x, kernel)` followed by a 2x2 max-pool (stride 2), fused: each Winograd tile is one
    pool window, so only the pooled values are written. Returns (pooled [N, H/2, W/2, K],
    first): `first` (int8) is the row-major position (0-3) of each window's first maximum, the
    pool's gradient's routing (as `layers.max_pool_2d`'s). H and W must be even.
    """
    _check_conv(x, kernel)
    if x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"winograd conv + 2x2 max-pool needs an even height and width, got {list(x.shape)}")
    return _pool_call(x, kernel)


def filter_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The 3x3 HWIO kernel's gradient of `conv(x, kernel)` given the output gradient `dy`:
    G^T dU G, dU = the kernel's sum over tiles of (B^T d B)^T (A dY A^T) (16 matmuls)."""
    c, k = x.shape[-1], dy.shape[-1]
    if (x.ndim != 4 or dy.shape[:3] != x.shape[:3] or x.dtype != jnp.float32 or dy.dtype != jnp.float32
            or c % 8 or k % 16):
        raise ValueError(f"winograd filter gradient needs float32 NHWC x (C % 8 == 0) and dy (K % 16 == 0) "
                         f"of the same N, H, W, got {x.dtype}{list(x.shape)}, {dy.dtype}{list(dy.shape)}")
    if not available():
        raise ValueError(f"the winograd CPU kernel cannot run here ({unavailable_reason()})")
    return _gt_along(_gt_along(_grad_call(x, dy).reshape(4, 4, c, k), 0), 1)


def _ffi_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(GRAD_TARGET, jax.ShapeDtypeStruct((16, x.shape[-1], dy.shape[-1]), jnp.float32),
                            vmap_method="sequential")
    return call(x, dy)


# The kernel is transformed inside the partitioned functions, per device, from the (replicated)
# HWIO kernel: a transform outside would inherit an FSDP kernel sharding that no longer divides.
def _ffi_pool(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, h, w, _ = x.shape
    shape = (n, h // 2, w // 2, kernel.shape[-1])
    call = jax.ffi.ffi_call(POOL_TARGET, (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int8)),
                            vmap_method="sequential")
    return call(x, transform_kernel(kernel))


def _ffi_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape[:3] + kernel.shape[-1:], jnp.float32),
                            vmap_method="sequential")
    return call(x, transform_kernel(kernel))


# Under a sharded jit each device runs the kernel on its own examples (no gather of the batch);
# under vmap (vectorized sweeps) one call per vmapped index.
_conv_call = cpu_kernels.vmap_sequentially(cpu_kernels.batch_partitioned(
    _ffi_conv, "b h w c, p q r n -> b h w n", ("h", "w", "c", "p", "q", "r", "n")))
_pool_call = cpu_kernels.vmap_sequentially(cpu_kernels.batch_partitioned(
    _ffi_pool, "b h w c, p q r n -> b i j n, b i j n", ("h", "w", "c", "p", "q", "r", "n", "i", "j")))
# The filter gradient sums over the batch: each device sums its examples, then a psum.
_grad_call = cpu_kernels.vmap_sequentially(cpu_kernels.batch_partitioned(
    _ffi_grad, "b h w c, b h w k -> x c k", ("h", "w", "c", "k", "x"), summed=True))
