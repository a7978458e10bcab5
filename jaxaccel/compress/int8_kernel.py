"""An AVX2 int8 conv/matmul kernel for XLA:CPU, as an XLA FFI custom call compiled on first use.

XLA:CPU's own int8 dot runs only ~1.2x its float32 matmul on AVX2 CPUs without VNNI, while the
hardware does twice float32's multiply-adds with `vpmaddwd` (int16 pairs -> exact int32). The
kernel (`int8_kernel.cc`) is an implicit-GEMM conv: it gathers each output row's receptive field
from the 8-bit NHWC input, widens it to int16 and multiplies it with the int8 kernel packed in
16-channel panels, on XLA's intra-op thread pool. A dense layer is its 1x1 case.

`available()` says whether it can run here (CPU backend, an x86 CPU with AVX2, a C++ compiler);
the first call compiles `int8_kernel.cc` with the system's `c++` against jaxlib's FFI headers
into `$JAXACCEL_KERNEL_CACHE` (default `~/.cache/jaxaccel/kernels`), keyed by a hash of the
source, the compiler, its flags and the jaxlib version, so later processes only load it.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

SOURCE = Path(__file__).with_name("int8_kernel.cc")
TARGET = "jaxaccel_int8_conv"
CXX_FLAGS = ("-O3", "-mavx2", "-std=c++17", "-shared", "-fPIC", "-w")  # -w: jaxlib header warnings


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$JAXACCEL_KERNEL_CACHE`, else ~/.cache/jaxaccel/kernels."""
    return Path(os.environ.get("JAXACCEL_KERNEL_CACHE") or Path.home() / ".cache" / "jaxaccel" / "kernels")


@functools.cache
def unavailable_reason() -> str | None:
    """None if the kernel can run in this process, else why not (one line)."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()!r}, not cpu"
    if not _cpu_has_avx2():
        return f"the CPU ({platform.machine()}) has no AVX2"
    if _compiler() is None:
        return "no C++ compiler (c++, g++ or clang++; or set CXX)"
    try:
        _register()
    except (OSError, AttributeError, RuntimeError) as e:
        reason = f"the kernel did not build or load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        warnings.warn(f"jaxaccel int8 CPU kernel unavailable ({reason}); int8 layers use XLA's int8 dot")
        return reason
    return None


def available() -> bool:
    """Whether `conv_acc` / `matmul_acc` can run here (builds and registers the kernel once)."""
    return unavailable_reason() is None


def kernel_path() -> Path:
    """The compiled library's path: the cache dir plus a hash of source, compiler, flags, jaxlib."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((_compiler() or "",) + CXX_FLAGS).encode()
                         + jaxlib.__version__.encode()).hexdigest()[:16]
    return cache_dir() / f"int8_kernel-{key}.so"


def _build() -> Path:
    """Compile `int8_kernel.cc` unless the cache has it (one builder at a time: a file lock)."""
    out = kernel_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers: the others wait, then load it
        if out.exists():
            return out
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            cmd = [_compiler(), *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, out)  # atomic: a reader never sees half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


@functools.cache
def _register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxaccelInt8Conv), platform="cpu")


def conv_acc(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), max_pool: int = 1) -> jax.Array:
    """int32 VALID conv of 8-bit NHWC codes `x` (uint8 or int8) with an int8 HWIO `kernel`.

    `max_pool=2` also takes the 2x2 max (stride 2, VALID) of the int32 result inside the kernel,
    so only the pooled values are written (exact: the same as pooling the conv's output).
    """
    if max_pool not in (1, 2):
        raise ValueError(f"int8 kernel max_pool must be 1 or 2, got {max_pool!r}")
    if x.dtype not in (jnp.uint8, jnp.int8) or kernel.dtype != jnp.int8:
        raise ValueError(f"int8 kernel needs uint8/int8 x and an int8 kernel, got {x.dtype} and {kernel.dtype}")
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"int8 kernel needs NHWC x and HWIO kernel with matching channels, got {x.shape}, {kernel.shape}")
    _register()
    kh, kw, cin, cout = kernel.shape
    sh, sw = (int(s) for s in strides)
    n, h, w, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"int8 kernel window {kh}x{kw} is larger than the input {h}x{w}")
    return _conv_call(x, kernel.reshape(kh * kw * cin, cout), kh, kw, sh, sw, max_pool)


def _ffi_conv(x: jax.Array, w2d: jax.Array, kh: int, kw: int, sh: int, sw: int, max_pool: int) -> jax.Array:
    n, h, w, _ = x.shape
    ho, wo = ((h - kh) // sh + 1) // max_pool, ((w - kw) // sw + 1) // max_pool
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, ho, wo, w2d.shape[1]), jnp.int32),
                            vmap_method="sequential")
    return call(x, w2d, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw),
                max_pool=np.int64(max_pool))


# Under a sharded jit the custom call is partitioned along the batch: each device runs the kernel
# on its own examples with the (replicated) kernel, instead of XLA gathering the whole batch.
_conv_call = custom_partitioning(_ffi_conv, static_argnums=(2, 3, 4, 5, 6))


def _batch_spec(arg_shapes: Any) -> Any:
    spec = arg_shapes[0].sharding.spec
    return spec[0] if len(spec) else None


def _partition(kh, kw, sh, sw, max_pool, mesh, arg_shapes, result_shape):
    batch = NamedSharding(mesh, PartitionSpec(_batch_spec(arg_shapes), None, None, None))
    lower = functools.partial(_ffi_conv, kh=kh, kw=kw, sh=sh, sw=sw, max_pool=max_pool)
    return mesh, lower, batch, (batch, NamedSharding(mesh, PartitionSpec()))


def _infer_sharding(kh, kw, sh, sw, max_pool, mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, PartitionSpec(_batch_spec(arg_shapes), None, None, None))


_conv_call.def_partition(partition=_partition, infer_sharding_from_operands=_infer_sharding,
                         sharding_rule="b h w c, k n -> b i j n",
                         need_replication_factors=("h", "w", "c", "k", "n", "i", "j"))


def matmul_acc(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """int32 `x @ kernel` of 8-bit codes `x` (..., K) and an int8 (K, N) kernel."""
    lead = x.shape[:-1]
    out = conv_acc(x.reshape(-1, 1, 1, x.shape[-1]), kernel.reshape(1, 1, *kernel.shape))
    return out.reshape(*lead, kernel.shape[-1])
