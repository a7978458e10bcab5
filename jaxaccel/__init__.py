"""jaxaccel: a JAX research framework for making deep-learning models faster and smaller.

Public API: `jaxaccel.train(config, workdir) -> results`, `jaxaccel.load(workdir)`.
`jaxaccel.train` is the `jaxaccel/train.py` module made callable, so both
`jaxaccel.train(config, workdir)` and `jaxaccel.train.make_train_step` work.
"""
import importlib

__version__ = "0.1.0"


def load(workdir: str, step: int | None = None):
    """A finished (or checkpointed) run: `.model`, `.variables`, `.config`, `.predict()`."""
    from jaxaccel.checkpoint import load as _load
    return _load(workdir, step)


def __getattr__(name: str):
    # Submodules load on first use, so `import jaxaccel` stays cheap for the CLI.
    if name in ("train", "data", "models", "parallel", "config", "checkpoint", "metrics"):
        return importlib.import_module(f"jaxaccel.{name}")
    raise AttributeError(f"module 'jaxaccel' has no attribute {name!r}")
