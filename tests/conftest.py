"""Test set-up: 8 simulated CPU devices, a private offline data dir, cheap compiles, no autotuning.

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

It also trains the runs several test modules read (session fixtures, at most once per worker
process): `reference` and `pruned_run` (see tests/tiny_runs.py). Helper modules beside the
tests are imported by plain name (`tiny_runs`, `ties`, `export_helpers`, `image_folders`).
"""
import os
import tempfile

os.environ.setdefault("JAXACCEL_DATA_DIR", tempfile.mkdtemp(prefix="jaxaccel-tfds-"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXACCEL_COMPILATION_CACHE",
                      tempfile.mkdtemp(prefix="jaxaccel-xla-cache-"))
# The int8 CPU kernel is compiled once per test run (not taken from the user's cache).
os.environ.setdefault("JAXACCEL_KERNEL_CACHE", tempfile.mkdtemp(prefix="jaxaccel-kernels-"))
# conv_impl "auto" is the models' built-in default in tests: timing every candidate on first use
# would cost each test process seconds and make runs compared with each other depend on which
# implementation won on a loaded machine. tests/test_autotune.py turns it on with its own cache.
os.environ.setdefault("JAXACCEL_AUTOTUNE", "off")
os.environ.setdefault("JAXACCEL_AUTOTUNE_CACHE", os.path.join(
    tempfile.mkdtemp(prefix="jaxaccel-autotune-"), "autotune.json"))
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402

from jaxaccel.compilation_cache import enable_compilation_cache  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
enable_compilation_cache()  # $JAXACCEL_COMPILATION_CACHE, set above

import pytest  # noqa: E402

# The longest test files first (measured with --durations=0 on the 2-core AVX2 machine): with
# `--dist loadfile` each file runs whole on one worker, in collection order, so a long file
# collected last (alphabetically, e.g. the Ray cluster's) would leave the other worker idle at
# the end. Longest-first keeps the two workers' ends close. Order only; every test still runs.
LONGEST_FIRST = ("test_sweep_ray.py", "test_multiprocess.py", "test_pipeline_teaching.py",
                 "test_kernels_winograd.py", "test_pipeline.py", "test_compress_onnx.py",
                 "test_search.py", "test_checkpoint.py", "test_models.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


# Runs several test modules read (never change: copy the workdir first). Session-scoped:
# with `make test` each worker process trains them at most once.
@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted `tiny_runs.tiny_config()` run (20 steps on one device, checkpoints at
    steps 10 and 20): (workdir, results)."""
    import jaxaccel
    from tiny_runs import tiny_config
    wd = str(tmp_path_factory.mktemp("reference"))
    return wd, jaxaccel.train(tiny_config(), wd)


@pytest.fixture(scope="session")
def pruned_run(tmp_path_factory):
    """A finished train → prune run (`tiny_runs.pruned_config()`: 10 steps, then a one-shot
    90% prune, which writes no checkpoint): (workdir, results)."""
    import jaxaccel
    from tiny_runs import pruned_config
    wd = str(tmp_path_factory.mktemp("pruned_run"))
    return wd, jaxaccel.train(pruned_config(), wd)
