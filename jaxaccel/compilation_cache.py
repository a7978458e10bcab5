"""JAX's persistent compilation cache: compile a step once, reuse it in every later process.

`enable_compilation_cache()` points JAX at a cache dir: the argument, else
`$JAXACCEL_COMPILATION_CACHE`, else ~/.cache/jaxaccel/xla (set the variable to `off` to
disable). It uses the documented config options (`jax_compilation_cache_dir`, and caches
every entry: `jax_persistent_cache_min_compile_time_secs=0`,
`jax_persistent_cache_min_entry_size_bytes=-1`). The `jaxaccel` command calls it before
anything compiles; sweeps of many short runs gain the most.

Owns `enable_compilation_cache`, `cache_dir`, `ENV` and `DEFAULT_DIR`. Imports nothing of
jaxaccel; only the CLI and `bench.compilation_cache` import it, never the training path.
"""
from __future__ import annotations

import os

ENV = "JAXACCEL_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "jaxaccel", "xla")
_OFF = ("off", "0", "false", "none", "no")


def cache_dir(path: str | None = None) -> str | None:
    """The cache dir to use: `path` > $JAXACCEL_COMPILATION_CACHE > the default; None if off."""
    value = path if path is not None else os.environ.get(ENV, DEFAULT_DIR)
    if not value or value.strip().lower() in _OFF:
        return None
    return os.path.abspath(os.path.expanduser(value))


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache in `cache_dir(path)`; returns the dir (or None)."""
    import jax

    directory = cache_dir(path)
    if directory is None:
        return None
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
