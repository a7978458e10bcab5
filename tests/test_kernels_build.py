"""jaxaccel.kernels.build: the one build-and-register helper of the C++ CPU kernels — cached
by source, compiler, flags and jaxlib; a failed build is one clear error and leaves nothing;
a kernel that cannot run here says why."""
import dataclasses
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.kernels import build
from jaxaccel.kernels import int8 as K
from jaxaccel.kernels.build import compiler

AVX2_HOST = platform.machine().lower() in ("x86_64", "amd64") and " avx2" in Path("/proc/cpuinfo").read_text()
needs_kernel = pytest.mark.skipif(not AVX2_HOST or compiler() is None,
                                  reason="needs an x86 CPU with AVX2 and a C++ compiler")


@needs_kernel
def test_build_is_cached_by_source_and_flags(monkeypatch):
    path = K.KERNEL.library().build()
    mtime = path.stat().st_mtime_ns
    assert K.KERNEL.library().build() == path and path.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    other = dataclasses.replace(K.KERNEL.library(), extra_flags=("-DJAXACCEL_TEST",))
    assert other.path() != path  # other flags (or source, compiler, jaxlib): another library


def test_a_failing_compiler_is_reported_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXACCEL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="^false .*kernels/int8.cc.* failed"):
        K.KERNEL.library("avx2").build()
    assert not list(tmp_path.glob("*.so"))  # nothing half-written is left to load later


def test_cache_dir_compiler_and_flags_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXACCEL_KERNEL_CACHE", str(tmp_path))
    assert build.cache_dir() == tmp_path
    monkeypatch.setenv("CXX", "/opt/my-c++")
    assert build.compiler() == "/opt/my-c++"
    kernel = dataclasses.replace(K.KERNEL.library("avx512_vnni"), extra_flags=("-DX",))
    assert kernel.flags[0] == "-O3" and kernel.flags[-1] == "-DX"
    assert {"-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vnni"} <= set(kernel.flags)
    assert kernel.path() != K.KERNEL.library("avx2").path()  # one library per ISA
    path = kernel.path()
    assert path.parent == tmp_path and path.name.startswith("int8-") and path.suffix == ".so"
    monkeypatch.setenv("CXX", "/opt/other-c++")
    assert kernel.path() != path  # another compiler: another library


def test_a_kernel_that_cannot_run_here_says_why(monkeypatch):
    assert not build.cpu_has(("no_such_cpu_flag",))
    monkeypatch.setitem(build.ISAS, "future", build.Isa("future", ("avx2", "no_such_cpu_flag"), ()))
    kernel = build.CpuKernel(source=K.KERNEL.library("avx2").source, isa="future",
                             symbols={}, fallback="im2col runs instead")
    reason = kernel.unavailable_reason()
    assert reason.startswith("the CPU (") and "lacks NO_SUCH_CPU_FLAG" in reason
    assert not kernel.available() and kernel.unavailable_reason() == reason  # checked once


def test_the_host_isa_is_the_widest_the_cpu_has_capped_by_the_environment(monkeypatch):
    monkeypatch.delenv("JAXACCEL_KERNEL_ISA", raising=False)
    runnable = [i for i in build.ISA_ORDER if build.cpu_has(build.ISAS[i].cpu_flags)]
    assert build.host_isa(build.ISA_ORDER) == (runnable[-1] if runnable else "avx2")
    assert build.host_isa(("avx2",)) == "avx2"  # a kernel with AVX2 code only
    assert K.KERNEL.isa() == build.host_isa(build.ISA_ORDER)
    assert set(K.KERNEL.libraries) == {*build.ISA_ORDER, build.EMULATED_ISA}
    with pytest.raises(ValueError, match=r"^int8 kernel isa must be one of avx2, avx512, avx512_vnni, "
                                         r"avx512_vnni_simde, got 'sse2'$"):
        K.KERNEL.library("sse2")
    if build.cpu_has(build.ISAS["avx2"].cpu_flags):
        monkeypatch.setenv("JAXACCEL_KERNEL_ISA", "avx2")  # the portable path on any AVX2 CPU
        assert build.host_isa(build.ISA_ORDER) == "avx2"
    monkeypatch.setenv("JAXACCEL_KERNEL_ISA", "avx1024")
    with pytest.raises(ValueError, match=r"^JAXACCEL_KERNEL_ISA='avx1024' is not one of avx2, avx512, avx512_vnni$"):
        build.host_isa(build.ISA_ORDER)
    if not build.cpu_has(build.ISAS["avx512_vnni"].cpu_flags):
        monkeypatch.setenv("JAXACCEL_KERNEL_ISA", "avx512_vnni")
        with pytest.raises(ValueError, match="needs the CPU flags avx2 fma avx512f .*avx512_vnni; this CPU has"):
            build.host_isa(build.ISA_ORDER)


def test_vmap_sequentially_maps_one_call_per_index():
    calls = []

    def fn(x, y):
        calls.append(x.shape)
        return x * 2.0 + y

    f = build.vmap_sequentially(fn)
    xs, y = jnp.arange(6.0).reshape(3, 2), jnp.ones(2)
    np.testing.assert_array_equal(jax.vmap(f, in_axes=(0, None))(xs, y), xs * 2.0 + 1.0)
    assert calls and all(shape == (2,) for shape in calls)  # unbatched calls only


def test_sources_digest_follows_every_kernel_source(tmp_path, monkeypatch):
    """autotune keys its cached measurements on this digest: editing any kernel source changes it."""
    digest = build.sources_digest()
    assert len(digest) == 12 and digest == build.sources_digest()
    for name in ("winograd.cc", "int8.cc", "common.h"):
        (tmp_path / name).write_bytes((build.HEADER.parent / name).read_bytes())
    monkeypatch.setattr(build, "HEADER", tmp_path / "common.h")
    build.sources_digest.cache_clear()
    try:
        assert build.sources_digest() == digest  # the same files elsewhere
        (tmp_path / "winograd.cc").write_bytes((tmp_path / "winograd.cc").read_bytes() + b"\n")
        build.sources_digest.cache_clear()
        assert build.sources_digest() != digest
    finally:
        build.sources_digest.cache_clear()
