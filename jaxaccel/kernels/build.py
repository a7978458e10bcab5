"""Building, caching and registering jaxaccel's C++ XLA FFI kernels for the CPU.

Owns `CpuKernel` (build and register one library), `KernelFamily` (a kernel source's libraries,
one per instruction set in `ISAS`; each wrapper, `winograd` and `int8`, declares one),
`host_isa` (the widest ISA this CPU runs), and the helpers that make a custom call shard over a
batch (`batch_partitioned`) and vmap (`vmap_sequentially`).

A kernel is one C++ source file beside the Python module that calls it (`winograd.cc`,
`int8.cc`), plus the shared `common.h`, all in this package (shipped as package data). Its
first use in a process compiles it with the system C++ compiler (`$CXX`, else `c++`, `g++` or
`clang++`) against jaxlib's FFI headers into `$JAXACCEL_KERNEL_CACHE` (default
`~/.cache/jaxaccel/kernels`), under a name hashed from the sources, the compiler, its flags and
the jaxlib version, so later processes only load it. Builds hold a file lock (parallel test
workers wait for one build) and land by atomic rename (nobody loads half a file).

Imports nothing of jaxaccel: models, compress and bench import the kernels, never the reverse.
"""
from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jaxlib

HEADER = Path(__file__).with_name("common.h")


@functools.cache
def sources_digest() -> str:
    """A short hash of every kernel source in this package (the .cc files and common.h): what
    a cached measurement of the kernels' speed (`autotune`) is only valid for."""
    digest = hashlib.sha256()
    for path in sorted(HEADER.parent.glob("*.cc")) + [HEADER]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$JAXACCEL_KERNEL_CACHE`, else ~/.cache/jaxaccel/kernels."""
    return Path(os.environ.get("JAXACCEL_KERNEL_CACHE") or Path.home() / ".cache" / "jaxaccel" / "kernels")


def compiler() -> str | None:
    """The C++ compiler kernels are built with: `$CXX`, else the first of c++, g++, clang++ on PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The first processor's /proc/cpuinfo flags (empty where there is none), read once: the
    kernels ask at every trace."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f
                                   if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has(features: Sequence[str]) -> bool:
    """Whether this is an x86-64 CPU whose /proc/cpuinfo flags include all `features` (e.g. "avx2")."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return all(f in _cpu_flags() for f in features)


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                "avx512_bf16", "amx_int8", "amx_bf16")


def vector_features() -> str:
    """The CPU's SIMD features that decide kernel speed (from /proc/cpuinfo; "" elsewhere),
    e.g. "avx2 fma" or "avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16"."""
    return " ".join(v for v in VECTOR_FLAGS if v in _cpu_flags())


@dataclasses.dataclass(frozen=True)
class Isa:
    """An instruction set a kernel library is compiled for: the /proc/cpuinfo `cpu_flags` a CPU
    needs to run it, and the compiler flags that target it."""

    name: str
    cpu_flags: tuple[str, ...]
    compiler_flags: tuple[str, ...]


_AVX2 = ("-mavx2", "-mfma")
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl")
ISAS: Mapping[str, Isa] = {
    "avx2": Isa("avx2", ("avx2", "fma"), _AVX2),
    "avx512": Isa("avx512", ("avx2", "fma", "avx512f", "avx512bw", "avx512vl"), _AVX512),
    "avx512_vnni": Isa("avx512_vnni", ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                       (*_AVX512, "-mavx512vnni")),
    # Tests only: the avx512_vnni code on an AVX2 CPU, its AVX-512 intrinsics emulated by SIMDe
    # (the libsimde-dev headers), so the wide path is checked for equality where it cannot run.
    "avx512_vnni_simde": Isa("avx512_vnni_simde", ("avx2", "fma"), (*_AVX2, "-DJAXACCEL_SIMDE_AVX512_VNNI")),
}
ISA_ORDER = ("avx2", "avx512", "avx512_vnni")  # narrowest first; JAXACCEL_KERNEL_ISA caps it


def isa_cap() -> str | None:
    """`$JAXACCEL_KERNEL_ISA` (None if unset): the widest ISA kernels may use. ValueError (one
    line) for a name not in `ISA_ORDER` or one this CPU cannot run; the CLI checks it first, so
    a bad value is refused even by a run whose model uses no kernel."""
    cap = os.environ.get("JAXACCEL_KERNEL_ISA", "").strip()
    if not cap:
        return None
    if cap not in ISA_ORDER:
        raise ValueError(f"JAXACCEL_KERNEL_ISA={cap!r} is not one of {', '.join(ISA_ORDER)}")
    if not cpu_has(ISAS[cap].cpu_flags):
        raise ValueError(f"JAXACCEL_KERNEL_ISA={cap!r} needs the CPU flags {' '.join(ISAS[cap].cpu_flags)}; "
                         f"this CPU has {vector_features() or 'none of them'}")
    return cap


def host_isa(available: Sequence[str]) -> str:
    """The widest of a kernel's `available` ISAs (names in `ISA_ORDER`) this CPU runs, capped by
    `isa_cap()` (e.g. "avx2" forces the portable path on an AVX-512 CPU). Falls back to the
    narrowest (whose `unavailable_reason` then says what the CPU lacks)."""
    cap = isa_cap()
    allowed = ISA_ORDER[:ISA_ORDER.index(cap) + 1] if cap else ISA_ORDER
    ordered = [i for i in ISA_ORDER if i in available]
    runnable = [i for i in ordered if i in allowed and cpu_has(ISAS[i].cpu_flags)]
    return runnable[-1] if runnable else ordered[0]


@dataclasses.dataclass(frozen=True)
class CpuKernel:
    """One C++ kernel library: `source` (beside its wrapper) compiled for the instruction set
    `isa` (a key of `ISAS`), whose FFI handlers `symbols` (symbol -> custom-call target) are
    registered for the CPU; `fallback` says what runs where it cannot (in the warning of a
    failed build). `extra_flags` are appended to the compiler's flags. A kernel with code for
    several ISAs is one `CpuKernel` per ISA, with distinct targets.

    Registration and the availability check run once per process (a lock makes concurrent
    first calls wait for one build); a failed registration is retried by the next call.
    """

    source: Path
    isa: str
    symbols: Mapping[str, str]
    fallback: str
    extra_flags: tuple[str, ...] = ()
    _once: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: Any = dataclasses.field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    @property
    def flags(self) -> tuple[str, ...]:
        """The compiler flags: -O3, the ISA's flags, C++17, a shared library."""
        return ("-O3", *ISAS[self.isa].compiler_flags, "-std=c++17", "-shared", "-fPIC",
                "-w", *self.extra_flags)  # -w: jaxlib header warnings

    def path(self) -> Path:
        """The compiled library's path: the cache dir plus a hash of sources, compiler, flags, jaxlib."""
        key = hashlib.sha256(self.source.read_bytes() + HEADER.read_bytes()
                             + " ".join((compiler() or "", *self.flags)).encode()
                             + jaxlib.__version__.encode()).hexdigest()[:16]
        return cache_dir() / f"{self.source.stem}-{key}.so"

    def build(self) -> Path:
        """Compile `source` unless the cache has it; returns the library. Raises RuntimeError on failure."""
        out = self.path()
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
                cmd = [compiler() or "c++", *self.flags, f"-I{jax.ffi.include_dir()}", f"-I{HEADER.parent}",
                       str(self.source), "-o", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
                os.replace(tmp, out)  # atomic: a reader never sees half a file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return out

    def register(self) -> None:
        """Build (or load) the library and register each FFI handler as its CPU custom-call target."""
        with self._lock:
            if self._once.get("registered"):
                return
            lib = ctypes.cdll.LoadLibrary(str(self.build()))
            for symbol, target in self.symbols.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            self._once["registered"] = True

    def unavailable_reason(self) -> str | None:
        """None if the kernel can run in this process (it is then built and registered), else why
        not, in one line; a failed build also warns once, saying what runs instead (`fallback`)."""
        with self._lock:
            if "reason" not in self._once:
                self._once["reason"] = self._find_unavailable_reason()
            return self._once["reason"]

    def available(self) -> bool:
        """Whether the kernel can run here (builds and registers it once)."""
        return self.unavailable_reason() is None

    def _find_unavailable_reason(self) -> str | None:
        if jax.default_backend() != "cpu":
            return f"the default backend is {jax.default_backend()!r}, not cpu"
        needed = ISAS[self.isa].cpu_flags
        if not cpu_has(needed):
            missing = [f for f in needed if not cpu_has((f,))]
            return f"the CPU ({platform.machine()}) lacks {' or '.join(f.upper() for f in missing or needed)}"
        if compiler() is None:
            return "no C++ compiler (c++, g++ or clang++; or set CXX)"
        try:
            self.register()
        except (OSError, AttributeError, RuntimeError) as e:
            reason = f"the kernel did not build or load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            warnings.warn(f"jaxaccel CPU kernel unavailable ({reason}); {self.fallback}")
            return reason
        return None


EMULATED_ISA = "avx512_vnni_simde"  # tests: every family also builds its wide code under SIMDe


@dataclasses.dataclass(frozen=True)
class KernelFamily:
    """One C++ kernel source with code for several instruction sets (`isas`, names in
    `ISA_ORDER`): a `CpuKernel` library per ISA, plus the tests' `EMULATED_ISA`, each registering
    the FFI handlers `symbols` (symbol -> target name) as `<target>_<isa>`, so every library can
    be loaded in one process and compared. Calls go to the widest this CPU runs (`isa()`)."""

    source: Path
    isas: tuple[str, ...]
    symbols: Mapping[str, str]
    fallback: str
    libraries: Mapping[str, CpuKernel] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "libraries", {
            isa: CpuKernel(self.source, isa, {sym: f"{t}_{isa}" for sym, t in self.symbols.items()}, self.fallback)
            for isa in (*self.isas, EMULATED_ISA)})

    def isa(self) -> str:
        """The ISA calls use here: the widest of `isas` this CPU has, capped by `$JAXACCEL_KERNEL_ISA`."""
        return host_isa(self.isas)

    def library(self, isa: str | None = None) -> CpuKernel:
        """The library for `isa` (default: `isa()`); ValueError (one line) for an unknown one."""
        isa = isa or self.isa()
        if isa not in self.libraries:
            raise ValueError(f"{self.source.stem} kernel isa must be one of {', '.join(self.libraries)}, got {isa!r}")
        return self.libraries[isa]

    def target(self, name: str, isa: str | None = None) -> str:
        """The custom-call target of handler target `name` in the library for `isa` (default: `isa()`)."""
        return f"{name}_{isa or self.isa()}"

    def unavailable_reason(self, isa: str | None = None) -> str | None:
        """None if the library for `isa` can run in this process, else why not (one line)."""
        return self.library(isa).unavailable_reason()


def batch_partitioned(fn: Callable, sharding_rule: str, need_replication_factors: Sequence[str],
                      num_static: int = 0, summed: bool = False, batched: int | None = None) -> Callable:
    """`fn(x, *others, *static)` (a custom call; the last `num_static` arguments are static) as a
    `custom_partitioning` along the leading (batch) axis of `x`: under a sharded jit each device
    runs the kernel on its own examples, instead of XLA gathering the whole batch onto every
    device. The first `batched` array arguments (default: all if `summed`, else `x` alone) are
    batch-sharded like `x`; the others (weights) are replicated. The result is batch-sharded,
    or, if `summed` (the result is a sum over the batch, e.g. a weight gradient), replicated: the
    per-device results are added with a `psum` over the batch's mesh axes. A tuple of results
    is sharded alike."""
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec

    def batch_axes(arg_shapes):
        spec = arg_shapes[0].sharding.spec
        return spec[0] if len(spec) else None

    def sharded(mesh, axes, rank):
        return NamedSharding(mesh, PartitionSpec(axes, *([None] * (rank - 1))))

    def result_sharding(mesh, arg_shapes, result_shape):
        axes = None if summed else batch_axes(arg_shapes)
        if isinstance(result_shape, (tuple, list)):  # several results
            return tuple(sharded(mesh, axes, len(r.shape)) for r in result_shape)
        return sharded(mesh, axes, len(result_shape.shape))

    def partition(*args):
        static, (mesh, arg_shapes, result_shape) = args[:-3], args[-3:]
        axes = batch_axes(arg_shapes)
        n_batched = batched if batched is not None else (len(arg_shapes) if summed else 1)
        ins = tuple(sharded(mesh, axes if i < n_batched else None, len(a.shape))
                    for i, a in enumerate(arg_shapes))

        def lower(*arrays):
            out = fn(*arrays, *static)
            return jax.lax.psum(out, axes) if summed and axes is not None else out

        return mesh, lower, result_sharding(mesh, arg_shapes, result_shape), ins

    def infer_sharding(*args):
        return result_sharding(*args[-3:])

    n_arrays = fn.__code__.co_argcount - num_static
    call = custom_partitioning(fn, static_argnums=tuple(range(n_arrays, n_arrays + num_static)))
    call.def_partition(partition=partition, infer_sharding_from_operands=infer_sharding,
                       sharding_rule=sharding_rule, need_replication_factors=tuple(need_replication_factors))
    return call


def vmap_sequentially(fn: Callable) -> Callable:
    """`fn` (array arguments only, e.g. a `batch_partitioned` custom call, which has no batching
    rule of its own) under `jax.vmap`: one call per vmapped index (`lax.map`), the unbatched
    arguments shared. Vectorized sweeps vmap whole models over their hyperparameters."""
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        def one(mapped):
            it = iter(mapped)
            return wrapped(*(next(it) if b else a for a, b in zip(args, in_batched)))

        out = jax.lax.map(one, [a for a, b in zip(args, in_batched) if b])
        return out, jax.tree.map(lambda _: True, out)

    return wrapped
