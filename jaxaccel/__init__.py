"""jaxaccel: a JAX research framework for making deep-learning models faster and smaller.

Public API: `jaxaccel.train(config, workdir) -> results` (what `jaxaccel train` runs),
`jaxaccel.load(workdir) -> Loaded` (`.model`, `.variables`, `.config`, `.predict()`), and the
modules `config`, `stages`, `sweep`, `data`, `models`, `compress`.

Package layout (imports run one way: cli -> pipeline / sweep -> loop / stacked -> state ->
models / compress / data -> kernels; `tests/test_imports.py` keeps it so):
  cli/        the `jaxaccel` command, one module per subcommand (flags in, one call out)
  pipeline    train(config, workdir): stages in order, the STAGE_KINDS registry, the workdir
  sweep/      sweeps: space, point directories, runners (in process, workers), vectorized,
              report
  loop        the one training loop (one state or K stacked), evaluation, results records
  stacked     K states trained as one program (vectorized sweeps, ensembles)
  state       TrainState, optimizer, train/eval steps, build(config, stage)
  loading     load(workdir), the weights a run ended with
  config      the config schema, experiment files, overrides, validation
  stages      the stage schema
  checkpoint  orbax storage, checksums, recovery from damaged checkpoints
  io          strict JSON, atomic files
  artifacts   what a finished run turns into: compression report, package, export
  data/ models/ compress/ kernels/ trees parallel metrics preemption compilation_cache bench/

Imports pipeline and loading only inside `train` / `load` (other submodules on first
attribute access), so `import jaxaccel` stays cheap; never the CLI or bench.
"""
__version__ = "0.1.0"


def train(config, workdir: str, *, overwrite: bool = False) -> dict:
    """Train (or resume) the experiment `config` in `workdir`; returns what results.json holds
    (see `jaxaccel.pipeline.train`)."""
    from jaxaccel.pipeline import train as _train
    return _train(config, workdir, overwrite=overwrite)


def load(workdir: str, step: int | None = None):
    """A finished (or checkpointed) run: `.model`, `.variables`, `.config`, `.predict()`
    (see `jaxaccel.loading.load`)."""
    from jaxaccel.loading import load as _load
    return _load(workdir, step)


_SUBMODULES = ("config", "stages", "sweep", "data", "models", "compress", "parallel",
               "checkpoint", "metrics", "loading", "pipeline", "state", "loop", "io")


def __getattr__(name: str):
    # Submodules load on first use, so `import jaxaccel` stays cheap for the CLI.
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"jaxaccel.{name}")
    raise AttributeError(f"module 'jaxaccel' has no attribute {name!r}")
