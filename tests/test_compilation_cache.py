"""jaxaccel.compilation_cache: which directory JAX's persistent compilation cache uses."""
import os

import jax

from jaxaccel import compilation_cache

def test_compilation_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.cache_dir().endswith("/.cache/jaxaccel/xla")
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "xla"))
    assert compilation_cache.cache_dir() == str(tmp_path / "xla")
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.cache_dir() is None
    assert compilation_cache.cache_dir(str(tmp_path)) == str(tmp_path)


def test_enable_points_jax_at_the_directory(tmp_path):
    # conftest.py enabled it on $JAXACCEL_COMPILATION_CACHE: enabling again changes nothing.
    directory = compilation_cache.enable_compilation_cache()
    assert directory == os.path.abspath(os.environ[compilation_cache.ENV])
    assert jax.config.jax_compilation_cache_dir == directory and os.path.isdir(directory)
    assert compilation_cache.enable_compilation_cache("off") is None
    assert jax.config.jax_compilation_cache_dir == directory  # "off" touches nothing
