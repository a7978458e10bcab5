"""Winograd transforms F(2x2, 3x3) and F(4x4, 3x3), and float32 conv kernels for XLA:CPU (AVX2 +
FMA, or AVX-512) as XLA FFI custom calls.

`BT`, `G`, `AT` are the one home of the F(2x2, 3x3) transforms (Lavin & Gray 2016): a 2x2 output
tile of a 3x3 conv from a 4x4 input tile d is Y = A^T [(G k G^T) * (B^T d B)] A. The portable
pure-JAX Winograd in `models.conv_impls` and the int8 kernel's exact integer one (2G) derive from
them (`int8.cc` spells B and A out). `BT4`, `G4`, `AT4` are F(4x4, 3x3)'s (4x4 outputs from a 6x6
input tile), which the float kernels use (`winograd.cc` spells B and A out).

The kernels serve `conv_impl="cpu_kernel"` (`models.conv_impls`) for stride-1 "SAME" 3x3 convs,
in all three passes: `conv` (the forward and the input gradient, a conv of dy with the flipped
kernel), `conv_max_pool` (the forward fused with the models' 2x2 max-pool) and `filter_grad`.
XLA:CPU's direct convs are slow on cnn3's shapes, and the same Winograd expressed as XLA ops
spends more time in its tile transforms than in its matmuls. The kernels (`winograd.cc`)
transform input tiles (and output-gradient tiles) into a per-thread buffer, run the 36 matmuls
of each chunk of tiles in a 6x16 FMA register tile, and transform the results straight into the
output: no transformed tensor is ever written to memory, and 36 multiplies per 4x4 outputs
instead of 144. F(4x4, 3x3) does 1.78x fewer multiplies than F(2x2, 3x3) at a somewhat larger
float32 rounding error (still within the tests' 2e-5 of XLA's conv). The 3x3 kernel's own
transform (`transform_kernel`, 36 x C x K numbers) is plain JAX.

`available()` says whether they can run here (CPU backend, an x86 CPU with AVX2 and FMA, a C++
compiler); the first call compiles `winograd.cc` (`KERNEL`, see `kernels.build`: cached in
`$JAXACCEL_KERNEL_CACHE`), so later processes only load it. It is compiled for the widest ISA
the CPU has (`KERNEL.isa()`: AVX-512 runs the matmuls' register tile on zmm; `$JAXACCEL_KERNEL_ISA`
caps it); every ISA computes the same floats (the same FMAs, in the same order, per output).

Imports only `kernels.build` of jaxaccel; never models, compress or anything above.
"""
from __future__ import annotations

import functools
import operator
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.kernels.build import KernelFamily, batch_partitioned, vmap_sequentially

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)  # 4x4 input tile
G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)           # 3x3 kernel
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)                               # 2x2 output tile
# F(4x4, 3x3) (interpolation points 0, 1, -1, 2, -2, infinity): the kernels' forward convs.
BT4 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float32)  # 6x6 input tile
G4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)     # 3x3 kernel
AT4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float32)                                       # 4x4 output tile

TARGET = "jaxaccel_winograd_conv"
POOL_TARGET = "jaxaccel_winograd_conv_pool"
GRAD_TARGET = "jaxaccel_winograd_filter_grad"
UNPOOL_TARGET = "jaxaccel_winograd_conv_unpool"
UNPOOL_GRAD_TARGET = "jaxaccel_winograd_filter_grad_unpool"
PADDING = ((1, 1), (1, 1))  # the only padding the kernel does: "SAME" for a 3x3 window
KERNEL = KernelFamily(Path(__file__).with_name("winograd.cc"), ("avx2", "avx512"),
                     {"JaxaccelWinogradConv": TARGET, "JaxaccelWinogradConvPool": POOL_TARGET,
                      "JaxaccelWinogradFilterGrad": GRAD_TARGET, "JaxaccelWinogradConvUnpool": UNPOOL_TARGET,
                      "JaxaccelWinogradFilterGradUnpool": UNPOOL_GRAD_TARGET},
                     fallback="convs use XLA's")


_TARGETS = dict(conv=TARGET, pool=POOL_TARGET, grad=GRAD_TARGET, unpool=UNPOOL_TARGET, unpool_grad=UNPOOL_GRAD_TARGET)


def target(kind: str = "conv", isa_name: str | None = None) -> str:
    """The custom-call target of the "conv", "pool" (conv + max-pool), "grad" (filter gradient),
    "unpool" (`unpool_conv`) or "unpool_grad" (`unpool_filter_grad`) kernel for `isa_name`
    (default: `KERNEL.isa()`, the widest this CPU runs)."""
    return KERNEL.target(_TARGETS[kind], isa_name)


def unavailable_reason() -> str | None:
    """None if the kernel can run in this process, else why not (one line)."""
    return KERNEL.unavailable_reason()


def available() -> bool:
    """Whether `conv` can run here (builds and registers the kernel once)."""
    return unavailable_reason() is None


def supports(x_shape: Sequence[int], kernel_shape: Sequence[int], padding: Sequence[Sequence[int]],
             dtype: Any) -> bool:
    """Whether `conv` computes this stride-1 NHWC/HWIO conv: a float32 3x3 "SAME" (pad 1) window,
    input channels a multiple of 8, output channels a multiple of 16."""
    return (len(x_shape) == 4 and tuple(kernel_shape[:2]) == (3, 3) and kernel_shape[2] == x_shape[3]
            and tuple(tuple(int(v) for v in p) for p in padding) == PADDING and jnp.dtype(dtype) == jnp.float32
            and x_shape[3] % 8 == 0 and kernel_shape[3] % 16 == 0)


def apply_along(m: np.ndarray, t: jax.Array, axis: int) -> jax.Array:
    """The small constant matrix `m` (r x s, e.g. `G`, `G.T`, `2 * G`) applied along `axis`
    (length s) of `t`, as sums of slices of `t`: no array constants (it runs inside
    `custom_partitioning` functions, which may not close over any), and integer `t` stays
    integer where `m` is (2G: the int8 kernel's exact Winograd). Each row adds its terms of
    equal magnitude first and scales their sum once (.5 (a + b + c), not .5a + .5b + .5c)."""
    parts = [jnp.take(t, i, axis=axis) for i in range(m.shape[1])]
    rows = []
    for row in np.asarray(m).tolist():
        sums: dict[float, jax.Array] = {}  # |coefficient| -> the signed sum of its parts, in order
        for coef, part in zip(row, parts):
            if coef == 0:
                continue
            c = abs(coef)
            if c not in sums:
                sums[c] = part if coef > 0 else -part
            elif coef > 0:
                sums[c] = sums[c] + part
            else:
                sums[c] = sums[c] - part
        terms = [s if c == 1 else (int(c) if c.is_integer() else c) * s for c, s in sums.items()]
        rows.append(functools.reduce(operator.add, terms))
    return jnp.stack(rows, axis=axis)


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO 3x3 `kernel` (C, K channels) -> the forward's U = G4 k G4^T packed as the kernel reads
    it: [36, K/16, C, 16]."""
    c, k = kernel.shape[2:]
    u = apply_along(G4, apply_along(G4, kernel, 0), 1)  # (6, 6, C, K)
    return u.reshape(36, c, k // 16, 16).transpose(0, 2, 1, 3)


def conv(x: jax.Array, kernel: jax.Array, isa_name: str | None = None) -> jax.Array:
    """Stride-1 "SAME" conv of NHWC float32 `x` with a 3x3 HWIO `kernel` (see `supports`), by the
    library for `isa_name` (default: `KERNEL.isa()`).

    Differentiable only through `conv_impl="cpu_kernel"`'s custom VJP in `models.conv_impls` (the custom
    call itself has no derivative rule).
    """
    isa_name = _check_conv(x, kernel, isa_name)
    return _calls(isa_name)[0](x, kernel)


def _checked_isa(isa_name: str | None) -> str:
    isa_name = isa_name or KERNEL.isa()
    reason = KERNEL.unavailable_reason(isa_name)
    if reason is not None:
        raise ValueError(f"the winograd CPU kernel cannot run here ({reason})")
    return isa_name


def _check_conv(x: jax.Array, kernel: jax.Array, isa_name: str | None) -> str:
    if not supports(x.shape, kernel.shape, PADDING, x.dtype) or kernel.dtype != jnp.float32:
        raise ValueError(f"winograd kernel needs float32 NHWC x (C % 8 == 0) and a 3x3 HWIO kernel "
                         f"(K % 16 == 0) with matching channels, got {x.dtype}{list(x.shape)}, "
                         f"{kernel.dtype}{list(kernel.shape)}")
    return _checked_isa(isa_name)


def conv_max_pool(x: jax.Array, kernel: jax.Array, isa_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """`conv(x, kernel)` followed by a 2x2 max-pool (stride 2), fused: each Winograd tile is one
    pool window, so only the pooled values are written. Returns (pooled [N, H/2, W/2, K],
    first): `first` (int8) is the row-major position (0-3) of each window's first maximum, the
    pool's gradient's routing (as `models.conv_impls.max_pool_2d`'s). H and W must be even.
    """
    isa_name = _check_conv(x, kernel, isa_name)
    if x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"winograd conv + 2x2 max-pool needs an even height and width, got {list(x.shape)}")
    return _calls(isa_name)[1](x, kernel)


def filter_grad(x: jax.Array, dy: jax.Array, isa_name: str | None = None) -> jax.Array:
    """The 3x3 HWIO kernel's gradient of `conv(x, kernel)` given the output gradient `dy`:
    G4^T dU G4, dU = the kernel's sum over F(4x4, 3x3) tiles of (B^T d B)^T (A dY A^T) (36 matmuls)."""
    c, k = x.shape[-1], dy.shape[-1]
    if (x.ndim != 4 or dy.shape[:3] != x.shape[:3] or x.dtype != jnp.float32 or dy.dtype != jnp.float32
            or c % 8 or k % 16):
        raise ValueError(f"winograd filter gradient needs float32 NHWC x (C % 8 == 0) and dy (K % 16 == 0) "
                         f"of the same N, H, W, got {x.dtype}{list(x.shape)}, {dy.dtype}{list(dy.shape)}")
    grad = _calls(_checked_isa(isa_name))[2](x, dy)
    return apply_along(G4.T, apply_along(G4.T, grad.reshape(6, 6, c, k), 0), 1)


def _check_unpool(pooled: jax.Array, first: jax.Array, what: str) -> None:
    if pooled.ndim != 4 or pooled.dtype != jnp.float32 or first.shape != pooled.shape or first.dtype != jnp.int8:
        raise ValueError(f"winograd {what} needs a float32 NHWC pooled gradient and int8 first-maximum "
                         f"positions of its shape, got {pooled.dtype}{list(pooled.shape)}, "
                         f"{first.dtype}{list(first.shape)}")


def unpool_conv(pooled: jax.Array, first: jax.Array, kernel: jax.Array, isa_name: str | None = None) -> jax.Array:
    """`conv(unpooled, kernel)` where `unpooled` [N, 2H, 2W, C] holds each 2x2 window's `pooled`
    [N, H, W, C] value at its `first` position (as `conv_max_pool` returns them) and zeros
    elsewhere: conv + pool's input gradient, without `unpooled` ever being written."""
    _check_unpool(pooled, first, "unpool conv")
    n, h, w, c = pooled.shape
    isa_name = _check_conv(jax.ShapeDtypeStruct((n, 2 * h, 2 * w, c), pooled.dtype), kernel, isa_name)
    return _calls(isa_name)[3](pooled, first, kernel)


def unpool_filter_grad(x: jax.Array, pooled: jax.Array, first: jax.Array, isa_name: str | None = None) -> jax.Array:
    """`filter_grad(x, unpooled)` for the `unpooled` of `unpool_conv`: the kernel gradient of conv
    + 2x2 max-pool from the pooled gradient. H and W of `x` are twice `pooled`'s."""
    _check_unpool(pooled, first, "unpool filter gradient")
    c, k = x.shape[-1], pooled.shape[-1]
    if (x.ndim != 4 or x.dtype != jnp.float32 or x.shape[0] != pooled.shape[0]
            or tuple(x.shape[1:3]) != (2 * pooled.shape[1], 2 * pooled.shape[2]) or c % 8 or k % 16):
        raise ValueError(f"winograd unpool filter gradient needs float32 NHWC x (C % 8 == 0) twice the "
                         f"height and width of the pooled gradient (K % 16 == 0), got "
                         f"{x.dtype}{list(x.shape)}, {pooled.dtype}{list(pooled.shape)}")
    grad = _calls(_checked_isa(isa_name))[4](x, pooled, first)
    return apply_along(G4.T, apply_along(G4.T, grad.reshape(6, 6, c, k), 0), 1)


@functools.cache
def _calls(isa_name: str) -> tuple[Any, ...]:
    """The (conv, conv + pool, filter gradient, unpool conv, unpool filter gradient) custom calls of
    the library for `isa_name`."""
    def ffi_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
        call = jax.ffi.ffi_call(target("grad", isa_name),
                                jax.ShapeDtypeStruct((36, x.shape[-1], dy.shape[-1]), jnp.float32),
                                vmap_method="sequential")
        return call(x, dy)

    # The kernel is transformed inside the partitioned functions, per device, from the (replicated)
    # HWIO kernel: a transform outside would inherit an FSDP kernel sharding that no longer divides.
    def ffi_pool(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
        n, h, w, _ = x.shape
        shape = (n, h // 2, w // 2, kernel.shape[-1])
        call = jax.ffi.ffi_call(target("pool", isa_name),
                                (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int8)),
                                vmap_method="sequential")
        return call(x, transform_kernel(kernel))

    def ffi_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
        call = jax.ffi.ffi_call(target("conv", isa_name),
                                jax.ShapeDtypeStruct(x.shape[:3] + kernel.shape[-1:], jnp.float32),
                                vmap_method="sequential")
        return call(x, transform_kernel(kernel))

    def ffi_unpool(pooled: jax.Array, first: jax.Array, kernel: jax.Array) -> jax.Array:
        n, h, w, _ = pooled.shape
        call = jax.ffi.ffi_call(target("unpool", isa_name),
                                jax.ShapeDtypeStruct((n, 2 * h, 2 * w, kernel.shape[-1]), jnp.float32),
                                vmap_method="sequential")
        return call(pooled, first, transform_kernel(kernel))

    def ffi_unpool_grad(x: jax.Array, pooled: jax.Array, first: jax.Array) -> jax.Array:
        call = jax.ffi.ffi_call(target("unpool_grad", isa_name),
                                jax.ShapeDtypeStruct((36, x.shape[-1], pooled.shape[-1]), jnp.float32),
                                vmap_method="sequential")
        return call(x, pooled, first)

    # Under a sharded jit each device runs the kernel on its own examples (no gather of the batch);
    # under vmap (vectorized sweeps) one call per vmapped index. The filter gradient sums over the
    # batch: each device sums its examples, then a psum.
    return (vmap_sequentially(batch_partitioned(ffi_conv, "b h w c, p q r n -> b h w n",
                                                ("h", "w", "c", "p", "q", "r", "n"))),
            vmap_sequentially(batch_partitioned(ffi_pool, "b h w c, p q r n -> b i j n, b i j n",
                                                ("h", "w", "c", "p", "q", "r", "n", "i", "j"))),
            vmap_sequentially(batch_partitioned(ffi_grad, "b h w c, b h w k -> x c k",
                                                ("h", "w", "c", "k", "x"), summed=True)),
            vmap_sequentially(batch_partitioned(ffi_unpool, "b i j c, b i j c, p q r n -> b h w n",
                                                ("i", "j", "c", "p", "q", "r", "n", "h", "w"), batched=2)),
            vmap_sequentially(batch_partitioned(ffi_unpool_grad, "b h w c, b i j k, b i j k -> x c k",
                                                ("h", "w", "c", "i", "j", "k", "x"), summed=True)))
