"""An int8 conv/matmul kernel for XLA:CPU (AVX2, AVX-512 or AVX-512 VNNI), as an XLA FFI custom
call compiled on first use.

XLA:CPU's own int8 dot gains little over its float32 matmul on AVX2 CPUs without VNNI, while the
hardware does twice float32's multiply-adds with `vpmaddwd` (int16 pairs -> exact int32). The
kernel (`int8.cc`) is an implicit-GEMM conv: it gathers each output row's receptive field
from the 8-bit NHWC input, widens it to int16 and multiplies it with the int8 kernel packed in
16-channel panels, on XLA's intra-op thread pool. A dense layer is its 1x1 case. 3x3 stride-1
convs with channels multiples of 16 (`winograd_ok`) run as exact integer Winograd F(2x2, 3x3)
instead: the input tiles' transforms fit int16, the kernel's transform times 4 is an integer,
and the same vpmaddwd matmuls do 16 multiplies per 2x2 outputs instead of 36.

The same source is compiled for the widest instruction set the CPU has (`KERNEL.isa()`, chosen at run
time from /proc/cpuinfo; `$JAXACCEL_KERNEL_ISA` caps it, e.g. "avx2"): AVX-512 doubles the
register width, and AVX-512 VNNI multiplies 8-bit codes directly (vpdpbusd, four u8 x s8
products per int32 lane; vpdpwssd for Winograd's int16 operands). Every ISA gives the same exact
integers; each has its own custom-call target (`target`).

`available()` says whether it can run here (CPU backend, an x86 CPU with AVX2, a C++ compiler);
the first call compiles `int8.cc` (`KERNEL`, see `kernels.build`: cached in
`$JAXACCEL_KERNEL_CACHE`, default `~/.cache/jaxaccel/kernels`), so later processes only load it.

Owns `KERNEL`, `available`, `target`, `conv_acc` (int32 conv, optionally 2x2-max-pooled), `matmul_acc` and
`winograd_ok`. Imports only `kernels.build` and `kernels.winograd` (its `G`) of jaxaccel;
never models, compress or anything above.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.kernels.build import ISA_ORDER, KernelFamily, batch_partitioned
from jaxaccel.kernels.winograd import G, apply_along

TARGET = "jaxaccel_int8_conv"
WINOGRAD_TARGET = "jaxaccel_int8_winograd"
KERNEL = KernelFamily(Path(__file__).with_name("int8.cc"), ISA_ORDER,
                     {"JaxaccelInt8Conv": TARGET, "JaxaccelInt8Winograd": WINOGRAD_TARGET},
                     fallback="int8 layers use XLA's int8 dot")


def target(kind: str = "conv", isa_name: str | None = None) -> str:
    """The custom-call target of the direct ("conv") or Winograd ("winograd") kernel for `isa_name`
    (default: `KERNEL.isa()`, the widest this CPU runs)."""
    return KERNEL.target(TARGET if kind == "conv" else WINOGRAD_TARGET, isa_name)


def unavailable_reason() -> str | None:
    """None if the kernel can run in this process, else why not (one line)."""
    return KERNEL.unavailable_reason()


def available() -> bool:
    """Whether `conv_acc` / `matmul_acc` can run here (builds and registers the kernel once)."""
    return unavailable_reason() is None


def conv_acc(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), max_pool: int = 1,
             isa_name: str | None = None) -> jax.Array:
    """int32 VALID conv of 8-bit NHWC codes `x` (uint8 or int8) with an int8 HWIO `kernel`.

    `max_pool=2` also takes the 2x2 max (stride 2, VALID) of the int32 result inside the kernel,
    so only the pooled values are written (exact: the same as pooling the conv's output).
    `isa_name` picks the library (default: `KERNEL.isa()`); every ISA gives the same integers.
    """
    if max_pool not in (1, 2):
        raise ValueError(f"int8 kernel max_pool must be 1 or 2, got {max_pool!r}")
    if x.dtype not in (jnp.uint8, jnp.int8) or kernel.dtype != jnp.int8:
        raise ValueError(f"int8 kernel needs uint8/int8 x and an int8 kernel, got {x.dtype} and {kernel.dtype}")
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"int8 kernel needs NHWC x and HWIO kernel with matching channels, got {x.shape}, {kernel.shape}")
    isa_name = isa_name or KERNEL.isa()
    KERNEL.library(isa_name).register()
    kh, kw, cin, cout = kernel.shape
    sh, sw = (int(s) for s in strides)
    n, h, w, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"int8 kernel window {kh}x{kw} is larger than the input {h}x{w}")
    if winograd_ok(x.shape, kernel.shape, (sh, sw)):
        return _winograd_call(x, kernel, max_pool, target("winograd", isa_name))
    return _conv_call(x, kernel.reshape(kh * kw * cin, cout), kh, kw, sh, sw, max_pool, target("conv", isa_name))


def winograd_ok(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether `conv_acc` runs this conv as exact integer Winograd F(2x2, 3x3) (16 multiplies per
    2x2 outputs instead of 36): 3x3, stride 1, channels multiples of 16, at most 192 inputs (so
    no int32 sum can overflow), an input of at least 4x4."""
    return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1) and kernel_shape[2] % 16 == 0
            and kernel_shape[3] % 16 == 0 and kernel_shape[2] <= 192 and min(x_shape[1:3]) >= 4)


def _winograd_u4(kernel: jax.Array) -> jax.Array:
    """U4 = (2G) k (2G)^T of an int8 HWIO 3x3 kernel as int16 [16, C, K] (4x the Winograd transform,
    an integer; |U4| <= 9 * 128)."""
    u = apply_along(2 * G, apply_along(2 * G, kernel.astype(jnp.int32), 0), 1)
    return u.reshape(16, *kernel.shape[2:]).astype(jnp.int16)


def _ffi_winograd(x: jax.Array, kernel: jax.Array, max_pool: int, name: str) -> jax.Array:
    n, h, w, _ = x.shape
    ho, wo = (h - 2) // max_pool, (w - 2) // max_pool
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((n, ho, wo, kernel.shape[-1]), jnp.int32),
                            vmap_method="sequential")
    return call(x, _winograd_u4(kernel), max_pool=np.int64(max_pool))


def _ffi_conv(x: jax.Array, w2d: jax.Array, kh: int, kw: int, sh: int, sw: int, max_pool: int,
              name: str) -> jax.Array:
    n, h, w, _ = x.shape
    ho, wo = ((h - kh) // sh + 1) // max_pool, ((w - kw) // sw + 1) // max_pool
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((n, ho, wo, w2d.shape[1]), jnp.int32),
                            vmap_method="sequential")
    return call(x, w2d, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw),
                max_pool=np.int64(max_pool))


# Under a sharded jit each device runs the kernel on its own examples (no gather of the batch).
_conv_call = batch_partitioned(_ffi_conv, "b h w c, k n -> b i j n",
                               ("h", "w", "c", "k", "n", "i", "j"), num_static=6)


_winograd_call = batch_partitioned(_ffi_winograd, "b h w c, p q r n -> b i j n",
                                   ("h", "w", "c", "p", "q", "r", "n", "i", "j"), num_static=2)


def matmul_acc(x: jax.Array, kernel: jax.Array, isa_name: str | None = None) -> jax.Array:
    """int32 `x @ kernel` of 8-bit codes `x` (..., K) and an int8 (K, N) kernel."""
    lead = x.shape[:-1]
    out = conv_acc(x.reshape(-1, 1, 1, x.shape[-1]), kernel.reshape(1, 1, *kernel.shape), isa_name=isa_name)
    return out.reshape(*lead, kernel.shape[-1])
