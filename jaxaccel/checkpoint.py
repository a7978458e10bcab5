"""Orbax checkpoints of the full train state, and `jaxaccel.load` for finished runs.

A checkpoint at step s holds the train state (params, batch_stats, opt_state incl. masks,
step, rng) and a small JSON record (`meta`: the data position and anything the stage
runner adds). Restores always go against an abstract target carrying the current
shardings, so a run saved on one layout restores onto another.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxaccel import config as config_lib


class Checkpointer:
    """`workdir/checkpoints`: save every N steps and at the end, keep the last K."""

    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore `step` into the structure/shardings of `abstract_state`."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs (with shardings when given) describing `tree`."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{workdir!r} is not a jaxaccel workdir (no config.json)")
    with open(path) as f:
        return config_lib.from_json(f.read())


@dataclasses.dataclass
class Loaded:
    """A trained model read back from its workdir, ready for inference."""
    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    step: int
    predict_fn: Callable

    def predict(self, images) -> jax.Array:
        """Logits for raw images (uint8 or 0..255 floats, NHWC); normalisation included."""
        return self.predict_fn(self.variables, images)


def load(workdir: str, step: int | None = None) -> Loaded:
    """Load a run's model and variables (latest checkpoint unless `step` is given)."""
    from jaxaccel import train as train_lib  # the train module builds the state structure

    config = read_config(workdir)
    ckpt = Checkpointer(workdir)
    steps = ckpt.all_steps()
    if not steps:
        raise ValueError(f"{workdir!r} has no checkpoints")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ValueError(f"step={step} has no checkpoint in {workdir!r}; "
                         f"available: {', '.join(map(str, sorted(steps)))}")
    setup = train_lib.build(config)
    abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return Loaded(model=setup.model, variables=variables, config=config, step=step,
                  predict_fn=setup.predict_fn)
