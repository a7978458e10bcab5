"""What tests of exported StableHLO artifacts share: random raw images, the custom calls an
artifact carries, and a loader that runs artifacts in a fresh Python that never imports
jaxaccel."""
import re
import textwrap

import jax
import numpy as np


def foreign_calls(exp) -> set[str]:
    """Custom-call targets of an artifact other than jax.export's own shape checks: the
    process-local CPU kernels must never be among them."""
    return set(re.findall(r"custom_call @(\w+)", exp.mlir_module())) - {"shape_assertion"}


def raw_images(key: int, n: int, shape=(8, 8, 1)) -> np.ndarray:
    """Random raw pixels, uint8 as a dataset gives them."""
    return np.asarray(jax.random.randint(jax.random.key(key), (n,) + shape, 0, 256), np.uint8)


# python -c LOADER inputs.npz outputs.npz artifact...: every input through every artifact.
LOADER = textwrap.dedent("""
    import sys
    import numpy as np
    from jax import export
    inputs = np.load(sys.argv[1])
    out = {}
    for path in sys.argv[3:]:
        with open(path, "rb") as f:
            exp = export.deserialize(bytearray(f.read()))
        for name in inputs.files:
            out[f"{path}:{name}"] = np.asarray(exp.call(inputs[name]))
    assert not any(m.startswith("jaxaccel") for m in sys.modules), "jaxaccel was imported"
    np.savez(sys.argv[2], **out)
""")
