"""Test set-up: 8 simulated CPU devices and a private, offline data dir.

Both must happen before JAX's backend starts, so they live at import time here.
"""
import os
import tempfile

os.environ.setdefault("JAXACCEL_DATA_DIR", tempfile.mkdtemp(prefix="jaxaccel-tfds-"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# CLI subprocesses in tests share one fresh compilation cache (never the user's).
os.environ.setdefault("JAXACCEL_COMPILATION_CACHE",
                      tempfile.mkdtemp(prefix="jaxaccel-xla-cache-"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
