"""Test set-up: 8 simulated CPU devices, a private offline data dir, and cheap compiles.

All of it must happen before JAX's backend starts, so it lives at import time here (pytest
imports this file in the controller before it starts xdist workers, so the workers and every
CLI subprocess a test starts inherit the same environment: one data dir, one compile cache).

Compiling is most of the suite's time (about 70% of tests/test_models.py: 113 s cold, 33 s
with every program already in the cache), so the tests
- share one fresh persistent compilation cache (never the user's): in-process tests and CLI
  subprocesses that compile the same program again load it instead;
- compile with LLVM optimization level 0 (`--xla_backend_optimization_level=0` appended to
  XLA_FLAGS): XLA's HLO passes, fusions and library kernels (YNNPACK, Eigen) are unchanged, only
  the generated loop code is less optimised, which costs the tests' tiny models little run time.
  Numerics are IEEE either way (XLA:CPU's fast-math is off by default). Benchmarks never run
  with this flag: speed is measured by `jaxaccel bench`, not here.
"""
import os
import tempfile

os.environ.setdefault("JAXACCEL_DATA_DIR", tempfile.mkdtemp(prefix="jaxaccel-tfds-"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXACCEL_COMPILATION_CACHE",
                      tempfile.mkdtemp(prefix="jaxaccel-xla-cache-"))
# The int8 CPU kernel is compiled once per test run (not taken from the user's cache).
os.environ.setdefault("JAXACCEL_KERNEL_CACHE", tempfile.mkdtemp(prefix="jaxaccel-kernels-"))
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402

from jaxaccel.compilation_cache import enable_compilation_cache  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
enable_compilation_cache()  # $JAXACCEL_COMPILATION_CACHE, set above
