"""jaxaccel.bench.compilation_cache: cold vs warm compiles in fresh processes (slow)."""
import pytest

from jaxaccel.bench import compilation_cache

@pytest.mark.slow
def test_compile_bench_cold_then_warm():
    out = compilation_cache.bench_compile("lenet300_100", 8, (8, 8, 1))
    assert out["cache_files"] > 0 and out["cold_compile_s"] > 0 and out["warm_compile_s"] >= 0
